"""Backward of the negatives' log-sum-exp, deterministic (MATH.md section 4).

With ``P[r, c] = exp(x[r].y[c] / tau - lse[r])`` on negative columns (0 elsewhere)
and ``E[r, c] = (h[r] / tau) P[r, c]``: ``dx = E y`` and ``dy = E^T x``. As in
fused attention, each pass owns one side of the output and recomputes the
similarity tiles, so every output tile has exactly one writer: no atomics,
bitwise-reproducible.

- ``dx`` when the candidates are given (``cross``, ``queue``): ``(h / tau) P y``
  from the product the forward wrote (forward.py), no pass at all.
- ``dy``, the column pass: one program per (candidate block, embedding chunk).
- ``ntxent`` (``y`` None): S is symmetric and so, for a symmetric exclusion table,
  is the set of negatives. The row pass forms ``E + E^T`` tile by tile and writes
  ``dx = (E + E^T) x`` alone: one score tile and one exp per score
  (:func:`symmetric_factors`), 2 GEMM passes for the whole backward.

The weights meet the other side's rows in ``tl.dot`` in the input type, so for
fp16/bf16 they are rounded; the rule is csrc/lse_math.h's (the C++ kernels), which
this module mirrors. What is rounded is ``p`` times a factor of at most 1, never
``E`` itself (``weight = (h / tau) / max|h / tau|``, the scale applied to the
accumulator at the end). For fp16 that one scale is not enough: one anchor with a
large ``h`` would push every other ``p * weight`` below fp16's subnormals, so each
tile of anchors divides its factors by its own largest ``|weight|`` and multiplies
its product by it in the accumulator (:func:`_tile_scale`; in the symmetric row
pass, per output row and candidate tile, :func:`_tile_scales`: csrc/lse_math.h's
symmetric view, ``symmetric_row_scale``, which the CUDA backend's symmetric pass
runs). bf16 has float32's exponent range and keeps the one scale.

Both passes walk their interior tiles unmasked and mask only the tiles where an
excluded pair falls (see helpers.tile_order); the column pass finds those from a
scan of the exclusion table. Exps are exp2 with log2(e) / tau folded into one FMA.
"""

from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import SIZES, autotuned, chunk_of, fixed, size_class, tuned
from .helpers import (
    LOG2E,
    bounds,
    dot_acc,
    excluded_columns,
    excluding_rows,
    exp2,
    interior_tile,
    load_at,
    masked_tile,
    rounded,
    scores,
    store_tile,
    tile_order,
    tile_pointers,
)
from .launch import Launch

LOG2E_VALUE = math.log2(math.e)
# Widest spread of the base-2 lse over the rows for one exp per score: alpha >= |weight| 2^-96 stays normal
# (csrc/lse_math.h's kSymmetricMaxSpread, the CUDA symmetric pass's).
MAX_SPREAD = 96.0
SCAN_ROWS = tl.constexpr(1024)  # exclusion-table entries per step of the column pass's scan


@triton.jit
def _tile_scale(weight):
    """The column view's scale of one tile of anchors with weights ``weight``: max |weight|, 1 if all are 0.

    For fp16 operands each anchor tile's products are rounded as ``p * weight / tile_scale``
    and multiplied by ``tile_scale`` in the accumulator: one scale for all anchors would
    let one large upstream gradient push every other anchor's ``p * weight`` below fp16's
    subnormals (issue 11). The rule of csrc/lse_math.h (the C++ kernels, which use tiles of
    64 anchors), mirrored here with this kernel's own tile of anchors.
    """
    top = tl.max(tl.abs(weight), axis=0)
    return tl.where(top > 0, top, 1.0)


@triton.jit
def _tile_scales(weight, weight_c):
    """_tile_scale of each output row of the symmetric row pass for one candidate tile: its
    operands ``E[r, c] + E[c, r]`` hold the row's own weight and the tile's anchors' (as
    columns), so the scale of row r is ``max(|weight[r]|, max_c |weight_c[c]|)`` (the rule of
    csrc/lse_math.h's symmetric view, ``symmetric_row_scale``, mirrored here)."""
    top = tl.maximum(tl.abs(weight), tl.max(tl.abs(weight_c), axis=0))
    return tl.where(top > 0, top, 1.0)


@triton.jit
def rows_step(
    acc, x, x_ptrs, y_ptrs, y_chunk_ptrs, rows, cols, dims, M, D, stride_xd, first, second, alpha, lse2, weight,
    alpha_ptr, lse2_ptr, weight_ptr, scale, shift, ONE_EXP: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, TILE_SCALES: tl.constexpr,
):  # fmt: skip
    """acc + (E + E^T)[rows, cols] x[cols] for one candidate tile."""
    y = load_at(y_chunk_ptrs, cols, dims, M, D, MASKED, EVEN_D)
    sim = scores(
        x, y, x_ptrs, y_ptrs, rows, cols, M, M, D, stride_xd, stride_xd, first, second,
        ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, MASKED, False, PRECISION,
    )  # fmt: skip
    # Masked before exp (the positive's term may overflow): hidden entries are -inf, their terms 0.
    if MASKED:
        weight_c = tl.load(weight_ptr + cols, mask=cols < M, other=0.0)
    else:
        weight_c = tl.load(weight_ptr + cols)
    if TILE_SCALES:  # fp16: each output row's own scale for this tile (_tile_scales), 1 / it folded in here
        row_scale = _tile_scales(weight, weight_c)
        inv = 1.0 / row_scale
    else:
        row_scale = weight  # unused
        inv = weight  # unused
    if ONE_EXP:  # E + E^T = 2^(s scale - shift) (alpha[r] + alpha[c]): one exp per score
        if MASKED:
            alpha_c = tl.load(alpha_ptr + cols, mask=cols < M, other=0.0)
        else:
            alpha_c = tl.load(alpha_ptr + cols)
        if TILE_SCALES:
            both = exp2(sim * scale - shift) * ((alpha * inv)[:, None] + alpha_c[None, :] * inv[:, None])
        else:
            both = exp2(sim * scale - shift) * (alpha[:, None] + alpha_c[None, :])
    else:  # lse spread too wide for one shift: w[r] 2^(s scale - lse2[r]) + w[c] 2^(s scale - lse2[c])
        if MASKED:
            lse2_c = tl.load(lse2_ptr + cols, mask=cols < M, other=float("inf"))
        else:
            lse2_c = tl.load(lse2_ptr + cols)
        if TILE_SCALES:
            both = (weight * inv)[:, None] * exp2(sim * scale - lse2[:, None])
            both += (weight_c[None, :] * inv[:, None]) * exp2(sim * scale - lse2_c[None, :])
        else:
            both = weight[:, None] * exp2(sim * scale - lse2[:, None])
            both += weight_c[None, :] * exp2(sim * scale - lse2_c[None, :])
    # Each term <= |weight| <= 1 (<= its row's scale with TILE_SCALES): safe to round to fp16/bf16.
    if TILE_SCALES:
        return acc + row_scale[:, None] * dot_acc(rounded(both, y.dtype), y, tl.zeros_like(acc), PRECISION)
    return dot_acc(rounded(both, y.dtype), y, acc, PRECISION)


@triton.jit(do_not_specialize=SIZES)
def rows_kernel(
    x_ptr,
    excluded_ptr,
    tau_ptr,
    shift_ptr,
    alpha_ptr,
    lse2_ptr,
    weight_ptr,
    weight_scale_ptr,
    out_ptr,
    M,
    D,
    stride_xm,
    stride_xd,
    stride_em,
    stride_ek,
    stride_om,
    stride_od,
    ROWS_CLASS,  # autotuning key only
    COLS_CLASS,  # autotuning key only
    TF32: tl.constexpr,  # autotuning key; PRECISION is derived from it
    ONE_EXP: tl.constexpr,  # this launch's formula; it works only if the spread allows it (shift_ptr[1])
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE_SCALES: tl.constexpr,  # fp16 operands: a scale per tile of anchors (_tile_scale)
):
    ACC = lse2_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1) * BLOCK_D  # the chunk of dx this program writes
    dims = chunk + tl.arange(0, BLOCK_D)
    scale = LOG2E / tl.load(tau_ptr).to(ACC)
    shift = tl.load(shift_ptr)
    active = ((tl.load(shift_ptr + 1) != 0) == ONE_EXP).to(tl.int32)  # 0: the other launch writes dx
    inside = rows < M
    alpha = tl.load(alpha_ptr + rows, mask=inside, other=0.0)
    lse2 = tl.load(lse2_ptr + rows, mask=inside, other=float("inf"))  # rows past M get P = 0
    weight = tl.load(weight_ptr + rows, mask=inside, other=0.0)
    first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    x_ptrs = tile_pointers(x_ptr, rows, tl.arange(0, BLOCK_D), stride_xm, stride_xd)  # the first chunk
    if SINGLE_CHUNK:
        x = load_at(x_ptrs, rows, dims, M, D, True, EVEN_D)
    else:
        x = x_ptr  # unused: scores walks D in chunks
    y_ptrs = tile_pointers(x_ptr, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), stride_xm, stride_xd)  # tile 0
    y_chunk_ptrs = y_ptrs + chunk * stride_xd
    lo1, hi1 = bounds(first)
    lo2, hi2 = bounds(second)
    n_full = M // BLOCK_N
    a1, len1, a2, len2 = tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for k in range(0, (n_full - len1 - len2) * active):
        start = interior_tile(k, a1, len1, a2, len2) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        offset = start.to(tl.int64) * stride_xm
        acc = rows_step(
            acc, x, x_ptrs, y_ptrs + offset, y_chunk_ptrs + offset, rows, cols, dims, M, D, stride_xd, first,
            second, alpha, lse2, weight, alpha_ptr, lse2_ptr, weight_ptr, scale, shift, ONE_EXP, ACC, BLOCK_M,
            BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, False, PRECISION, TILE_SCALES,
        )  # fmt: skip
    for j in range(0, (len1 + len2 + (n_full * BLOCK_N < M).to(tl.int32)) * active):
        start = masked_tile(j, a1, len1, a2, len2, n_full) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        offset = start.to(tl.int64) * stride_xm
        acc = rows_step(
            acc, x, x_ptrs, y_ptrs + offset, y_chunk_ptrs + offset, rows, cols, dims, M, D, stride_xd, first,
            second, alpha, lse2, weight, alpha_ptr, lse2_ptr, weight_ptr, scale, shift, ONE_EXP, ACC, BLOCK_M,
            BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, True, PRECISION, TILE_SCALES,
        )  # fmt: skip

    if active:
        store_tile(out_ptr, acc * tl.load(weight_scale_ptr).to(ACC), rows, dims, M, D, stride_om, stride_od)


@triton.jit
def columns_step(
    acc, y, x_ptrs, x_chunk_ptrs, y_ptrs, excluded_ptr, rows, cols, dims, M, C, D, stride_xd, stride_yd, stride_em,
    stride_ek, alpha_ptr, lse2_ptr, weight_ptr, scale, shift, ONE_EXP: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TILE_SCALES: tl.constexpr,
):  # fmt: skip
    """acc + E[rows, cols]^T x[rows] for one anchor tile."""
    x = load_at(x_chunk_ptrs, rows, dims, M, D, MASKED, EVEN_D)
    if MASKED:
        inside = rows < M
        first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    else:
        inside = rows < M  # unused
        first, second = rows, rows  # unused
    sim_t = scores(
        y, x, y_ptrs, x_ptrs, cols, rows, C, M, D, stride_yd, stride_xd, first, second,
        ACC, BLOCK_N, BLOCK_M, BLOCK_D, SINGLE_CHUNK, EVEN_D, MASKED, True, PRECISION,
    )  # fmt: skip
    # |E| <= |weight| <= 1 (weight = (h / tau) / max|h / tau|), so this tile also fits fp16's range.
    # (Unused with ONE_EXP unless TILE_SCALES: the compiler drops the load.)
    weight = tl.load(weight_ptr + rows, mask=inside, other=0.0) if MASKED else tl.load(weight_ptr + rows)
    if TILE_SCALES:  # fp16: the tile's own scale (csrc/lse_math.h's column view), 1 / it folded into the factors
        tile_scale = _tile_scale(weight)
        inv = 1.0 / tile_scale
    else:
        tile_scale = 1.0  # unused
        inv = 1.0
    if ONE_EXP:  # E = 2^(s scale - shift) alpha[r]: one factor per anchor instead of two
        alpha = tl.load(alpha_ptr + rows, mask=inside, other=0.0) if MASKED else tl.load(alpha_ptr + rows)
        e_t = exp2(sim_t * scale - shift) * (alpha * inv)[None, :]
    else:
        lse2 = tl.load(lse2_ptr + rows, mask=inside, other=float("inf")) if MASKED else tl.load(lse2_ptr + rows)
        e_t = exp2(sim_t * scale - lse2[None, :]) * (weight * inv)[None, :]
    if TILE_SCALES:  # the tile's product, then its scale, in the accumulation type
        return acc + tile_scale * dot_acc(rounded(e_t, x.dtype), x, tl.zeros_like(acc), PRECISION)
    return dot_acc(rounded(e_t, x.dtype), x, acc, PRECISION)


@triton.jit(do_not_specialize=SIZES)
def columns_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    shift_ptr,
    alpha_ptr,
    lse2_ptr,
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
    ONE_EXP: tl.constexpr,  # this launch's formula; it works only if the spread allows it (shift_ptr[1])
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE_SCALES: tl.constexpr,  # fp16 operands: a scale per tile of anchors (_tile_scale)
):
    ACC = lse2_ptr.dtype.element_ty
    start = tl.program_id(0) * BLOCK_N
    cols = start + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1) * BLOCK_D  # the chunk of dy this program writes
    dims = chunk + tl.arange(0, BLOCK_D)
    scale = LOG2E / tl.load(tau_ptr).to(ACC)
    shift = tl.load(shift_ptr)
    active = ((tl.load(shift_ptr + 1) != 0) == ONE_EXP).to(tl.int32)  # 0: the other launch writes dy
    y_ptrs = tile_pointers(y_ptr, cols, tl.arange(0, BLOCK_D), stride_yc, stride_yd)  # the first chunk
    if SINGLE_CHUNK:
        y = load_at(y_ptrs, cols, dims, C, D, True, EVEN_D)
    else:
        y = y_ptr  # unused: scores walks D in chunks
    x_ptrs = tile_pointers(x_ptr, tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), stride_xm, stride_xd)  # tile 0
    x_chunk_ptrs = x_ptrs + chunk * stride_xd
    lo1, hi1, lo2, hi2 = excluding_rows(excluded_ptr, M, stride_em, stride_ek, start, start + BLOCK_N, SCAN_ROWS)
    n_full = M // BLOCK_M
    a1, len1, a2, len2 = tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK_M)

    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for k in range(0, (n_full - len1 - len2) * active):
        row_start = interior_tile(k, a1, len1, a2, len2) * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        offset = row_start.to(tl.int64) * stride_xm
        acc = columns_step(
            acc, y, x_ptrs + offset, x_chunk_ptrs + offset, y_ptrs, excluded_ptr, rows, cols, dims, M, C, D,
            stride_xd, stride_yd, stride_em, stride_ek, alpha_ptr, lse2_ptr, weight_ptr, scale, shift, ONE_EXP, ACC,
            BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, False, PRECISION, TILE_SCALES,
        )  # fmt: skip
    for j in range(0, (len1 + len2 + (n_full * BLOCK_M < M).to(tl.int32)) * active):
        row_start = masked_tile(j, a1, len1, a2, len2, n_full) * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        offset = row_start.to(tl.int64) * stride_xm
        acc = columns_step(
            acc, y, x_ptrs + offset, x_chunk_ptrs + offset, y_ptrs, excluded_ptr, rows, cols, dims, M, C, D,
            stride_xd, stride_yd, stride_em, stride_ek, alpha_ptr, lse2_ptr, weight_ptr, scale, shift, ONE_EXP, ACC,
            BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, True, PRECISION, TILE_SCALES,
        )  # fmt: skip

    if active:
        store_tile(out_ptr, acc * tl.load(weight_scale_ptr).to(ACC), cols, dims, C, D, stride_oc, stride_od)


rows_tuned = tuned(rows_kernel, "backward", score_tiles=1)
rows_fixed = fixed(rows_kernel, "backward", score_tiles=1)
columns_tuned = tuned(columns_kernel, "columns", resident="BLOCK_N", score_tiles=2)
columns_fixed = fixed(columns_kernel, "columns", resident="BLOCK_N", score_tiles=2)


def _weights(grad_lse: torch.Tensor, tau: torch.Tensor, acc: torch.dtype):
    """Per-row h / tau, as (weights in [-1, 1], their common scale): fp16-safe operands for the dots."""
    coef = grad_lse.to(acc) / tau.to(acc)
    scale = coef.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (coef / scale).contiguous(), scale


def _base2(lse: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """lse in base 2; +inf where it is not finite (a row without negatives): its terms are then 0."""
    lse2 = lse.to(acc) * LOG2E_VALUE
    return torch.where(torch.isfinite(lse2), lse2, torch.full_like(lse2, float("inf"))).contiguous()


def shared_shift(lse2: torch.Tensor, weight: torch.Tensor):
    """(shift, alpha) that give each entry of E with one shared shift: ``E[r, c] = 2^(s scale - shift) alpha[r]``.

    With ``shift = min lse2`` and ``alpha = weight 2^(shift - lse2)`` this is exactly
    ``weight[r] 2^(s scale - lse2[r])``, with one factor per row instead of two (the
    column pass) and, for ``E + E^T``, one exp per score (the symmetric row pass:
    ``2^(s scale - shift) (alpha[r] + alpha[c])``). No factor overflows (``s scale <= lse2``
    for a negative, so the exp is at most 2^spread, and ``|alpha| <= 1``) and a term that
    flushes to 0 is below 2^-126 as before. A spread of lse2 over MAX_SPREAD (tiny tau)
    would push alpha towards fp32's subnormals: ``shift``'s second entry then says so,
    and the launch with one exp per (row, score) pair writes the gradient instead.
    """
    finite = torch.isfinite(lse2)
    low = torch.where(finite, lse2, torch.full_like(lse2, float("inf"))).amin()
    high = torch.where(finite, lse2, torch.full_like(lse2, float("-inf"))).amax()
    alpha = torch.where(finite, weight * torch.exp2(low - lse2), torch.zeros_like(lse2))
    one_exp = (high - low <= MAX_SPREAD).to(lse2.dtype)
    return torch.stack([low, one_exp]), alpha.contiguous()


def _both_formulas(kernel, fallback, grid, args: dict, out: torch.Tensor) -> List[Launch]:
    """Both launches run: one shift for all (``kernel``), else the one exits at once and ``fallback`` works."""
    return [Launch(kernel, grid, dict(args, ONE_EXP=True), out), Launch(fallback, grid, dict(args, ONE_EXP=False), out)]


def rows_launches(
    x: torch.Tensor, excluded: torch.Tensor, tau: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor, tf32: bool
) -> List[Launch]:
    m, d = x.shape
    acc = accumulation_dtype(x.dtype)
    weight, weight_scale = _weights(grad_lse, tau, acc)
    lse2 = _base2(lse, acc)
    shift, alpha = shared_shift(lse2, weight)
    out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    args = dict(
        x_ptr=x,
        excluded_ptr=excluded,
        tau_ptr=tau,
        shift_ptr=shift,
        alpha_ptr=alpha,
        lse2_ptr=lse2,
        weight_ptr=weight,
        weight_scale_ptr=weight_scale,
        out_ptr=out,
        M=m,
        D=d,
        stride_xm=x.stride(0),
        stride_xd=x.stride(1),
        stride_em=excluded.stride(0),
        stride_ek=excluded.stride(1),
        stride_om=out.stride(0),
        stride_od=out.stride(1),
        ROWS_CLASS=size_class(m),
        COLS_CLASS=size_class(m),
        TF32=bool(tf32),
        BLOCK_D=chunk_of(x, tf32, gradient=True),
        TILE_SCALES=x.dtype == torch.float16,
    )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    return _both_formulas(rows_tuned if autotuned(m, m, x.dtype) else rows_fixed, rows_fixed, grid, args, out)


def backward_rows(
    x: torch.Tensor, excluded: torch.Tensor, tau: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor, tf32: bool
) -> torch.Tensor:
    """``(E + E^T) x`` in x's dtype, the anchors being their own candidates (the exclusions must be symmetric)."""
    return Launch.run_all(rows_launches(x, excluded, tau, lse, grad_lse, tf32))


def columns_launches(
    x: torch.Tensor,
    y: torch.Tensor,
    excluded: torch.Tensor,
    tau: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    tf32: bool,
) -> List[Launch]:
    m, d = x.shape
    c = y.shape[0]
    acc = accumulation_dtype(x.dtype)
    weight, weight_scale = _weights(grad_lse, tau, acc)
    lse2 = _base2(lse, acc)
    shift, alpha = shared_shift(lse2, weight)
    out = torch.empty((c, d), dtype=y.dtype, device=x.device)
    args = dict(
        x_ptr=x,
        y_ptr=y,
        excluded_ptr=excluded,
        tau_ptr=tau,
        shift_ptr=shift,
        alpha_ptr=alpha,
        lse2_ptr=lse2,
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
        BLOCK_D=chunk_of(x, tf32, gradient=True),
        TILE_SCALES=x.dtype == torch.float16,
    )
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    kernel = columns_tuned if autotuned(m, c, x.dtype) else columns_fixed
    return _both_formulas(kernel, columns_fixed, grid, args, out)


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
    return Launch.run_all(columns_launches(x, y, excluded, tau, lse, grad_lse, tf32))
