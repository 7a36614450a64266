"""Checks of the compiled op itself (macl_kernels::negative_lse and its backward), shared by
the cpp, cuda and emulated-cuda tests: inputs for each kind of excluded table, the float64
oracle, and the cases that reach every edge of the CUDA kernels' tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from macl_kernels._layouts import layout_exclusions
from macl_kernels._math import accumulation_dtype, rows_from_product
from macl_kernels.backends.torch_chunked import TorchBackend
from macl_kernels.testing import TOLERANCE, assert_rel_close

Tensors = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def random_exclusions(rows: int, cols: int, seed: int) -> torch.Tensor:
    """An arbitrary excluded table: not symmetric, -1s, repeated and out-of-range columns."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-1, cols + 2, (rows, 2), generator=g)
    table[::7, 1] = table[::7, 0]  # the same column twice
    return table.to(torch.int32)


def op_oracle(x, y, excluded, tau, grad_lse) -> Tensors:
    """(lse, dx, dy) of the op for an upstream grad_lse: the torch backend in float64 (dy None without y)."""
    x64 = x.detach().double().requires_grad_(True)
    y64 = None if y is None else y.detach().double().requires_grad_(True)
    lse = TorchBackend().negative_lse(x64, y64, excluded, tau.double())
    (lse * grad_lse.double()).sum().backward()
    return lse.detach(), x64.grad, None if y64 is None else y64.grad


@dataclass(frozen=True)
class OpCase:
    """n pairs (ntxent: 2n anchors, the candidates are the anchors; cross: n anchors, n + 13
    candidates; queue: n anchors, a bank of `bank` rows; random: n anchors against n + 13
    candidates, or themselves when `symmetric`, with an arbitrary excluded table), D = d."""

    dtype: torch.dtype
    layout: str
    n: int
    d: int
    bank: int = 37
    symmetric: bool = False

    def __str__(self) -> str:
        sym = "-sym" if self.symmetric else ""
        return f"{str(self.dtype)[6:]}-{self.layout}{sym}-n{self.n}-d{self.d}"


def op_inputs(case: OpCase, device: str = "cpu", seed: int = 0):
    """(x, y, excluded, tau, grad_lse) for a case: unit rows, tau 0.2, a non-uniform upstream gradient."""
    g = torch.Generator().manual_seed(seed)

    def unit_rows(rows):
        return torch.nn.functional.normalize(torch.randn(rows, case.d, generator=g, dtype=torch.float64), dim=1)

    n = case.n
    if case.layout == "ntxent":
        x, y, excluded = unit_rows(2 * n), None, layout_exclusions("ntxent", n, torch.device("cpu"))
    elif case.layout == "cross":
        x, y, excluded = unit_rows(n), unit_rows(n + 13), layout_exclusions("cross", n, torch.device("cpu"))
    elif case.layout == "queue":
        x, y, excluded = unit_rows(n), unit_rows(case.bank), layout_exclusions("queue", n, torch.device("cpu"))
    else:
        x = unit_rows(n)
        y = None if case.symmetric else unit_rows(n + 13)
        excluded = random_exclusions(n, n if y is None else y.shape[0], seed + 1)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    tau = torch.tensor(0.2, dtype=acc)
    grad_lse = (0.5 + torch.rand(x.shape[0], generator=g, dtype=torch.float64)) / x.shape[0]

    def put(t):
        return None if t is None else t.to(device)

    cast = lambda t: None if t is None else t.to(device, case.dtype)  # noqa: E731
    return cast(x), cast(y), put(excluded), put(tau), grad_lse.to(device, acc)


# Every kind of excluded table and dtype, at sizes that leave partial CTAs and partial
# streamed tiles (the fp16/bf16 kernels own 64 rows, the forward 128, and stream 64; fp32
# 64 and 32; fp64 64 and 16), several CTAs and tiles, dims that need padding (19, 40), several gradient
# chunks (130: 2 chunks of 128 features for fp16/bf16, 3 of 64 for fp32, 5 of 32 for fp64)
# and dims whose rows fit shared memory only chunk by chunk on a GPU (600: 227 KiB hold
# 576 fp16/bf16 features in the resident layout, far fewer float32/float64 ones).
OP_CASES = [
    OpCase(dtype, layout, n, d)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for layout, n, d in (("ntxent", 45, 19), ("cross", 70, 40), ("queue", 33, 24), ("random", 67, 40))
] + [
    OpCase(torch.float16, "random", 40, 19, symmetric=True),
    OpCase(torch.float32, "random", 40, 19, symmetric=True),
    OpCase(torch.float16, "ntxent", 40, 130),
    OpCase(torch.float32, "cross", 40, 130),
    OpCase(torch.float64, "cross", 40, 130),
    OpCase(torch.bfloat16, "ntxent", 20, 600),
    OpCase(torch.float32, "cross", 20, 600),
    OpCase(torch.float64, "ntxent", 10, 600),
    OpCase(torch.float16, "queue", 3, 8, bank=1),
    OpCase(torch.bfloat16, "ntxent", 100, 64),  # two forward CTAs of 128 anchors, whole copy rounds only
]


def outlier_inputs(n: int, d: int, tile_rows: int, outlier: float, device: str = "cpu", layout: str = "cross"):
    """(x, y, excluded, tau, grad_lse) of a small fp16 case where anchor 5's upstream gradient is
    `outlier` times the others' (issue 11's underflow of the weights next to a large one, at a
    size an emulator or interpreter runs).

    cross: n anchors near one direction, n + 13 candidates likewise, tau = 0.1; anchor 5 and
    candidate 3 point the other way, so the outlier's softmax sits on candidate 3 and every other
    column's dy comes from the other anchors. ntxent (y None: the n pairs are 2n anchors that are
    their own candidates): the first `tile_rows` anchors point the other way, so that the
    outlier's softmax stays among them and the other anchors' among themselves. In both, anchor
    5's tile-mates (the first `tile_rows` anchors, the kernels' tile of anchors that shares a
    scale) get no upstream gradient: at this size they would be a large share of all anchors.
    With one scale for all anchors, the others' weights p * coef / scale (~1 / (n outlier)) fall
    below fp16's subnormals.
    """
    g = torch.Generator().manual_seed(21)
    center = torch.randn(d, generator=g, dtype=torch.float64)

    def near(rows, direction):
        return torch.nn.functional.normalize(direction + 0.3 * torch.randn(rows, d, generator=g, dtype=torch.float64))

    if layout == "ntxent":
        x = torch.cat([near(tile_rows, -center), near(2 * n - tile_rows, center)])
        y = None
    else:
        x, y = near(n, center), near(n + 13, center)
        x[5] = y[3] = -torch.nn.functional.normalize(center, dim=0)
    tau = torch.tensor(0.1)
    grad_lse = torch.full((x.shape[0],), 1e-3)  # coef = grad_lse / tau = 1e-2: every gradient in fp16's normal range
    grad_lse[:tile_rows] = 0.0
    grad_lse[5] = 1e-3 * outlier
    excluded = layout_exclusions(layout, n, torch.device(device))
    half = lambda t: None if t is None else t.to(device, torch.float16)  # noqa: E731
    return half(x), half(y), excluded, tau.to(device), grad_lse.to(device)


def product_oracle(x, y, excluded, tau, rows: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse, P y) of the product op in float64: P = the softmax of S / tau over each anchor's
    negatives (a row without negatives: lse -inf, P y 0), computed `rows` anchors at a time."""
    x64, y64, tau64 = x.double(), y.double(), tau.double()
    lse, product = [], []
    for start in range(0, x.shape[0], rows):
        logits = x64[start : start + rows] @ y64.T / tau64
        columns = torch.arange(y.shape[0], device=x.device)
        table = excluded[start : start + rows].long()
        negatives = (columns[None, :] != table[:, :1]) & (columns[None, :] != table[:, 1:])
        logits = logits.masked_fill(~negatives, float("-inf"))
        block_lse = torch.logsumexp(logits, dim=1)
        weights = torch.where(negatives, torch.exp(logits - block_lse[:, None]), 0.0).nan_to_num(0.0)
        lse.append(block_lse)
        product.append(weights @ y64)
    return torch.cat(lse), torch.cat(product)


def assert_product_matches_oracle(
    run_product: Callable, inputs, dtype: torch.dtype, what: str, tol: Optional[float] = None
) -> None:
    """lse and P y of `run_product` (x, y, excluded, tau) -> (lse, P y) against the float64 oracle."""
    x, y, excluded, tau, _ = inputs
    lse, product = run_product(x, y, excluded, tau)
    expected_lse, expected_product = product_oracle(x, y, excluded, tau)
    assert lse.dtype == product.dtype == accumulation_dtype(dtype) and product.shape == x.shape
    assert not torch.isnan(lse).any() and not torch.isnan(product).any(), f"{what}: NaN"
    finite = torch.isfinite(expected_lse)  # (-inf: a row without negatives)
    assert torch.equal(lse.double()[~finite], expected_lse[~finite]), f"{what}: lse of rows without negatives"
    assert_rel_close(lse[finite], expected_lse[finite], 1e-5, f"{what} lse")
    assert_rel_close(product, expected_product, TOLERANCE[dtype] if tol is None else tol, f"{what} P y")


def op_with_product(run_product: Callable, run_backward: Callable) -> Callable:
    """The op as the compiled backends run it with candidates (macl_kernels/_extension_ops.py), as
    (x, y, excluded, tau, grad_lse, need_dy) -> (lse, dx, dy): `run_product` (x, y, excluded, tau)
    -> (lse, P y), dx = (h / tau) P y, and `run_backward` (the backward op's arguments, need_dx
    last) for dy alone."""

    def run(x, y, excluded, tau, grad_lse, need_dy):
        lse, product = run_product(x, y, excluded, tau)
        no_dx, dy = run_backward(grad_lse, x, y, excluded, tau, lse, need_dy, False)
        assert no_dx.numel() == 0, "need_dx false: no dx"
        return lse, rows_from_product(lse, product, lse, tau, grad_lse).to(x.dtype), dy

    return run


PRODUCT_CASES = [case for case in OP_CASES if case.layout != "ntxent" and not case.symmetric]  # with candidates


# ---- y None with what the symmetric pass (csrc/cuda/symmetric_grad.cuh) must tell apart ----


def asymmetric_exclusions(rows: int, offset: int = 100) -> torch.Tensor:
    """An excluded table for `rows` anchors that are their own candidates, mirrored nowhere:
    anchor j excludes j + offset (mod rows) in its first slot, and in its second -1, or on every
    third row a column past the end (excluding nothing). Where an anchor's exclusions fall for
    its own row (tiles of columns j + offset) and where the anchors that exclude it are (tiles
    j - offset) differ: at 300 anchors, the 64-anchor block 0 has row-masked tiles 1-2 and
    column-masked tiles 3-4 only, and tile 0 unmasked."""
    j = torch.arange(rows)
    table = torch.stack([(j + offset) % rows, torch.full_like(j, -1)], dim=1)
    table[::3, 1] = rows + 5
    return table.to(torch.int32)


def asymmetric_inputs(dtype: torch.dtype, device: str = "cpu"):
    """(x, None, excluded, tau, grad_lse): 300 anchors, D = 16, the table of asymmetric_exclusions."""
    x, y, _, tau, grad_lse = op_inputs(OpCase(dtype, "random", 300, 16, symmetric=True), device, seed=4)
    return x, y, asymmetric_exclusions(300).to(device), tau, grad_lse


def wide_spread_inputs(dtype: torch.dtype, device: str = "cpu"):
    """(x, None, excluded, tau, grad_lse): ntxent, 400 anchors (so that the 64-anchor tiles include
    unmasked ones), tau = 0.004: the rows' lse log2(e) spread over far more than the 96 that one
    shared shift allows (the symmetric pass's two-exp formula)."""
    x, y, excluded, _, grad_lse = op_inputs(OpCase(dtype, "ntxent", 200, 19), device, seed=5)
    tau = torch.tensor(0.004, dtype=grad_lse.dtype, device=device)
    return x, y, excluded, tau, grad_lse


def assert_wide_spread_matches_oracle(run: "Op", dtype: torch.dtype, device: str = "cpu") -> None:
    """`run` on wide_spread_inputs against the float64 oracle, after checking that their spread of
    lse log2(e) is over 96 indeed (float32 at 5e-5: logits in the hundreds, fixed_shift_tolerance)."""
    inputs = wide_spread_inputs(dtype, device)
    lse2 = op_oracle(*inputs)[0] * math.log2(math.e)
    assert lse2.max() - lse2.min() > 96
    assert_op_matches_oracle(run, inputs, dtype, "wide spread", 5e-5 if dtype == torch.float32 else None)


def assert_rows_without_negatives_match_oracle(run: "Op", dtype: torch.dtype, device: str = "cpu") -> None:
    """y None, 2 anchors, tau = 0.01 (no_negatives_inputs). Anchor 0 excludes both: no negatives, lse
    -inf, and its gradient only the other anchor's term (E[1, 0] x[1]); then neither has negatives:
    dx = 0. Entries masked both ways have overflowing exps and must give 0, never NaN."""
    x, y, excluded, tau, grad_lse = no_negatives_inputs(dtype, torch.tensor([[0, 1], [1, -1]]), device)
    lse, dx, _ = run(x, y, excluded, tau, grad_lse, False)
    expected_lse, expected_dx, _ = op_oracle(x, y, excluded, tau, grad_lse)
    assert torch.isinf(lse[0]) and lse[0] < 0
    assert_rel_close(lse[1:], expected_lse[1:], 1e-5, "lse")
    assert_rel_close(dx, expected_dx, TOLERANCE[dtype], "dx")
    x, y, excluded, tau, grad_lse = no_negatives_inputs(dtype, torch.tensor([[0, 1], [1, 0]]), device)
    lse, dx, _ = run(x, y, excluded, tau, grad_lse, False)
    assert torch.isinf(lse).all() and (lse < 0).all() and (dx == 0).all()


def assert_symmetric_outlier_matches_oracle(run: "Op", device: str = "cpu") -> None:
    """`run` on the ntxent outlier_inputs (fp16, 128 anchors, anchor 5's upstream gradient 1e5 times
    the others') against the float64 oracle: lse at 1e-5, dx at 1e-2."""
    x, y, excluded, tau, grad_lse = outlier_inputs(64, 40, 64, 1e5, device, layout="ntxent")
    lse, dx, _ = run(x, y, excluded, tau, grad_lse, False)
    expected = op_oracle(x, y, excluded, tau, grad_lse)
    assert_rel_close(lse, expected[0], 1e-5, "lse")
    assert_rel_close(dx, expected[1], 1e-2, "dx")


def no_negatives_inputs(dtype: torch.dtype, rows_excluded: torch.Tensor, device: str = "cpu"):
    """(x, None, excluded, tau, grad_lse) for the anchors' table `rows_excluded` (2 rows, so that
    a row may have no negatives), tau = 0.01: an entry masked both ways has a term that
    overflows (a row's own score over the others' lse) and must still give 0, never NaN."""
    rows = rows_excluded.shape[0]
    g = torch.Generator().manual_seed(6)
    x = torch.nn.functional.normalize(torch.randn(rows, 8, generator=g, dtype=torch.float64), dim=1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(0.01, dtype=acc, device=device)
    grad_lse = torch.linspace(0.5, 1.5, rows, dtype=acc, device=device)
    return x.to(device, dtype), None, rows_excluded.to(device, torch.int32), tau, grad_lse


Op = Callable[..., Tensors]  # (x, y, excluded, tau, grad_lse, need_dy) -> (lse, dx, dy)


def assert_op_matches_float64(run: Op, case: OpCase, device: str = "cpu", tol: Optional[float] = None) -> None:
    """lse, dx and dy of `run` on the case's inputs against the float64 oracle, at MATH.md's tolerance."""
    assert_op_matches_oracle(run, op_inputs(case, device), case.dtype, str(case), tol)


def assert_op_matches_oracle(run: Op, inputs, dtype: torch.dtype, what: str, tol: Optional[float] = None) -> None:
    """lse, dx and dy of `run` on (x, y, excluded, tau, grad_lse) against the float64 oracle."""
    x, y, excluded, tau, grad_lse = inputs
    lse, dx, dy = run(x, y, excluded, tau, grad_lse, y is not None)
    expected = op_oracle(x, y, excluded, tau, grad_lse)
    tol = TOLERANCE[dtype] if tol is None else tol
    assert dx.dtype == dtype and (y is None or dy.dtype == dtype), "gradients in the input dtype"
    for name, got, want in zip(("lse", "dx", "dy"), (lse, dx, dy), expected):
        if want is not None:
            assert_rel_close(got, want, 1e-5 if name == "lse" else tol, f"{what} {name}")


# Inputs whose row sums the forward's fixed shift cannot hold (csrc/cuda/kernels.cuh, the Triton
# forward): those rows take the running maximum. Cross layout, 140 anchors (forward CTAs of 128
# rows for fp16/bf16, 64 for float32/float64).
FIXED_SHIFT_CASES = (
    "tiny tau",  # tau = 0.004: every term of every row underflows the fixed shift's range
    "long rows",  # the first 64 anchors 40x longer than unit: their terms overflow, the last 12's do not
    "negative tau",  # tau = -0.3: terms up to 2^9.6, inside the range, and the masked ones must still vanish
)


def fixed_shift_inputs(kind: str, dtype: torch.dtype, device: str = "cpu"):
    """(x, y, excluded, tau, grad_lse) of one of FIXED_SHIFT_CASES."""
    x, y, excluded, tau, grad_lse = op_inputs(OpCase(dtype, "cross", 140, 40), device, seed=3)
    if kind == "tiny tau":
        tau = torch.full_like(tau, 0.004)
    elif kind == "long rows":
        x = torch.cat([x[:64] * 40, x[64:]])
    elif kind == "negative tau":
        tau = torch.full_like(tau, -0.3)
    else:
        raise ValueError(f"fixed_shift_inputs: unknown kind {kind!r}")
    return x, y, excluded, tau, grad_lse


def fixed_shift_tolerance(kind: str, dtype: torch.dtype) -> Optional[float]:
    """The gradients' tolerance for a FIXED_SHIFT_CASES case (None: MATH.md's for the dtype). With
    logits in the hundreds (tau = 0.004, or rows 40x too long) a float32 score's rounding (~1e-7) is
    that much larger in its logit and its weight."""
    return 5e-5 if kind != "negative tau" and dtype == torch.float32 else None
