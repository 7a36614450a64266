"""The tl.jit building blocks shared by every kernel stage: masked tile loads, the dot, the similarity tile.

Tiles are addressed through explicit row/column strides, so strided inputs are
read in place, and every load is masked at the edges (no padding copies).
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """The (len(rows), len(cols)) tile of a row-major-addressed matrix, zeros outside it."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, value, rows, cols, n_rows, n_cols, stride_row, stride_col, INTERPRETER: tl.constexpr):
    """Stores the tile in ptr's dtype (rounded to nearest), masked at the edges."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + offsets, rounded(value, ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def rounded(value, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
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
def dot_acc(a, b, acc, TF32: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b in acc's dtype; fp32 operands use TF32 only when asked (IEEE otherwise)."""
    if INTERPRETER:
        # Triton's interpreter mis-computes bf16 dots; the upcast is exact.
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return acc


@triton.jit
def similarity_tile(
    a_ptr,
    b_ptr,
    a_rows,
    b_rows,
    n_a,
    n_b,
    D,
    stride_a_row,
    stride_a_col,
    stride_b_row,
    stride_b_col,
    ACC_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TF32: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The (BLOCK_A, BLOCK_B) dots a[a_rows] . b[b_rows] over all of D, walked in chunks of BLOCK_D."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), ACC_DTYPE)
    for start in range(0, D, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        a = load_tile(a_ptr, a_rows, dims, n_a, D, stride_a_row, stride_a_col)
        b = load_tile(b_ptr, b_rows, dims, n_b, D, stride_b_row, stride_b_col)
        acc = dot_acc(a, tl.trans(b), acc, TF32, INTERPRETER)
    return acc


@triton.jit
def excluded_columns(excluded_ptr, anchors, n_anchors, stride_row, stride_col):
    """The two columns each anchor does not count as negatives (itself, its positive); -1 for none."""
    inside = anchors < n_anchors
    base = excluded_ptr + anchors.to(tl.int64) * stride_row
    first = tl.load(base, mask=inside, other=-1)
    second = tl.load(base + stride_col, mask=inside, other=-1)
    return first, second
