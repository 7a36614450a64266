"""The prologue: both views L2-normalized and their positive cosines in one pass, and its backward.

Forward (per block of rows): ``norm = max(||z||, 1e-12)``, ``u = z / norm`` stored
in the input dtype (what the LSE kernels read), ``s+ = u0 . u1`` in the
accumulation dtype from the unrounded rows, as :meth:`Backend.normalize`.
Only the clamped norms are saved; ``u`` is recomputed in the backward.

Backward: with ``g0 = du0 + ds+ * u1`` (and symmetrically ``g1``),
``dz = (g - u (u . g)) / norm`` (MATH.md section 4), without the projection
where the norm was clamped at 1e-12, as autograd of ``F.normalize`` gives.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._math import accumulation_dtype
from .configs import INTERPRET, PROLOGUE_BACKWARD_ELEMENTS, PROLOGUE_ROWS, ROW_COUNTS, block_d
from .helpers import load_tile, store_tile
from .launch import Launch

NORM_EPS = 1e-12  # F.normalize's default eps (MATH.md section 1)
INTERPRETER_ROWS = 128  # bigger blocks are cheaper in the interpreter


@triton.jit(do_not_specialize=ROW_COUNTS)
def normalize_pair_kernel(
    z0_ptr,
    z1_ptr,
    u0_ptr,
    u1_ptr,
    cos_ptr,
    norm0_ptr,
    norm1_ptr,
    N,
    D,
    stride_z0n,
    stride_z0d,
    stride_z1n,
    stride_z1d,
    stride_un,
    stride_ud,
    EPS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = cos_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    squares0 = tl.zeros((BLOCK_ROWS,), ACC)
    squares1 = tl.zeros((BLOCK_ROWS,), ACC)
    for start in range(0, D, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        a = load_tile(z0_ptr, rows, dims, N, D, stride_z0n, stride_z0d).to(ACC)
        b = load_tile(z1_ptr, rows, dims, N, D, stride_z1n, stride_z1d).to(ACC)
        squares0 += tl.sum(a * a, axis=1)
        squares1 += tl.sum(b * b, axis=1)
    eps = tl.full((BLOCK_ROWS,), EPS, ACC)  # exact in fp64, unlike a bare float literal (fp32)
    norm0 = tl.maximum(tl.sqrt(squares0), eps)
    norm1 = tl.maximum(tl.sqrt(squares1), eps)

    cos = tl.zeros((BLOCK_ROWS,), ACC)
    for start in range(0, D, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        u0 = load_tile(z0_ptr, rows, dims, N, D, stride_z0n, stride_z0d).to(ACC) / norm0[:, None]
        u1 = load_tile(z1_ptr, rows, dims, N, D, stride_z1n, stride_z1d).to(ACC) / norm1[:, None]
        store_tile(u0_ptr, u0, rows, dims, N, D, stride_un, stride_ud)
        store_tile(u1_ptr, u1, rows, dims, N, D, stride_un, stride_ud)
        cos += tl.sum(u0 * u1, axis=1)

    inside = rows < N
    tl.store(cos_ptr + rows, cos, mask=inside)
    tl.store(norm0_ptr + rows, norm0, mask=inside)
    tl.store(norm1_ptr + rows, norm1, mask=inside)


@triton.jit
def _rows_and_upstream(
    z0_ptr,
    z1_ptr,
    du0_ptr,
    du1_ptr,
    rows,
    dims,
    N,
    D,
    norm0,
    norm1,
    dcos,
    stride_z0n,
    stride_z0d,
    stride_z1n,
    stride_z1d,
    stride_du0n,
    stride_du0d,
    stride_du1n,
    stride_du1d,
    HAS_DU0: tl.constexpr,
    HAS_DU1: tl.constexpr,
):
    """A tile of u0, u1 (recomputed) and of the total upstream gradients g0, g1 reaching them."""
    ACC = norm0.dtype
    u0 = load_tile(z0_ptr, rows, dims, N, D, stride_z0n, stride_z0d).to(ACC) / norm0[:, None]
    u1 = load_tile(z1_ptr, rows, dims, N, D, stride_z1n, stride_z1d).to(ACC) / norm1[:, None]
    g0 = dcos[:, None] * u1  # s+ = u0 . u1
    g1 = dcos[:, None] * u0
    if HAS_DU0:
        g0 += load_tile(du0_ptr, rows, dims, N, D, stride_du0n, stride_du0d).to(ACC)
    if HAS_DU1:
        g1 += load_tile(du1_ptr, rows, dims, N, D, stride_du1n, stride_du1d).to(ACC)
    return u0, u1, g0, g1


@triton.jit(do_not_specialize=ROW_COUNTS)
def normalize_pair_backward_kernel(
    z0_ptr,
    z1_ptr,
    norm0_ptr,
    norm1_ptr,
    du0_ptr,
    du1_ptr,
    dcos_ptr,
    dz0_ptr,
    dz1_ptr,
    N,
    D,
    stride_z0n,
    stride_z0d,
    stride_z1n,
    stride_z1d,
    stride_du0n,
    stride_du0d,
    stride_du1n,
    stride_du1d,
    stride_dzn,
    stride_dzd,
    HAS_DU0: tl.constexpr,
    HAS_DU1: tl.constexpr,
    HAS_DCOS: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    ACC = norm0_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    inside = rows < N
    norm0 = tl.load(norm0_ptr + rows, mask=inside, other=1.0)
    norm1 = tl.load(norm1_ptr + rows, mask=inside, other=1.0)
    if HAS_DCOS:
        dcos = tl.load(dcos_ptr + rows, mask=inside, other=0.0).to(ACC)
    else:
        dcos = tl.zeros((BLOCK_ROWS,), ACC)

    # Pass 1: the projections u . g of each row.
    proj0 = tl.zeros((BLOCK_ROWS,), ACC)
    proj1 = tl.zeros((BLOCK_ROWS,), ACC)
    for start in range(0, D, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        u0, u1, g0, g1 = _rows_and_upstream(
            z0_ptr,
            z1_ptr,
            du0_ptr,
            du1_ptr,
            rows,
            dims,
            N,
            D,
            norm0,
            norm1,
            dcos,
            stride_z0n,
            stride_z0d,
            stride_z1n,
            stride_z1d,
            stride_du0n,
            stride_du0d,
            stride_du1n,
            stride_du1d,
            HAS_DU0,
            HAS_DU1,
        )
        proj0 += tl.sum(u0 * g0, axis=1)
        proj1 += tl.sum(u1 * g1, axis=1)
    # A clamped norm is a constant: no projection term there.
    eps = tl.full((BLOCK_ROWS,), EPS, ACC)
    proj0 = tl.where(norm0 > eps, proj0, 0.0)
    proj1 = tl.where(norm1 > eps, proj1, 0.0)

    # Pass 2: dz = (g - u (u . g)) / norm.
    for start in range(0, D, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        u0, u1, g0, g1 = _rows_and_upstream(
            z0_ptr,
            z1_ptr,
            du0_ptr,
            du1_ptr,
            rows,
            dims,
            N,
            D,
            norm0,
            norm1,
            dcos,
            stride_z0n,
            stride_z0d,
            stride_z1n,
            stride_z1d,
            stride_du0n,
            stride_du0d,
            stride_du1n,
            stride_du1d,
            HAS_DU0,
            HAS_DU1,
        )
        dz0 = (g0 - u0 * proj0[:, None]) / norm0[:, None]
        dz1 = (g1 - u1 * proj1[:, None]) / norm1[:, None]
        store_tile(dz0_ptr, dz0, rows, dims, N, D, stride_dzn, stride_dzd)
        store_tile(dz1_ptr, dz1, rows, dims, N, D, stride_dzn, stride_dzd)


def _rows_per_program() -> int:
    return INTERPRETER_ROWS if INTERPRET else PROLOGUE_ROWS


def _backward_rows_per_program(itemsize: int, chunk: int) -> int:
    """Fewer rows for fp32 / fp64 inputs: at most PROLOGUE_BACKWARD_ELEMENTS per tile."""
    return min(_rows_per_program(), PROLOGUE_BACKWARD_ELEMENTS[itemsize] // chunk)


def normalize_launch(z0: torch.Tensor, z1: torch.Tensor) -> Launch:
    n, d = z0.shape
    acc = accumulation_dtype(z0.dtype)
    u0 = torch.empty((n, d), dtype=z0.dtype, device=z0.device)
    u1 = torch.empty_like(u0)
    cos, norm0, norm1 = (torch.empty(n, dtype=acc, device=z0.device) for _ in range(3))
    rows = _rows_per_program()
    args = dict(
        z0_ptr=z0,
        z1_ptr=z1,
        u0_ptr=u0,
        u1_ptr=u1,
        cos_ptr=cos,
        norm0_ptr=norm0,
        norm1_ptr=norm1,
        N=n,
        D=d,
        stride_z0n=z0.stride(0),
        stride_z0d=z0.stride(1),
        stride_z1n=z1.stride(0),
        stride_z1d=z1.stride(1),
        stride_un=u0.stride(0),
        stride_ud=u0.stride(1),
        EPS=NORM_EPS,
        BLOCK_ROWS=rows,
        BLOCK_D=block_d(d, z0.element_size()),
    )
    return Launch(normalize_pair_kernel, (triton.cdiv(n, rows),), args, (u0, u1, cos, norm0, norm1))


def normalize_pair(z0: torch.Tensor, z1: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """(u0, u1, s+, norm0, norm1): rows in z's dtype, the rest in the accumulation dtype."""
    return normalize_launch(z0, z1).run()


def normalize_backward_launch(
    z0: torch.Tensor,
    z1: torch.Tensor,
    norm0: torch.Tensor,
    norm1: torch.Tensor,
    grad_u0: Optional[torch.Tensor],
    grad_u1: Optional[torch.Tensor],
    grad_cos: Optional[torch.Tensor],
) -> Launch:
    n, d = z0.shape
    dz0 = torch.empty((n, d), dtype=z0.dtype, device=z0.device)
    dz1 = torch.empty_like(dz0)
    chunk = block_d(d, z0.element_size(), gradient=True)
    rows = _backward_rows_per_program(z0.element_size(), chunk)
    args = dict(
        z0_ptr=z0,
        z1_ptr=z1,
        norm0_ptr=norm0,
        norm1_ptr=norm1,
        du0_ptr=norm0 if grad_u0 is None else grad_u0,  # unused pointers where a gradient is missing
        du1_ptr=norm0 if grad_u1 is None else grad_u1,
        dcos_ptr=norm0 if grad_cos is None else grad_cos.contiguous(),
        dz0_ptr=dz0,
        dz1_ptr=dz1,
        N=n,
        D=d,
        stride_z0n=z0.stride(0),
        stride_z0d=z0.stride(1),
        stride_z1n=z1.stride(0),
        stride_z1d=z1.stride(1),
        stride_du0n=0 if grad_u0 is None else grad_u0.stride(0),
        stride_du0d=0 if grad_u0 is None else grad_u0.stride(1),
        stride_du1n=0 if grad_u1 is None else grad_u1.stride(0),
        stride_du1d=0 if grad_u1 is None else grad_u1.stride(1),
        stride_dzn=dz0.stride(0),
        stride_dzd=dz0.stride(1),
        HAS_DU0=grad_u0 is not None,
        HAS_DU1=grad_u1 is not None,
        HAS_DCOS=grad_cos is not None,
        EPS=NORM_EPS,
        BLOCK_ROWS=rows,
        BLOCK_D=chunk,
    )
    return Launch(normalize_pair_backward_kernel, (triton.cdiv(n, rows),), args, (dz0, dz1))


def normalize_pair_backward(
    z0: torch.Tensor,
    z1: torch.Tensor,
    norm0: torch.Tensor,
    norm1: torch.Tensor,
    grad_u0: Optional[torch.Tensor],
    grad_u1: Optional[torch.Tensor],
    grad_cos: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dz0, dz1) in z's dtype; a missing upstream gradient counts as zero."""
    return normalize_backward_launch(z0, z1, norm0, norm1, grad_u0, grad_u1, grad_cos).run()
