"""``backend="triton"``: the fused Triton kernels behind the :class:`~macl_kernels.backends.base.Backend` contract.

Triton and the kernels (:mod:`.operators`) are imported when the backend is first asked
for on a device it can run on, not with ``macl_kernels``: importing triton and
``torch._inductor`` (which ``torch.library.triton_op`` pulls in) takes longer than
the rest of the package and much memory, which a user of the CPU backends should
not pay for (python_tests/test_import.py). Whether triton is installed is known
without importing it. Under ``torch.compile`` the first
import can happen while dynamo traces the backend's resolution:
:func:`load_kernels` is then run as plain Python, not traced, so the ops are
registered before dynamo reaches them.

On CPU tensors the kernels run only in Triton's interpreter, which is chosen when
``triton.jit`` decorates them, so ``TRITON_INTERPRET=1`` must be set before
``macl_kernels`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from ..base import Backend

# Read once, like configs.INTERPRET, which the kernels read when they are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
KERNELS = f"{__package__}.operators"  # importing it imports triton and registers the ops
INSTALL_HINT = "install it with `pip install triton` (or `pip install 'macl_kernels[triton]'`)"
IMPORT_ERROR: Optional[str] = None  # why importing the kernels failed, once it did


def constant_under_compile(fn):
    """``torch.compiler.assume_constant_result``, without importing ``torch._dynamo``.

    Dynamo calls such a function as plain Python when it meets it and uses the result
    as a constant. The decorator only sets this attribute, but importing it imports
    dynamo, and with it triton and inductor: what this module avoids.
    python_tests/test_import.py checks that the attribute is still what it sets.
    """
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def load_kernels() -> Optional[str]:
    """Import triton and the kernels once; None, or why that failed (remembered, not retried)."""
    global IMPORT_ERROR
    if IMPORT_ERROR is None and KERNELS not in sys.modules:
        try:
            importlib.import_module(KERNELS)
        except ImportError as error:  # triton too old or broken
            IMPORT_ERROR = f"{type(error).__name__}: {error}"
    return IMPORT_ERROR


@constant_under_compile
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
        if not TRITON_INSTALLED:
            return f"triton is not installed; {INSTALL_HINT}"
        if device.type == "cpu" and not INTERPRET:
            return (
                "Triton kernels need a CUDA device; on the CPU they run only in Triton's interpreter: "
                "set TRITON_INTERPRET=1 before importing macl_kernels"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA devices, not on {device.type}"
        error = load_kernels()
        if error is not None:
            return f"triton is installed but the kernels do not import ({error}); {INSTALL_HINT}"
        return None

    def normalize(self, z0, z1):
        from . import operators  # imported by load_kernels already: a lookup in sys.modules

        u0, u1, positive_cos, _, _ = operators.differentiable_normalize(z0, z1)
        return u0, u1, positive_cos

    def negative_lse(self, x, y, excluded, tau):
        from . import operators

        return operators.differentiable_negative_lse(x, y, excluded, tau, fp32_dots_use_tf32())
