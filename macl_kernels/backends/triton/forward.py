"""Forward: per block of anchors, an online log-sum-exp over the negatives' logits (MATH.md section 3).

The candidate tiles stream past a block of anchor rows; each tile's similarities
are formed with tl.dot and folded into a running maximum and running sum in base 2
(``exp2(s * log2(e)/tau - max)``: one FMA and one MUFU.EX2 per score, tau read from
device memory). Interior tiles are not masked at all; only the few tiles that hold
an anchor's excluded column (per anchor block, the tiles between the smallest and
largest excluded column of each of the two exclusion slots) or the ragged edge are
(helpers.tile_order). Only the per-anchor log-sum-exp (M values) is written.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import SIZES, autotuned, block_d, fixed, size_class, tuned
from .helpers import (
    LN2,
    LOG2E,
    bounds,
    excluded_columns,
    exp2,
    interior_tile,
    load_tile,
    masked_tile,
    scores,
    tile_order,
)
from .launch import Launch


@triton.jit
def lse_step(
    running_max, running_sum, x, x_ptr, y_ptr, rows, cols, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd,
    first, second, scale, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One candidate tile folded into the per-row running max and sum, in base 2."""
    if SINGLE_CHUNK:
        y = load_tile(y_ptr, cols, tl.arange(0, BLOCK_D), C, D, stride_yc, stride_yd, MASKED, EVEN_D)
    else:
        y = y_ptr  # unused: scores walks D in chunks
    sim = scores(
        x, y, x_ptr, y_ptr, rows, cols, M, C, D, stride_xm, stride_xd, stride_yc, stride_yd, first, second,
        ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, MASKED, False, PRECISION,
    )  # fmt: skip
    new_max = tl.maximum(running_max, tl.max(sim, axis=1) * scale)  # scale > 0: the max before scaling
    # A row whose negatives all lie in later tiles keeps -inf: shift by 0 there, never by inf.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    terms = exp2(sim * scale - shift[:, None])  # one FFMA and one MUFU.EX2 per element
    return new_max, running_sum * exp2(running_max - shift) + tl.sum(terms, axis=1)


@triton.jit(do_not_specialize=SIZES)
def negative_lse_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    lse_ptr,
    M,
    C,
    D,
    stride_xm,
    stride_xd,
    stride_yc,
    stride_yd,
    stride_em,
    stride_ek,
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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = LOG2E / tl.load(tau_ptr).to(ACC)  # logits in base 2: one multiply-add before exp2
    first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    if SINGLE_CHUNK:  # all of D in one tile: the anchors are loaded once
        x = load_tile(x_ptr, rows, tl.arange(0, BLOCK_D), M, D, stride_xm, stride_xd, True, EVEN_D)
    else:
        x = x_ptr  # unused: scores walks D in chunks
    # Tiles holding an excluded column or the ragged edge are masked; the others are not.
    lo1, hi1 = bounds(first)
    lo2, hi2 = bounds(second)
    n_full = C // BLOCK_N
    a1, len1, a2, len2 = tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK_N)

    running_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_M,), ACC)
    for k in range(0, n_full - len1 - len2):
        cols = interior_tile(k, a1, len1, a2, len2) * BLOCK_N + tl.arange(0, BLOCK_N)
        running_max, running_sum = lse_step(
            running_max, running_sum, x, x_ptr, y_ptr, rows, cols, M, C, D, stride_xm, stride_xd, stride_yc,
            stride_yd, first, second, scale, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, False, PRECISION,
        )  # fmt: skip
    for j in range(0, len1 + len2 + (n_full * BLOCK_N < C).to(tl.int32)):
        cols = masked_tile(j, a1, len1, a2, len2, n_full) * BLOCK_N + tl.arange(0, BLOCK_N)
        running_max, running_sum = lse_step(
            running_max, running_sum, x, x_ptr, y_ptr, rows, cols, M, C, D, stride_xm, stride_xd, stride_yc,
            stride_yd, first, second, scale, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, True, PRECISION,
        )  # fmt: skip

    tl.store(lse_ptr + rows, (running_max + tl.log2(running_sum)) * LN2, mask=rows < M)


negative_lse_tuned = tuned(negative_lse_kernel)
negative_lse_fixed = fixed(negative_lse_kernel)


def forward_launch(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> Launch:
    cand = x if y is None else y
    m, d = x.shape
    c = cand.shape[0]
    lse = torch.empty(m, dtype=accumulation_dtype(x.dtype), device=x.device)
    args = dict(
        x_ptr=x,
        y_ptr=cand,
        excluded_ptr=excluded,
        tau_ptr=tau,
        lse_ptr=lse,
        M=m,
        C=c,
        D=d,
        stride_xm=x.stride(0),
        stride_xd=x.stride(1),
        stride_yc=cand.stride(0),
        stride_yd=cand.stride(1),
        stride_em=excluded.stride(0),
        stride_ek=excluded.stride(1),
        ROWS_CLASS=size_class(m),
        COLS_CLASS=size_class(c),
        TF32=bool(tf32),
        BLOCK_D=block_d(d, x.element_size()),
    )
    kernel = negative_lse_tuned if autotuned(m, c, x.dtype) else negative_lse_fixed
    return Launch(kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),), args, lse)


def negative_lse_forward(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> torch.Tensor:
    """lse (M,) in the accumulation dtype; ``y=None`` means the anchors are their own candidates."""
    return forward_launch(x, y, excluded, tau, tf32).run()
