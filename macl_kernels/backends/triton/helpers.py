"""The tl.jit building blocks shared by every kernel stage: tile loads, the dot, the score tile, the tile order.

Tiles are addressed through explicit row/column strides, so strided inputs are
read in place. Loads are masked only where a tile can cross an edge: ``CHECK_ROWS``
for the last, ragged block of rows, ``EVEN_D`` (a heuristic) when D is a multiple
of the embedding chunk. Where a tile crosses no edge and holds no excluded column
it is an *interior* tile: no mask at all (see :func:`tile_order`).
"""

import triton
import triton.language as tl

from .configs import INTERPRET

# Read by the kernels as a global: the interpreter's workarounds, compiled out on GPUs.
INTERPRETER = tl.constexpr(INTERPRET)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NO_TILE = tl.constexpr(1 << 30)  # larger than any index: an empty range's start


@triton.jit
def store_tile(ptr, value, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """Stores the tile in ptr's dtype (rounded to nearest), masked at the edges."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + offsets, rounded(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def rounded(value, dtype: tl.constexpr):
    """value.to(dtype), rounded to nearest even as compiled Triton does.

    The interpreter truncates fp32 -> bf16 instead, so there the rounding is done on the bits first.
    """
    if INTERPRETER:
        if dtype == tl.bfloat16:
            if value.dtype == tl.float32:
                bits = value.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in acc's dtype; PRECISION ("ieee", "tf32", "tf32x3") matters for fp32 operands only."""
    if INTERPRETER:
        # Triton's interpreter mis-computes bf16 dots; the upcast is exact (and it computes fp32 exactly).
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if not INTERPRETER:
        if PRECISION == "tf32x3":
            # fp32-accurate on TF32 tensor cores, split by hand (x = hi + lo, hi exact in TF32):
            # Triton's own tf32x3 spilled kilobytes in every gradient kernel (codegen report).
            a_hi = tf32_part(a)
            b_hi = tf32_part(b)
            acc = tl.dot(a - a_hi, b_hi, acc, input_precision="tf32", out_dtype=acc.dtype)
            acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32", out_dtype=acc.dtype)
            return tl.dot(a_hi, b_hi, acc, input_precision="tf32", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def tf32_part(x):
    """x rounded to TF32's 10-bit mantissa (to nearest, ties away), still as fp32: x - tf32_part(x) is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def exp2(x):
    """2^x; on GPUs one MUFU.EX2 (ftz: results below 2^-126 are 0, far below any term that counts)."""
    if INTERPRETER:
        return tl.exp2(x)
    if x.dtype == tl.float32:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return tl.exp2(x)


@triton.jit
def tile_pointers(ptr, rows, cols, stride_row, stride_col):
    """Pointers to the (len(rows), len(cols)) tile: computed once per program, then moved by a scalar offset."""
    return ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def load_at(ptrs, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """The tile at ``ptrs`` (see :func:`tile_pointers`), zeros where rows >= n_rows or cols >= n_cols."""
    if CHECK_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    if EVEN_COLS:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """The (len(rows), len(cols)) tile of a row-major-addressed matrix, zeros outside it."""
    return load_at(tile_pointers(ptr, rows, cols, stride_row, stride_col), rows, cols, n_rows, n_cols, True, False)


@triton.jit
def scores(
    a,
    b,
    a_ptrs,
    b_ptrs,
    a_idx,
    b_idx,
    n_a,
    n_b,
    D,
    stride_a_col,
    stride_b_col,
    first,
    second,
    ACC_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASKED: tl.constexpr,
    EXCLUSIONS_OF_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The (BLOCK_A, BLOCK_B) similarity tile a[a_idx] . b[b_idx]; -inf where a pair is excluded or b is past n_b.

    ``a`` and ``b`` are the whole tiles when ``SINGLE_CHUNK`` (loaded by the caller,
    who reuses them), else unused and D is walked in chunks from ``a_ptrs`` / ``b_ptrs``
    (the tiles' first chunk). Only a ``MASKED`` tile checks the b edge and the
    exclusions: ``first``/``second`` hold, per a-row (per b-row if ``EXCLUSIONS_OF_B``),
    the excluded index of the other side or -1.
    """
    if SINGLE_CHUNK:
        sim = dot_acc(a, tl.trans(b), tl.zeros((BLOCK_A, BLOCK_B), ACC_DTYPE), PRECISION)
    else:
        sim = tl.zeros((BLOCK_A, BLOCK_B), ACC_DTYPE)
        dims = tl.arange(0, BLOCK_D)
        for start in range(0, D, BLOCK_D):
            a_chunk = load_at(a_ptrs + start * stride_a_col, a_idx, start + dims, n_a, D, True, EVEN_D)
            b_chunk = load_at(b_ptrs + start * stride_b_col, b_idx, start + dims, n_b, D, MASKED, EVEN_D)
            sim = dot_acc(a_chunk, tl.trans(b_chunk), sim, PRECISION)
    if MASKED:
        if EXCLUSIONS_OF_B:
            hidden = (a_idx[:, None] == first[None, :]) | (a_idx[:, None] == second[None, :])
        else:
            hidden = (b_idx[None, :] == first[:, None]) | (b_idx[None, :] == second[:, None])
        sim = tl.where(hidden | (b_idx[None, :] >= n_b), float("-inf"), sim)
    return sim


@triton.jit
def excluded_columns(excluded_ptr, anchors, n_anchors, stride_row, stride_col):
    """The two columns each anchor does not count as negatives (itself, its positive); -1 for none."""
    inside = anchors < n_anchors
    base = excluded_ptr + anchors.to(tl.int64) * stride_row
    first = tl.load(base, mask=inside, other=-1)
    second = tl.load(base + stride_col, mask=inside, other=-1)
    return first, second


@triton.jit
def bounds(values):
    """(smallest, largest) of the values >= 0: (NO_TILE, -1) when there are none."""
    return tl.min(tl.where(values >= 0, values, NO_TILE)), tl.max(tl.where(values >= 0, values, -1))


@triton.jit
def tile_order(lo1, hi1, lo2, hi2, n_full, BLOCK: tl.constexpr):
    """Which of the ``n_full`` full tiles need masking: those holding an index in [lo1, hi1] or [lo2, hi2].

    Returns ``(a1, len1, a2, len2)``: two sorted, disjoint runs of masked tiles
    [a1, a1 + len1), [a2, a2 + len2). Interior tile k (k < n_full - len1 - len2) is
    :func:`interior_tile` and masked tile j is :func:`masked_tile`, the ragged last
    tile (index n_full) coming last. An empty run is any (lo, hi) with hi < 0.
    """
    a1 = tl.minimum(lo1 // BLOCK, n_full)
    b1 = tl.where(hi1 >= 0, tl.minimum(hi1 // BLOCK + 1, n_full), a1)
    a2 = tl.minimum(lo2 // BLOCK, n_full)
    b2 = tl.where(hi2 >= 0, tl.minimum(hi2 // BLOCK + 1, n_full), a2)
    b1 = tl.maximum(b1, a1)
    b2 = tl.maximum(b2, a2)
    swap = a2 < a1
    a1, b1, a2, b2 = tl.where(swap, a2, a1), tl.where(swap, b2, b1), tl.where(swap, a1, a2), tl.where(swap, b1, b2)
    overlap = a2 <= b1
    b1 = tl.where(overlap, tl.maximum(b1, b2), b1)
    a2 = tl.where(overlap, b1, a2)
    b2 = tl.where(overlap, b1, b2)
    return a1, b1 - a1, a2, b2 - a2


@triton.jit
def interior_tile(k, a1, len1, a2, len2):
    """The k-th full tile outside both masked runs."""
    k = k + tl.where(k >= a1, len1, 0)
    return k + tl.where(k >= a2, len2, 0)


@triton.jit
def masked_tile(j, a1, len1, a2, len2, n_full):
    """The j-th tile to mask: the first run, the second run, then the ragged last tile."""
    return tl.where(j < len1, a1 + j, tl.where(j < len1 + len2, a2 + j - len1, n_full))


@triton.jit
def excluding_rows(excluded_ptr, n_rows, stride_row, stride_col, lo, hi, BLOCK: tl.constexpr):
    """Bounds (lo1, hi1, lo2, hi2) of the rows whose first (second) excluded column lies in [lo, hi).

    The column pass's view of the exclusions: a scan of the whole table, O(rows) per
    program, small next to its O(rows * D) tile loads.
    """
    lo1 = tl.full((), NO_TILE, tl.int32)
    hi1 = tl.full((), -1, tl.int32)
    lo2 = tl.full((), NO_TILE, tl.int32)
    hi2 = tl.full((), -1, tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        first, second = excluded_columns(excluded_ptr, rows, n_rows, stride_row, stride_col)
        low, high = bounds(tl.where((first >= lo) & (first < hi), rows, -1))
        lo1, hi1 = tl.minimum(lo1, low), tl.maximum(hi1, high)
        low, high = bounds(tl.where((second >= lo) & (second < hi), rows, -1))
        lo2, hi2 = tl.minimum(lo2, low), tl.maximum(hi2, high)
    return lo1, hi1, lo2, hi2
