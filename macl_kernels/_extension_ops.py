"""The compiled ops of ``csrc/`` as PyTorch sees them: loading, fake kernels, autograd.

``import macl_kernels._C`` registers ``torch.ops.macl_kernels.negative_lse``, its
backward and ``negative_lse_product`` (the lse and ``P y``; schemas in csrc/ops.cpp,
kernels per device). This module adds what lets autograd and ``torch.compile`` use
them: a fake (meta) kernel per op and the autograd formula of the backend contract
(:mod:`macl_kernels.backends.base`). With candidates, when ``dx`` will be needed, the
forward is the product op: ``dx = (h / tau) P y`` then needs no pass over S and the
backward kernel computes ``dy`` alone (``need_dx=False``), as the Triton backend does.
When the extension is missing, the package still imports and
:func:`unavailable_reason` says how to build it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._autograd import once_differentiable, register_autograd
from ._math import accumulation_dtype, rows_from_product

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
PRODUCT_OP = "macl_kernels::negative_lse_product"


def _devices_with_kernels(op: str) -> frozenset:
    """Device types with compiled kernels for ``op``, looked up once (a plain set stays traceable by torch.compile)."""
    return frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    )


KERNEL_DEVICES = _devices_with_kernels(OP)
PRODUCT_DEVICES = _devices_with_kernels(PRODUCT_OP)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the compiled ops have kernels for ``device``'s type, else why not and how to fix it."""
    if LOAD_ERROR is not None:
        return f"the C++ extension macl_kernels._C is not built or does not load ({LOAD_ERROR}); {BUILD_HINT}"
    if device.type not in KERNEL_DEVICES:
        return f"the C++ extension was built without {device.type} kernels; {BUILD_HINT}"
    return None


def negative_lse(x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor):
    """The backend contract's negatives' log-sum-exp through the compiled ops (differentiable).

    With candidates, when ``dx`` will be needed (and the device has the product op), the
    forward also keeps ``P y`` so that the backward's ``dx`` costs no pass over S.
    """
    if y is not None and torch.is_grad_enabled() and x.requires_grad and x.device.type in PRODUCT_DEVICES:
        return _differentiable_negative_lse_product(x, y, excluded, tau)[0]
    return _differentiable_negative_lse(x, y, excluded, tau)


def _fake_negative_lse(x, y, excluded, tau):
    return x.new_empty((x.shape[0],), dtype=accumulation_dtype(x.dtype))


def _fake_negative_lse_product(x, y, excluded, tau):
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=acc), x.new_empty(x.shape, dtype=acc)


def _fake_negative_lse_backward(grad_lse, x, y, excluded, tau, lse, need_dy, need_dx=True):
    if y is None and not need_dx:  # (as csrc/checks.h's check_need_dx)
        raise RuntimeError("negative_lse_backward: need_dx = false needs y (without y, dx holds both roles)")
    dx = torch.empty_like(x) if (need_dx or y is None) else x.new_empty((0,))
    dy = torch.empty_like(y) if (y is not None and need_dy) else x.new_empty((0,))
    return dx, dy


def _setup_context(ctx, inputs, output):
    x, y, excluded, tau = inputs
    ctx.save_for_backward(x, y, excluded, tau, output)
    ctx.has_y = y is not None


@once_differentiable
def _backward(ctx, grad_lse):
    x, y, excluded, tau, lse = ctx.saved_tensors
    need_dy = ctx.has_y and ctx.needs_input_grad[1]
    # With candidates, this path is the one of anchors that needed no gradient at the forward (else the
    # product op's): no row pass for a dx nobody reads. Without, dx holds both roles.
    need_dx = not ctx.has_y or ctx.needs_input_grad[0]
    y = y if ctx.has_y else None
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, need_dy, need_dx)
    return (dx if need_dx else None), (dy if need_dy else None), None, None


def _product_setup_context(ctx, inputs, output):
    x, y, excluded, tau = inputs
    lse, product = output
    ctx.mark_non_differentiable(product)
    ctx.set_materialize_grads(False)  # (else autograd hands the backward an M x D zero gradient for `product`)
    ctx.save_for_backward(x, y, excluded, tau, lse, product)


@once_differentiable
def _product_backward(ctx, grad_lse, _grad_product):
    x, y, excluded, tau, lse, product = ctx.saved_tensors
    need_dx, need_dy = ctx.needs_input_grad[:2]
    if grad_lse is None:  # (grads are not materialized: no gradient reached the lse)
        return None, None, None, None
    dx = rows_from_product(lse, product, lse, tau, grad_lse).to(x.dtype) if need_dx else None  # no pass over S
    dy = None
    if need_dy:  # the column pass alone
        _, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True, False)
    return dx, dy, None, None


if LOAD_ERROR is None:
    torch.library.register_fake(OP)(_fake_negative_lse)
    torch.library.register_fake(PRODUCT_OP)(_fake_negative_lse_product)
    torch.library.register_fake(BACKWARD_OP)(_fake_negative_lse_backward)
    _differentiable_negative_lse = register_autograd(
        torch.ops.macl_kernels.negative_lse.default, _backward, setup_context=_setup_context
    )
    _differentiable_negative_lse_product = register_autograd(
        torch.ops.macl_kernels.negative_lse_product.default, _product_backward, setup_context=_product_setup_context
    )
