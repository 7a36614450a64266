"""``backend="triton"``: the fused Triton kernels behind the :class:`~macl_kernels.backends.base.Backend` contract.

Triton and the kernels are imported with this module when triton is importable;
on CPU tensors they run only in Triton's interpreter, which is chosen when
``triton.jit`` decorates, so ``TRITON_INTERPRET=1`` must be set before
``macl_kernels`` is imported.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..base import Backend

try:
    from . import ops
    from .configs import INTERPRET

    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as error:  # triton missing or too old
    ops = None
    INTERPRET = False
    IMPORT_ERROR = error


@torch.compiler.assume_constant_result
def fp32_dots_use_tf32() -> bool:
    """Whether fp32 dots may use TF32, as ``torch.backends.cuda.matmul`` says (IEEE by default).

    torch >= 2.9 has ``fp32_precision`` and raises on reading ``allow_tf32`` once
    only the new setting was used, so the new setting is read first. Dynamo cannot
    trace these getters: under torch.compile the value is fixed when the loss is
    traced (changing it later needs ``torch._dynamo.reset()``).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


class TritonBackend(Backend):
    name = "triton"
    devices = "CUDA (Ampere, Hopper); CPU tensors only under TRITON_INTERPRET=1"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if IMPORT_ERROR is not None:
            return f"triton is not importable ({IMPORT_ERROR}); install it with `pip install triton`"
        if device.type == "cuda" or INTERPRET:
            return None
        if device.type == "cpu":
            return (
                "Triton kernels need a CUDA device; on the CPU they run only in Triton's interpreter: "
                "set TRITON_INTERPRET=1 before importing macl_kernels"
            )
        return f"Triton kernels run on CUDA devices, not on {device.type}"

    def normalize(self, z0, z1):
        u0, u1, positive_cos, _, _ = ops.normalize(z0, z1)
        return u0, u1, positive_cos

    def negative_lse(self, x, y, excluded, tau):
        return ops.differentiable_negative_lse(x, y, excluded, tau, fp32_dots_use_tf32())
