"""The CUDA backend: the kernels of csrc/cuda behind the backend contract.

Tensor-core (WMMA) tiles for fp16/bf16 inputs and CUDA-core tiles for fp32/fp64, an
online log-sum-exp per anchor in the forward, and a deterministic backward: a pass
that owns row blocks and a pass that owns column blocks, one writer per output tile.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .base import Backend


class CudaBackend(Backend):
    name = "cuda"
    devices = "CUDA (C++/CUDA extension)"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return "it runs on CUDA tensors only (backend='cpp' is its CPU counterpart)"
        return _ops.unavailable_reason(device)

    def negative_lse(self, x, y, excluded, tau):
        return _ops.negative_lse(x, y, excluded, tau)
