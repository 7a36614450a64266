"""Backward of the negatives' log-sum-exp, deterministic: a row pass and a column pass (MATH.md section 4).

With ``E[r, c] = (h[r] / tau) * exp(x[r].y[c] / tau - lse[r])`` on negative
columns (0 elsewhere), ``dx = E y`` and ``dy = E^T x``. As in fused attention,
each pass owns one side of the output and recomputes the similarity tiles, so
every output tile has exactly one writer: no atomics, bitwise-reproducible.

- row pass: one program per (anchor block, embedding chunk) writes ``dx``;
- column pass: one program per (candidate block, embedding chunk) writes ``dy``.
  When the anchors are their own candidates (``ntxent``), it adds the row pass's
  ``E x`` to ``E^T x``, so ``dx = (E + E^T) x`` comes out of the second pass.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import FIXED_CONFIGS, SIZES, TUNED_CONFIGS, TUNING_KEY, autotuned, block_d, size_class
from .helpers import dot_acc, excluded_columns, load_tile, rounded, similarity_tile, store_tile
from .launch import Launch, dot_flags


@triton.jit(do_not_specialize=SIZES)
def rows_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    lse_ptr,
    grad_ptr,
    out_ptr,
    M,
    C,
    D,
    stride_xm,
    stride_xd,
    stride_yc,
    stride_yd,
    stride_em,
    stride_ek,
    stride_om,
    stride_od,
    ROWS_CLASS,  # autotuning key only
    COLS_CLASS,  # autotuning key only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    TF32: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # the chunk of dx this program writes
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    inside = rows < M
    lse = tl.load(lse_ptr + rows, mask=inside, other=float("inf"))  # rows past M get weight exp(-inf) = 0
    coef = tl.load(grad_ptr + rows, mask=inside, other=0.0).to(ACC) * inv_tau
    first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    if SINGLE_CHUNK:
        x = load_tile(x_ptr, rows, dims, M, D, stride_xm, stride_xd)

    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        y = load_tile(y_ptr, cols, dims, C, D, stride_yc, stride_yd)
        if SINGLE_CHUNK:
            sim = dot_acc(x, tl.trans(y), tl.zeros((BLOCK_M, BLOCK_N), ACC), TF32, INTERPRETER)
        else:
            sim = similarity_tile(
                x_ptr,
                y_ptr,
                rows,
                cols,
                M,
                C,
                D,
                stride_xm,
                stride_xd,
                stride_yc,
                stride_yd,
                ACC,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                TF32,
                INTERPRETER,
            )
        hidden = (cols[None, :] >= C) | (cols[None, :] == first[:, None]) | (cols[None, :] == second[:, None])
        # Masked before exp (the positive's term may overflow); the probabilities are <= 1,
        # safe to round to fp16/bf16 for the tensor cores.
        prob = tl.exp(tl.where(hidden, float("-inf"), sim * inv_tau) - lse[:, None])
        acc = dot_acc(rounded(prob, y.dtype, INTERPRETER), y, acc, TF32, INTERPRETER)

    store_tile(out_ptr, acc * coef[:, None], rows, dims, M, D, stride_om, stride_od, INTERPRETER)


@triton.jit(do_not_specialize=SIZES)
def columns_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    lse_ptr,
    weight_ptr,
    weight_scale_ptr,
    partial_ptr,
    out_ptr,
    M,
    C,
    D,
    stride_xm,
    stride_xd,
    stride_yc,
    stride_yd,
    stride_em,
    stride_ek,
    stride_pc,
    stride_pd,
    stride_oc,
    stride_od,
    ROWS_CLASS,  # autotuning key only
    COLS_CLASS,  # autotuning key only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    TF32: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # the chunk of dy this program writes
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    if SINGLE_CHUNK:
        y = load_tile(y_ptr, cols, dims, C, D, stride_yc, stride_yd)

    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        inside = rows < M
        x = load_tile(x_ptr, rows, dims, M, D, stride_xm, stride_xd)
        if SINGLE_CHUNK:
            sim_t = dot_acc(y, tl.trans(x), tl.zeros((BLOCK_N, BLOCK_M), ACC), TF32, INTERPRETER)
        else:
            sim_t = similarity_tile(
                y_ptr,
                x_ptr,
                cols,
                rows,
                C,
                M,
                D,
                stride_yc,
                stride_yd,
                stride_xm,
                stride_xd,
                ACC,
                BLOCK_N,
                BLOCK_M,
                BLOCK_D,
                TF32,
                INTERPRETER,
            )
        lse = tl.load(lse_ptr + rows, mask=inside, other=float("inf"))
        weight = tl.load(weight_ptr + rows, mask=inside, other=0.0)
        first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
        hidden = (cols[:, None] >= C) | (cols[:, None] == first[None, :]) | (cols[:, None] == second[None, :])
        # weight = (h / tau) / max|h / tau| is in [-1, 1], so this tile also fits fp16's range.
        e_t = tl.exp(tl.where(hidden, float("-inf"), sim_t * inv_tau) - lse[None, :]) * weight[None, :]
        acc = dot_acc(rounded(e_t, x.dtype, INTERPRETER), x, acc, TF32, INTERPRETER)

    out = acc * tl.load(weight_scale_ptr).to(ACC)
    if HAS_PARTIAL:
        out += load_tile(partial_ptr, cols, dims, C, D, stride_pc, stride_pd)
    store_tile(out_ptr, out, cols, dims, C, D, stride_oc, stride_od, INTERPRETER)


rows_tuned = triton.autotune(configs=TUNED_CONFIGS, key=TUNING_KEY)(rows_kernel)
rows_fixed = triton.autotune(configs=FIXED_CONFIGS, key=[])(rows_kernel)
columns_tuned = triton.autotune(configs=TUNED_CONFIGS, key=TUNING_KEY)(columns_kernel)
columns_fixed = triton.autotune(configs=FIXED_CONFIGS, key=[])(columns_kernel)


def rows_launch(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
    partial: bool,
) -> Launch:
    cand = x if y is None else y
    m, d = x.shape
    c = cand.shape[0]
    acc = accumulation_dtype(x.dtype)
    out = torch.empty((m, d), dtype=acc if partial else x.dtype, device=x.device)
    chunk = block_d(d, x.element_size())
    args = dict(
        x_ptr=x,
        y_ptr=cand,
        excluded_ptr=excluded,
        tau_ptr=tau,
        lse_ptr=lse,
        grad_ptr=grad_lse.to(acc).contiguous(),
        out_ptr=out,
        M=m,
        C=c,
        D=d,
        stride_xm=x.stride(0),
        stride_xd=x.stride(1),
        stride_yc=cand.stride(0),
        stride_yd=cand.stride(1),
        stride_em=excluded.stride(0),
        stride_ek=excluded.stride(1),
        stride_om=out.stride(0),
        stride_od=out.stride(1),
        ROWS_CLASS=size_class(m),
        COLS_CLASS=size_class(c),
        BLOCK_D=chunk,
        SINGLE_CHUNK=d <= chunk,
        **dot_flags(x.dtype, tf32),
    )
    kernel = rows_tuned if autotuned(m, c, x.dtype, tf32) else rows_fixed
    return Launch(kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"])), args, out)


def backward_rows(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
    partial: bool,
) -> torch.Tensor:
    """``E y`` (``E x`` when ``y`` is None): in x's dtype, or the accumulation dtype for a ``partial``."""
    return rows_launch(x, y, excluded, tau, lse, grad_lse, tf32, partial).run()


def columns_launch(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
    rows_partial: Optional[torch.Tensor],
) -> Launch:
    cand = x if y is None else y
    m, d = x.shape
    c = cand.shape[0]
    acc = accumulation_dtype(x.dtype)
    coef = grad_lse.to(acc) / tau.to(acc)
    # Factor out the largest |h / tau| so the per-row weights fed to a half-precision dot lie in [-1, 1].
    scale = coef.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = torch.empty((c, d), dtype=cand.dtype, device=x.device)
    partial = lse if rows_partial is None else rows_partial  # an unused pointer when there is no partial
    chunk = block_d(d, x.element_size())
    args = dict(
        x_ptr=x,
        y_ptr=cand,
        excluded_ptr=excluded,
        tau_ptr=tau,
        lse_ptr=lse,
        weight_ptr=(coef / scale).contiguous(),
        weight_scale_ptr=scale,
        partial_ptr=partial,
        out_ptr=out,
        M=m,
        C=c,
        D=d,
        stride_xm=x.stride(0),
        stride_xd=x.stride(1),
        stride_yc=cand.stride(0),
        stride_yd=cand.stride(1),
        stride_em=excluded.stride(0),
        stride_ek=excluded.stride(1),
        stride_pc=0 if rows_partial is None else rows_partial.stride(0),
        stride_pd=0 if rows_partial is None else rows_partial.stride(1),
        stride_oc=out.stride(0),
        stride_od=out.stride(1),
        ROWS_CLASS=size_class(m),
        COLS_CLASS=size_class(c),
        BLOCK_D=chunk,
        SINGLE_CHUNK=d <= chunk,
        HAS_PARTIAL=rows_partial is not None,
        **dot_flags(x.dtype, tf32),
    )
    kernel = columns_tuned if autotuned(m, c, x.dtype, tf32) else columns_fixed
    return Launch(kernel, lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"])), args, out)


def backward_columns(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
    rows_partial: Optional[torch.Tensor],
) -> torch.Tensor:
    """``E^T x`` in the candidates' dtype, plus ``rows_partial`` (the row pass's ``E x``) when given."""
    return columns_launch(x, y, excluded, tau, lse, grad_lse, tf32, rows_partial).run()
