"""The C++ CPU backend: the fused, tiled kernel of csrc/cpu behind the backend contract.

Tiles of logits come from BLAS gemms and are folded into the log-sum-exps by one
vectorized (at::vec, SLEEF exp) pass; the ntxent layout computes each symmetric tile
once for both of its blocks. Deterministic, whatever the number of threads.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .base import Backend


class CppBackend(Backend):
    name = "cpp"
    devices = "CPU (C++ extension)"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return "it runs on CPU tensors only (backend='cuda' is its CUDA counterpart)"
        return _ops.unavailable_reason(device)

    def negative_lse(self, x, y, excluded, tau):
        return _ops.negative_lse(x, y, excluded, tau)
