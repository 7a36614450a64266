"""The C++/CUDA extension's backends: ``cpp`` (csrc/cpu) and ``cuda`` (csrc/cuda).

Both run the same compiled op, ``torch.ops.macl_kernels.negative_lse``, whose
kernel PyTorch dispatches by the inputs' device:

- ``cpp``: tiles of logits from BLAS gemms, folded into the log-sum-exps by one
  vectorized (at::vec, SLEEF exp) pass; the ntxent layout computes each symmetric
  tile once for both of its blocks. Deterministic, whatever the number of threads.
- ``cuda``: a CTA owns a block of rows and streams the other side's rows through
  shared memory (16-byte ``cp.async`` copies, two stages); fp16/bf16 score tiles on
  the tensor cores (``mma.sync`` m16n8k16 fed by ``ldmatrix``), fp32/fp64 on the CUDA
  cores (IEEE FMAs in the input type); an online log-sum-exp (exp2) per anchor in
  the forward, and a deterministic backward: a pass that owns row blocks (``dx``) and
  a pass that owns column blocks (``dy``), no atomics (csrc/cuda/negative_lse_kernels.cu).

The op's autograd formula is in :mod:`macl_kernels._extension_ops`; its backward is a kernel,
so both backends are once differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension_ops
from .base import Backend


class CompiledBackend(Backend):
    """The compiled op on one device type."""

    def __init__(self, name: str, device_type: str, devices: str, counterpart: str) -> None:
        self.name = name
        self.device_type = device_type
        self.devices = devices
        self.counterpart = counterpart

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != self.device_type:
            return (
                f"it runs on {self.device_type.upper()} tensors only "
                f"(backend={self.counterpart!r} is its {device.type.upper()} counterpart)"
            )
        return _extension_ops.unavailable_reason(device)

    def negative_lse(self, x, y, excluded, tau):
        return _extension_ops.negative_lse(x, y, excluded, tau)


CPP = CompiledBackend("cpp", "cpu", "CPU (C++ extension)", counterpart="cuda")
CUDA = CompiledBackend("cuda", "cuda", "CUDA (C++/CUDA extension)", counterpart="cpp")
