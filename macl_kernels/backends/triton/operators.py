"""The Triton kernels as PyTorch operators: schemas, fake (shape-only) kernels, autograd.

On GPUs the ops are ``torch.library.triton_op`` s, so ``torch.compile`` sees the
kernels inside them (``wrap_triton``) and can trace a whole training step with
``fullgraph=True``. Under ``TRITON_INTERPRET=1`` a kernel is a Python function
that needs real data and cannot become a graph node, so the same functions are
registered as opaque ``custom_op`` s instead; schemas, fakes and autograd are
identical either way. The backward ops are plain (not differentiable), so the
formulas are once differentiable (:mod:`macl_kernels._autograd`); the backend calls
the ``differentiable_*`` forms, which ``torch.func`` accepts too.

Two forward ops: ``negative_lse`` (the lse) and ``negative_lse_product`` (the lse and
``P y``, kept for the backward so that ``dx`` needs no pass over S);
:func:`differentiable_negative_lse` picks the second when ``dx`` will be needed.

No ``from __future__ import annotations`` here: the schemas are inferred from the
annotations at runtime.
"""

from typing import Optional, Tuple

import torch

from ..._autograd import once_differentiable, register_autograd
from ..._math import accumulation_dtype, rows_from_product
from . import backward, forward, prologue
from .configs import INTERPRET

NAMESPACE = "macl_kernels"


def _define(name: str, fn):
    qualified = f"{NAMESPACE}::{name}"
    if INTERPRET:
        return torch.library.custom_op(qualified, fn, mutates_args=())
    return torch.library.triton_op(qualified, fn, mutates_args=())


# -- the prologue: normalization and positive cosines ---------------------------------------


def _normalize(
    z0: torch.Tensor, z1: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return prologue.normalize_pair(z0, z1)


def _normalize_backward(
    z0: torch.Tensor,
    z1: torch.Tensor,
    norm0: torch.Tensor,
    norm1: torch.Tensor,
    grad_u0: Optional[torch.Tensor],
    grad_u1: Optional[torch.Tensor],
    grad_cos: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return prologue.normalize_pair_backward(z0, z1, norm0, norm1, grad_u0, grad_u1, grad_cos)


normalize = _define("triton_normalize", _normalize)
normalize_backward = _define("triton_normalize_backward", _normalize_backward)


@normalize.register_fake
def _(z0, z1):
    acc = accumulation_dtype(z0.dtype)
    n, d = z0.shape
    rows = z0.new_empty((n, d))
    return rows, torch.empty_like(rows), *(z0.new_empty(n, dtype=acc) for _ in range(3))


@normalize_backward.register_fake
def _(z0, z1, norm0, norm1, grad_u0, grad_u1, grad_cos):
    return z0.new_empty(z0.shape), z1.new_empty(z1.shape)


def _normalize_setup(ctx, inputs, output):
    z0, z1 = inputs
    *_, norm0, norm1 = output
    ctx.mark_non_differentiable(norm0, norm1)
    ctx.set_materialize_grads(False)  # a view without upstream gradient (queue's u1) stays None
    ctx.save_for_backward(z0, z1, norm0, norm1)


@once_differentiable
def _normalize_grad(ctx, grad_u0, grad_u1, grad_cos, _grad_norm0, _grad_norm1):
    z0, z1, norm0, norm1 = ctx.saved_tensors
    if grad_u0 is None and grad_u1 is None and grad_cos is None:
        return None, None
    return normalize_backward(z0, z1, norm0, norm1, grad_u0, grad_u1, grad_cos)


differentiable_normalize = register_autograd(normalize, _normalize_grad, setup_context=_normalize_setup)


# -- the negatives' log-sum-exp ------------------------------------------------------------------


def _negative_lse(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> torch.Tensor:
    return forward.negative_lse_forward(x, y, excluded, tau, tf32)


def _negative_lse_product(
    x: torch.Tensor, y: torch.Tensor, excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return forward.negative_lse_product_forward(x, y, excluded, tau, tf32)


def _negative_lse_rows(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> torch.Tensor:
    if y is None:  # anchors = candidates: (E + E^T) x in one symmetric pass
        return backward.backward_rows(x, excluded, tau, lse, grad_lse, tf32)
    # E y = (h / tau) P y, P y recomputed by the forward (the kernel that keeps it for the product op).
    product_lse, product = forward.negative_lse_product_forward(x, y, excluded, tau, tf32)
    return rows_from_product(product_lse, product, lse, tau, grad_lse).to(x.dtype)


def _negative_lse_product_rows(
    x: torch.Tensor, lse: torch.Tensor, product: torch.Tensor, tau: torch.Tensor, grad_lse: torch.Tensor
) -> torch.Tensor:
    return rows_from_product(lse, product, lse, tau, grad_lse).to(x.dtype)


def _negative_lse_columns(
    x: torch.Tensor,
    y: torch.Tensor,
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> torch.Tensor:
    return backward.backward_columns(x, y, excluded, tau, lse, grad_lse, tf32)


negative_lse = _define("triton_negative_lse", _negative_lse)
negative_lse_product = _define("triton_negative_lse_product", _negative_lse_product)
negative_lse_rows = _define("triton_negative_lse_rows", _negative_lse_rows)
negative_lse_product_rows = _define("triton_negative_lse_product_rows", _negative_lse_product_rows)
negative_lse_columns = _define("triton_negative_lse_columns", _negative_lse_columns)


@negative_lse.register_fake
def _(x, y, excluded, tau, tf32):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


@negative_lse_product.register_fake
def _(x, y, excluded, tau, tf32):
    acc = accumulation_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape, dtype=acc)


@negative_lse_rows.register_fake
def _(x, y, excluded, tau, lse, grad_lse, tf32):
    return x.new_empty(x.shape)


@negative_lse_product_rows.register_fake
def _(x, lse, product, tau, grad_lse):
    return x.new_empty(x.shape)


@negative_lse_columns.register_fake
def _(x, y, excluded, tau, lse, grad_lse, tf32):
    return y.new_empty(y.shape)


def _negative_lse_setup(ctx, inputs, output):
    x, y, excluded, tau, tf32 = inputs
    ctx.tf32 = tf32
    ctx.save_for_backward(x, y, excluded, tau, output)


@once_differentiable
def _negative_lse_grad(ctx, grad_lse):
    x, y, excluded, tau, lse = ctx.saved_tensors
    if y is None:  # anchors = candidates: dx = (E + E^T) x in one symmetric row pass
        return negative_lse_rows(x, None, excluded, tau, lse, grad_lse, ctx.tf32), None, None, None, None
    need_dx, need_dy = ctx.needs_input_grad[:2]
    # P y was not kept by this forward (see differentiable_negative_lse): the row op recomputes it.
    dx = negative_lse_rows(x, y, excluded, tau, lse, grad_lse, ctx.tf32) if need_dx else None
    dy = negative_lse_columns(x, y, excluded, tau, lse, grad_lse, ctx.tf32) if need_dy else None
    return dx, dy, None, None, None


_differentiable_lse = register_autograd(negative_lse, _negative_lse_grad, setup_context=_negative_lse_setup)


def _negative_lse_product_setup(ctx, inputs, output):
    x, y, excluded, tau, tf32 = inputs
    lse, product = output
    ctx.tf32 = tf32
    ctx.mark_non_differentiable(product)
    ctx.save_for_backward(x, y, excluded, tau, lse, product)


@once_differentiable
def _negative_lse_product_grad(ctx, grad_lse, _grad_product):
    x, y, excluded, tau, lse, product = ctx.saved_tensors
    need_dx, need_dy = ctx.needs_input_grad[:2]
    dx = negative_lse_product_rows(x, lse, product, tau, grad_lse) if need_dx else None  # no pass over S
    dy = negative_lse_columns(x, y, excluded, tau, lse, grad_lse, ctx.tf32) if need_dy else None
    return dx, dy, None, None, None


_differentiable_lse_product = register_autograd(
    negative_lse_product, _negative_lse_product_grad, setup_context=_negative_lse_product_setup
)


def differentiable_negative_lse(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> torch.Tensor:
    """The lse with its gradient; when ``dx`` will be needed and ``y`` is given, the forward also keeps ``P y``.

    ``dx = (h / tau) P y`` then costs no pass over S in the backward: 4 GEMM passes
    for forward and backward instead of 5 (MATH.md section 7 counts 4).
    """
    if y is not None and torch.is_grad_enabled() and x.requires_grad:
        return _differentiable_lse_product(x, y, excluded, tau, tf32)[0]
    return _differentiable_lse(x, y, excluded, tau, tf32)
