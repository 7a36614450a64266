"""Forward: per block of anchors, an online log-sum-exp over the negatives' logits (MATH.md section 3).

The candidate tiles stream past a block of anchor rows; each tile's similarities
are formed with tl.dot, scaled by 1/tau (read from device memory), masked where a
column is not a negative, and folded into a running maximum and running sum.
Only the per-anchor log-sum-exp (M values) is written.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import FIXED_CONFIGS, SIZES, TUNED_CONFIGS, TUNING_KEY, autotuned, block_d, size_class
from .helpers import dot_acc, excluded_columns, load_tile, similarity_tile
from .launch import Launch, dot_flags


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    TF32: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    if SINGLE_CHUNK:  # all of D in one tile: the anchors are loaded once
        dims = tl.arange(0, BLOCK_D)
        x = load_tile(x_ptr, rows, dims, M, D, stride_xm, stride_xd)

    running_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_M,), ACC)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if SINGLE_CHUNK:
            y = load_tile(y_ptr, cols, dims, C, D, stride_yc, stride_yd)
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
        logits = tl.where(hidden, float("-inf"), sim * inv_tau)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # A row whose negatives all lie in later tiles keeps -inf: shift by 0 there, never by inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        running_max = new_max

    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=rows < M)


negative_lse_tuned = triton.autotune(configs=TUNED_CONFIGS, key=TUNING_KEY)(negative_lse_kernel)
negative_lse_fixed = triton.autotune(configs=FIXED_CONFIGS, key=[])(negative_lse_kernel)


def forward_launch(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> Launch:
    cand = x if y is None else y
    m, d = x.shape
    c = cand.shape[0]
    lse = torch.empty(m, dtype=accumulation_dtype(x.dtype), device=x.device)
    chunk = block_d(d, x.element_size())
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
        BLOCK_D=chunk,
        SINGLE_CHUNK=d <= chunk,
        **dot_flags(x.dtype, tf32),
    )
    kernel = negative_lse_tuned if autotuned(m, c, x.dtype, tf32) else negative_lse_fixed
    return Launch(kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),), args, lse)


def negative_lse_forward(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> torch.Tensor:
    """lse (M,) in the accumulation dtype; ``y=None`` means the anchors are their own candidates."""
    return forward_launch(x, y, excluded, tau, tf32).run()
