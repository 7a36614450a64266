"""The compiled ops of ``csrc/`` as PyTorch sees them: loading, fake kernels, autograd.

``import macl_kernels._C`` registers ``torch.ops.macl_kernels.negative_lse`` and its
backward (schemas in csrc/ops.cpp, kernels per device). This module adds what lets
autograd and ``torch.compile`` use them: a fake (meta) kernel per op and the autograd
formula of the backend contract (:mod:`macl_kernels.backends.base`). When the
extension is missing, the package still imports and :func:`unavailable_reason` says
how to build it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._autograd import once_differentiable, register_autograd
from ._math import accumulation_dtype

BUILD_HINT = (
    "the ops compile against the installed torch: build them with `pip install --no-build-isolation .` "
    "(a plain `pip install .` builds without torch and stops), `make install` in a clone, or install a wheel "
    "built for this torch (its version says which, e.g. +torch2.14.1.cu130); MACL_KERNELS_CUDA=1 and CUDA_HOME "
    "add the CUDA kernels"
)

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    LOAD_ERROR: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}; torch is {torch.__version__}"

OP = "macl_kernels::negative_lse"
BACKWARD_OP = "macl_kernels::negative_lse_backward"
# Device types with compiled kernels, looked up once (a plain set stays traceable by torch.compile).
KERNEL_DEVICES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(OP, key)
)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the compiled ops have kernels for ``device``'s type, else why not and how to fix it."""
    if LOAD_ERROR is not None:
        return f"the C++ extension macl_kernels._C is not built or does not load ({LOAD_ERROR}); {BUILD_HINT}"
    if device.type not in KERNEL_DEVICES:
        return f"the C++ extension was built without {device.type} kernels; {BUILD_HINT}"
    return None


def negative_lse(x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor):
    """The backend contract's negatives' log-sum-exp through the compiled op (differentiable)."""
    return _differentiable_negative_lse(x, y, excluded, tau)


def _fake_negative_lse(x, y, excluded, tau):
    return x.new_empty((x.shape[0],), dtype=accumulation_dtype(x.dtype))


def _fake_negative_lse_backward(grad_lse, x, y, excluded, tau, lse, need_dy):
    dy = torch.empty_like(y) if (y is not None and need_dy) else x.new_empty((0,))
    return torch.empty_like(x), dy


def _setup_context(ctx, inputs, output):
    x, y, excluded, tau = inputs
    ctx.save_for_backward(x, y, excluded, tau, output)
    ctx.has_y = y is not None


@once_differentiable
def _backward(ctx, grad_lse):
    x, y, excluded, tau, lse = ctx.saved_tensors
    need_dy = ctx.has_y and ctx.needs_input_grad[1]
    y = y if ctx.has_y else None
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, need_dy)
    return dx, (dy if need_dy else None), None, None


if LOAD_ERROR is None:
    torch.library.register_fake(OP)(_fake_negative_lse)
    torch.library.register_fake(BACKWARD_OP)(_fake_negative_lse_backward)
    _differentiable_negative_lse = register_autograd(
        torch.ops.macl_kernels.negative_lse.default, _backward, setup_context=_setup_context
    )
