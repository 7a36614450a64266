"""Backward of the negatives' log-sum-exp, deterministic: row and column passes (MATH.md section 4).

With ``P[r, c] = exp(x[r].y[c] / tau - lse[r])`` on negative columns (0 elsewhere)
and ``E[r, c] = (h[r] / tau) P[r, c]``: ``dx = E y`` and ``dy = E^T x``. As in
fused attention, each pass owns one side of the output and recomputes the
similarity tiles, so every output tile has exactly one writer: no atomics,
bitwise-reproducible.

- row pass: one program per (anchor block, embedding chunk) writes ``dx``.
  When the anchors are their own candidates (``ntxent``, ``y`` None), S is
  symmetric and so, for a symmetric exclusion table, is the set of negatives: the
  row pass then forms ``E + E^T`` tile by tile (two exps per score, one score tile)
  and writes ``dx = (E + E^T) x`` alone: 2 GEMM passes for the whole backward.
- column pass (``y`` given): one program per (candidate block, embedding chunk) writes ``dy``.

Both passes walk their interior tiles unmasked and mask only the tiles where an
excluded pair falls (see helpers.tile_order); the column pass finds those from a
scan of the exclusion table. Exps are exp2 with log2(e) / tau folded into one FMA.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import SIZES, autotuned, block_d, fixed, size_class, tuned
from .helpers import (
    LOG2E,
    bounds,
    dot_acc,
    excluded_columns,
    excluding_rows,
    exp2,
    interior_tile,
    load_tile,
    masked_tile,
    rounded,
    scores,
    store_tile,
    tile_order,
)
from .launch import Launch

SCAN_ROWS = tl.constexpr(1024)  # exclusion-table entries per step of the column pass's scan


@triton.jit
def rows_step(
    acc, x, x_ptr, y_ptr, rows, cols, dims, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd, first, second,
    lse2, weight, lse_ptr, weight_ptr, scale, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + W y[cols] for one candidate tile: W = P, or W = w[r] P + w[c] P^T's entry when SYMMETRIC."""
    y = load_tile(y_ptr, cols, dims, C, D, stride_yc, stride_yd, MASKED, EVEN_D)
    sim = scores(
        x, y, x_ptr, y_ptr, rows, cols, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd, first, second,
        ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, MASKED, False, PRECISION,
    )  # fmt: skip
    # Masked before exp (the positive's term may overflow): hidden entries are -inf, their P is 0.
    prob = exp2(sim * scale - lse2[:, None])
    if SYMMETRIC:
        if MASKED:
            inside = cols < C
            lse2_c = tl.load(lse_ptr + cols, mask=inside, other=float("inf")) * LOG2E
            weight_c = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        else:
            lse2_c = tl.load(lse_ptr + cols) * LOG2E
            weight_c = tl.load(weight_ptr + cols)
        prob = weight[:, None] * prob + weight_c[None, :] * exp2(sim * scale - lse2_c[None, :])
    # P <= 1 and the weights are in [-1, 1]: safe to round to fp16/bf16 for the tensor cores.
    return dot_acc(rounded(prob, y.dtype), y, acc, PRECISION)


@triton.jit(do_not_specialize=SIZES)
def rows_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    lse_ptr,
    weight_ptr,
    weight_scale_ptr,
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
    TF32: tl.constexpr,  # autotuning key; PRECISION is derived from it
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # the chunk of dx this program writes
    scale = LOG2E / tl.load(tau_ptr).to(ACC)
    inside = rows < M
    lse2 = tl.load(lse_ptr + rows, mask=inside, other=float("inf")) * LOG2E  # rows past M get P = 0
    weight = tl.load(weight_ptr + rows, mask=inside, other=0.0)
    first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    if SINGLE_CHUNK:
        x = load_tile(x_ptr, rows, dims, M, D, stride_xm, stride_xd, True, EVEN_D)
    else:
        x = x_ptr  # unused: scores walks D in chunks
    lo1, hi1 = bounds(first)
    lo2, hi2 = bounds(second)
    n_full = C // BLOCK_N
    a1, len1, a2, len2 = tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for k in range(0, n_full - len1 - len2):
        cols = interior_tile(k, a1, len1, a2, len2) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = rows_step(
            acc, x, x_ptr, y_ptr, rows, cols, dims, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd, first,
            second, lse2, weight, lse_ptr, weight_ptr, scale, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D,
            False, SYMMETRIC, PRECISION,
        )  # fmt: skip
    for j in range(0, len1 + len2 + (n_full * BLOCK_N < C).to(tl.int32)):
        cols = masked_tile(j, a1, len1, a2, len2, n_full) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = rows_step(
            acc, x, x_ptr, y_ptr, rows, cols, dims, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd, first,
            second, lse2, weight, lse_ptr, weight_ptr, scale, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D,
            True, SYMMETRIC, PRECISION,
        )  # fmt: skip

    weight_scale = tl.load(weight_scale_ptr).to(ACC)
    if SYMMETRIC:
        out = acc * weight_scale
    else:  # the row weights commute with the dot: applied once here
        out = acc * (weight * weight_scale)[:, None]
    store_tile(out_ptr, out, rows, dims, M, D, stride_om, stride_od)


@triton.jit
def columns_step(
    acc, y, x_ptr, y_ptr, excluded_ptr, rows, cols, dims, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd,
    stride_em, stride_ek, lse_ptr, weight_ptr, scale, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + E[rows, cols]^T x[rows] for one anchor tile."""
    x = load_tile(x_ptr, rows, dims, M, D, stride_xm, stride_xd, MASKED, EVEN_D)
    if MASKED:
        inside = rows < M
        lse2 = tl.load(lse_ptr + rows, mask=inside, other=float("inf")) * LOG2E
        weight = tl.load(weight_ptr + rows, mask=inside, other=0.0)
        first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    else:
        lse2 = tl.load(lse_ptr + rows) * LOG2E
        weight = tl.load(weight_ptr + rows)
        first, second = rows, rows  # unused
    sim_t = scores(
        y, x, y_ptr, x_ptr, cols, rows, C, M, D, stride_yc, stride_yd, stride_xm, stride_xd, first, second,
        ACC, BLOCK_N, BLOCK_M, BLOCK_D, SINGLE_CHUNK, EVEN_D, MASKED, True, PRECISION,
    )  # fmt: skip
    # weight = (h / tau) / max|h / tau| is in [-1, 1], so this tile also fits fp16's range.
    e_t = exp2(sim_t * scale - lse2[None, :]) * weight[None, :]
    return dot_acc(rounded(e_t, x.dtype), x, acc, PRECISION)


@triton.jit(do_not_specialize=SIZES)
def columns_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    lse_ptr,
    weight_ptr,
    weight_scale_ptr,
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
    stride_oc,
    stride_od,
    ROWS_CLASS,  # autotuning key only
    COLS_CLASS,  # autotuning key only
    TF32: tl.constexpr,  # autotuning key; PRECISION is derived from it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    start = tl.program_id(0) * BLOCK_N
    cols = start + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # the chunk of dy this program writes
    scale = LOG2E / tl.load(tau_ptr).to(ACC)
    if SINGLE_CHUNK:
        y = load_tile(y_ptr, cols, dims, C, D, stride_yc, stride_yd, True, EVEN_D)
    else:
        y = y_ptr  # unused: scores walks D in chunks
    lo1, hi1, lo2, hi2 = excluding_rows(excluded_ptr, M, stride_em, stride_ek, start, start + BLOCK_N, SCAN_ROWS)
    n_full = M // BLOCK_M
    a1, len1, a2, len2 = tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK_M)

    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for k in range(0, n_full - len1 - len2):
        rows = interior_tile(k, a1, len1, a2, len2) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = columns_step(
            acc, y, x_ptr, y_ptr, excluded_ptr, rows, cols, dims, M, C, D, stride_xm, stride_xd, stride_yc,
            stride_yd, stride_em, stride_ek, lse_ptr, weight_ptr, scale, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
            SINGLE_CHUNK, EVEN_D, False, PRECISION,
        )  # fmt: skip
    for j in range(0, len1 + len2 + (n_full * BLOCK_M < M).to(tl.int32)):
        rows = masked_tile(j, a1, len1, a2, len2, n_full) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = columns_step(
            acc, y, x_ptr, y_ptr, excluded_ptr, rows, cols, dims, M, C, D, stride_xm, stride_xd, stride_yc,
            stride_yd, stride_em, stride_ek, lse_ptr, weight_ptr, scale, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
            SINGLE_CHUNK, EVEN_D, True, PRECISION,
        )  # fmt: skip

    store_tile(out_ptr, acc * tl.load(weight_scale_ptr).to(ACC), cols, dims, C, D, stride_oc, stride_od)


rows_tuned = tuned(rows_kernel, score_tiles=1)
rows_fixed = fixed(rows_kernel)
columns_tuned = tuned(columns_kernel, resident="BLOCK_N", score_tiles=2)
columns_fixed = fixed(columns_kernel)


def _weights(grad_lse: torch.Tensor, tau: torch.Tensor, acc: torch.dtype):
    """Per-row h / tau, as (weights in [-1, 1], their common scale): fp16-safe operands for the dots."""
    coef = grad_lse.to(acc) / tau.to(acc)
    scale = coef.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (coef / scale).contiguous(), scale


def rows_launch(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> Launch:
    cand = x if y is None else y
    m, d = x.shape
    c = cand.shape[0]
    weight, weight_scale = _weights(grad_lse, tau, accumulation_dtype(x.dtype))
    out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    args = dict(
        x_ptr=x,
        y_ptr=cand,
        excluded_ptr=excluded,
        tau_ptr=tau,
        lse_ptr=lse,
        weight_ptr=weight,
        weight_scale_ptr=weight_scale,
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
        TF32=bool(tf32),
        SYMMETRIC=y is None,
        BLOCK_D=block_d(d, x.element_size(), gradient=True),
    )
    kernel = rows_tuned if autotuned(m, c, x.dtype) else rows_fixed
    return Launch(kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"])), args, out)


def backward_rows(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> torch.Tensor:
    """``E y`` in x's dtype; ``(E + E^T) x`` when ``y`` is None (then the exclusions must be symmetric)."""
    return rows_launch(x, y, excluded, tau, lse, grad_lse, tf32).run()


def columns_launch(
    x: torch.Tensor,
    y: torch.Tensor,
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> Launch:
    m, d = x.shape
    c = y.shape[0]
    weight, weight_scale = _weights(grad_lse, tau, accumulation_dtype(x.dtype))
    out = torch.empty((c, d), dtype=y.dtype, device=x.device)
    args = dict(
        x_ptr=x,
        y_ptr=y,
        excluded_ptr=excluded,
        tau_ptr=tau,
        lse_ptr=lse,
        weight_ptr=weight,
        weight_scale_ptr=weight_scale,
        out_ptr=out,
        M=m,
        C=c,
        D=d,
        stride_xm=x.stride(0),
        stride_xd=x.stride(1),
        stride_yc=y.stride(0),
        stride_yd=y.stride(1),
        stride_em=excluded.stride(0),
        stride_ek=excluded.stride(1),
        stride_oc=out.stride(0),
        stride_od=out.stride(1),
        ROWS_CLASS=size_class(m),
        COLS_CLASS=size_class(c),
        TF32=bool(tf32),
        BLOCK_D=block_d(d, x.element_size(), gradient=True),
    )
    kernel = columns_tuned if autotuned(m, c, x.dtype) else columns_fixed
    return Launch(kernel, lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"])), args, out)


def backward_columns(
    x: torch.Tensor,
    y: torch.Tensor,
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> torch.Tensor:
    """``E^T x`` in the candidates' dtype."""
    return columns_launch(x, y, excluded, tau, lse, grad_lse, tf32).run()
