"""Forward: per block of anchors, the log-sum-exp over the negatives' logits (MATH.md section 3).

The candidate tiles stream past a block of anchor rows; each tile's similarities
are formed with tl.dot and summed as ``exp2(s * log2(e)/tau - shift)`` (one FMA and
one MUFU.EX2 per score, tau read from device memory). Interior tiles are not
masked at all; only the few tiles that hold an anchor's excluded column (per anchor
block, the tiles between the smallest and largest excluded column of each of the
two exclusion slots) or the ragged edge are (helpers.tile_order). Tile addresses
are computed once per program and moved by a scalar offset per tile.

The shift. The rows are L2-normalized (backends.base), so ``s <= 1`` and a fixed
shift of ``log2(e)/tau`` (the logit of s = 1) keeps every term <= 1: no running
maximum, no rescaling. A row's sum is then exact unless its terms are too small
(tiny tau, or no negative near the anchor): so a row whose sum falls outside
[2^-60, 2^100] is marked NaN, and a second launch (``ONLINE``) recomputes the
blocks holding such rows with the classic running maximum (online softmax),
leaving the others untouched. With unit rows and tau above ~0.024 no term leaves
fp32's normal range and every program of the repair launch exits at once.

``WITH_PRODUCT`` also writes ``P y`` (``P[r, c] = exp(s_rc/tau - lse_r)`` over the
negatives): the row-side gradient of the loss is then ``dx = (h/tau) P y`` without
another pass over S (fused attention's forward with V = y). The product is walked
in embedding chunks of at most 128 (one program per anchor block and chunk); fp16
cannot hold the fixed shift's terms, so fp16 products always take the running maximum.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import SIZES, autotuned, chunk_of, fixed, size_class, tuned
from .helpers import (
    LN2,
    LOG2E,
    bounds,
    dot_acc,
    excluded_columns,
    exp2,
    interior_tile,
    load_at,
    masked_tile,
    rounded,
    scores,
    tile_order,
    tile_pointers,
)
from .launch import Launch

# A fixed-shift row sum inside this range is exact to fp32 rounding (terms that flush to 0 are < 2^-126 each).
LOWEST_SUM = tl.constexpr(2.0**-60)
HIGHEST_SUM = tl.constexpr(2.0**100)


@triton.jit
def lse_step(
    run_max, total, acc, x, x_ptrs, y_ptrs, y_chunk_ptrs, rows, cols, dims, M, C, D, stride_xd, stride_yd,
    first, second, scale, ONLINE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    WITH_PRODUCT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One candidate tile folded into the per-row shift, sum and (``WITH_PRODUCT``) P y accumulator, in base 2."""
    if SINGLE_CHUNK or WITH_PRODUCT:
        y = load_at(y_chunk_ptrs, cols, dims, C, D, MASKED, EVEN_D)
    else:
        y = y_ptrs  # unused: scores walks D in chunks
    sim = scores(
        x, y, x_ptrs, y_ptrs, rows, cols, M, C, D, stride_xd, stride_yd, first, second,
        ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK, EVEN_D, MASKED, False, PRECISION,
    )  # fmt: skip
    if ONLINE:  # the running maximum (the repair launch)
        new_max = tl.maximum(run_max, tl.max(sim, axis=1) * scale)  # scale > 0: the max before scaling
        # A row whose negatives all lie in later tiles keeps -inf: shift by 0 there, never by inf.
        factor = exp2(run_max - tl.where(new_max == float("-inf"), 0.0, new_max))
        total = total * factor
        if WITH_PRODUCT:
            acc = acc * factor[:, None]
        run_max = new_max
    terms = exp2(sim * scale - tl.where(run_max == float("-inf"), 0.0, run_max)[:, None])  # FFMA + MUFU.EX2
    total += tl.sum(terms, axis=1)
    if WITH_PRODUCT:
        acc = dot_acc(rounded(terms, y.dtype), y, acc, PRECISION)
    return run_max, total, acc


@triton.jit(do_not_specialize=SIZES)
def negative_lse_kernel(
    x_ptr,
    y_ptr,
    excluded_ptr,
    tau_ptr,
    lse_in_ptr,
    lse_ptr,
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
    WITH_PRODUCT: tl.constexpr,
    ONLINE: tl.constexpr,  # False: fixed shift, failures marked NaN; True: running max for the rows lse_in marks NaN
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    ACC = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1) * BLOCK_D  # WITH_PRODUCT: the chunk of P y this program writes
    dims = chunk + tl.arange(0, BLOCK_D)
    inside = rows < M
    scale = LOG2E / tl.load(tau_ptr).to(ACC)  # logits in base 2: one multiply-add before exp2
    first, second = excluded_columns(excluded_ptr, rows, M, stride_em, stride_ek)
    x_ptrs = tile_pointers(x_ptr, rows, tl.arange(0, BLOCK_D), stride_xm, stride_xd)  # the first chunk
    if SINGLE_CHUNK:  # all of D in one tile: the anchors are loaded once
        x = load_at(x_ptrs, rows, dims, M, D, True, EVEN_D)
    else:
        x = x_ptr  # unused: scores walks D in chunks
    y_ptrs = tile_pointers(y_ptr, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), stride_yc, stride_yd)  # tile 0
    y_chunk_ptrs = y_ptrs + chunk * stride_yd

    if ONLINE:
        earlier = tl.load(lse_in_ptr + rows, mask=inside, other=0.0)
        todo = earlier != earlier  # the rows the fixed shift marked NaN
        active = tl.max(todo.to(tl.int32), axis=0)  # 0: nothing to repair in this block, no tile is visited
        run_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    else:
        earlier = lse_in_ptr  # unused
        todo = inside
        active = 1
        run_max = tl.zeros((BLOCK_M,), ACC) + scale

    # Tiles holding an excluded column or the ragged edge are masked; the others are not.
    lo1, hi1 = bounds(first)
    lo2, hi2 = bounds(second)
    n_full = C // BLOCK_N
    a1, len1, a2, len2 = tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK_N)
    total = tl.zeros((BLOCK_M,), ACC)
    if WITH_PRODUCT:
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    else:
        acc = tl.zeros((1,), ACC)  # unused
    for k in range(0, (n_full - len1 - len2) * active):
        start = interior_tile(k, a1, len1, a2, len2) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        offset = start.to(tl.int64) * stride_yc
        run_max, total, acc = lse_step(
            run_max, total, acc, x, x_ptrs, y_ptrs + offset, y_chunk_ptrs + offset, rows, cols, dims, M, C, D,
            stride_xd, stride_yd, first, second, scale, ONLINE, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK,
            EVEN_D, False, WITH_PRODUCT, PRECISION,
        )  # fmt: skip
    for j in range(0, (len1 + len2 + (n_full * BLOCK_N < C).to(tl.int32)) * active):
        start = masked_tile(j, a1, len1, a2, len2, n_full) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        offset = start.to(tl.int64) * stride_yc
        run_max, total, acc = lse_step(
            run_max, total, acc, x, x_ptrs, y_ptrs + offset, y_chunk_ptrs + offset, rows, cols, dims, M, C, D,
            stride_xd, stride_yd, first, second, scale, ONLINE, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_CHUNK,
            EVEN_D, True, WITH_PRODUCT, PRECISION,
        )  # fmt: skip

    lse2 = tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log2(total)
    if ONLINE:
        lse = tl.where(todo, lse2 * LN2, earlier)
    else:
        exact = (total >= LOWEST_SUM) & (total <= HIGHEST_SUM)
        lse = tl.where(exact, lse2 * LN2, float("nan"))
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + rows, lse, mask=inside)
    if WITH_PRODUCT:
        product = acc / tl.where(total > 0, total, 1.0)[:, None]  # no negatives: P y = 0
        offsets = rows.to(tl.int64)[:, None] * stride_om + dims[None, :] * stride_od
        tl.store(out_ptr + offsets, product, mask=(todo & inside)[:, None] & (dims[None, :] < D))


negative_lse_tuned = tuned(negative_lse_kernel, "forward")
negative_lse_product_tuned = tuned(negative_lse_kernel, "forward", score_tiles=1)
# Small problems, and the repair launch (rarely any work).
negative_lse_fixed = fixed(negative_lse_kernel, "forward")
negative_lse_product_fixed = fixed(negative_lse_kernel, "forward", score_tiles=1)


def forward_launches(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool, product: bool
) -> List[Launch]:
    """The launches of the forward: the fixed shift, then the repair (for fp16 products: the running maximum only).

    The last launch's ``out`` is ``lse``, or ``(lse, P y)`` with ``product`` (then ``y`` must be given).
    """
    cand = x if y is None else y
    m, d = x.shape
    c = cand.shape[0]
    acc = accumulation_dtype(x.dtype)
    out = torch.empty((m, d) if product else (1, 1), dtype=acc, device=x.device)  # (1, 1): unused
    args = dict(
        x_ptr=x,
        y_ptr=cand,
        excluded_ptr=excluded,
        tau_ptr=tau,
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
        WITH_PRODUCT=product,
        BLOCK_D=chunk_of(x, tf32, gradient=product),
    )
    chunks = triton.cdiv(d, args["BLOCK_D"]) if product else 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), chunks)  # noqa: E731
    tuned_kernel = negative_lse_product_tuned if product else negative_lse_tuned
    fixed_kernel = negative_lse_product_fixed if product else negative_lse_fixed
    kernel = tuned_kernel if autotuned(m, c, x.dtype) else fixed_kernel
    lse = torch.empty(m, dtype=acc, device=x.device)
    result = (lse, out) if product else lse
    if product and x.dtype == torch.float16:  # fp16 P tiles need the running maximum: every row takes it
        every_row = torch.full((m,), float("nan"), dtype=acc, device=x.device)
        return [Launch(kernel, grid, dict(args, lse_in_ptr=every_row, lse_ptr=lse, ONLINE=True), result)]
    first = torch.empty(m, dtype=acc, device=x.device)
    return [
        Launch(kernel, grid, dict(args, lse_in_ptr=first, lse_ptr=first, ONLINE=False), first),
        Launch(fixed_kernel, grid, dict(args, lse_in_ptr=first, lse_ptr=lse, ONLINE=True), result),
    ]


def negative_lse_forward(
    x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
) -> torch.Tensor:
    """lse (M,) in the accumulation dtype; ``y=None`` means the anchors are their own candidates."""
    return Launch.run_all(forward_launches(x, y, excluded, tau, tf32, product=False))


def negative_lse_product_forward(
    x: torch.Tensor, y: torch.Tensor, excluded: torch.Tensor, tau: torch.Tensor, tf32: bool
):
    """(lse, P y): lse as :func:`negative_lse_forward` and the (M, D) product in the accumulation dtype."""
    return Launch.run_all(forward_launches(x, y, excluded, tau, tf32, product=True))
