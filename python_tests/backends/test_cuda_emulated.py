"""The CUDA backend's kernels, run on the CPU by the emulator of cuda_emulation/ (no GPU needed).

The kernels' own source is compiled as host C++, with the warp instructions (ldmatrix,
mma.m16n8k16) implemented from the PTX ISA, cp.async copies that land as late as allowed
(or at once), shared memory and outputs poisoned with NaN. What this cannot see: timing,
bank conflicts, the compiler's register allocation, and a wrong reading of the ISA that
the emulator shares with the kernels (test_cuda.py checks the same cases on a GPU).
"""

import pytest
import torch

from macl_kernels.testing import assert_rel_close
from python_tests.backends import cuda_emulation
from python_tests.backends.op_checks import (
    FIXED_SHIFT_CASES,
    OP_CASES,
    PRODUCT_CASES,
    OpCase,
    assert_op_matches_float64,
    assert_op_matches_oracle,
    assert_product_matches_oracle,
    assert_rows_without_negatives_match_oracle,
    assert_symmetric_outlier_matches_oracle,
    assert_wide_spread_matches_oracle,
    asymmetric_inputs,
    fixed_shift_inputs,
    fixed_shift_tolerance,
    op_inputs,
    op_oracle,
    op_with_product,
    outlier_inputs,
)

pytestmark = pytest.mark.slow  # a ~30 s build on first use, then seconds per case

UNLIMITED = 1 << 20  # bytes of shared memory per CTA: every layout fits
SM86 = 99 * 1024  # the smallest opt-in limit among the targeted GPUs (sm_86, sm_89)


def emulated(shared_limit=UNLIMITED, immediate_copies=False):
    """The op, (x, y, excluded, tau, grad_lse, need_dy) -> (lse, dx, dy), through the emulator."""
    emu = cuda_emulation.load()

    def run(x, y, excluded, tau, grad_lse, need_dy):
        lse = emu.negative_lse(x, y, excluded, tau, shared_limit, immediate_copies)
        dx, dy = emu.negative_lse_backward(
            grad_lse, x, y, excluded, tau, lse, need_dy, True, shared_limit, immediate_copies
        )
        return lse, dx, dy

    return run


def emulated_product(shared_limit=UNLIMITED, immediate_copies=False):
    """The product op, (x, y, excluded, tau) -> (lse, P y), through the emulator."""
    emu = cuda_emulation.load()
    return lambda x, y, excluded, tau: emu.negative_lse_product(x, y, excluded, tau, shared_limit, immediate_copies)


def emulated_with_product(shared_limit=UNLIMITED, immediate_copies=False):
    """The op as the backend runs it with candidates (op_checks.op_with_product), through the emulator."""
    emu = cuda_emulation.load()

    def backward(*args):
        return emu.negative_lse_backward(*args, shared_limit, immediate_copies)

    return op_with_product(emulated_product(shared_limit, immediate_copies), backward)


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_matches_float64(case):
    assert_op_matches_float64(emulated(), case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", FIXED_SHIFT_CASES)
def test_rows_the_fixed_shift_cannot_hold(kind, dtype):
    # The forward's CTAs whose row sums leave the fixed shift's range redo their rows with the
    # running maximum; the others keep theirs.
    inputs = fixed_shift_inputs(kind, dtype)
    assert_op_matches_oracle(emulated(), inputs, dtype, kind, fixed_shift_tolerance(kind, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["ntxent", "cross"])
def test_chunked_layout(dtype, layout):
    # D = 300 on a 99 KiB device: rows too long to keep the owned block in shared memory,
    # so each streamed tile comes in chunks of features with the owned rows' chunks.
    assert not cuda_emulation.load().resident_layout(dtype, 300, SM86)
    assert_op_matches_float64(emulated(SM86), OpCase(dtype, layout, 40, 300))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_copies_landing_at_once(dtype):
    # Copies that land as soon as issued: a stage still being read would be overwritten.
    for limit in (UNLIMITED, SM86):
        assert_op_matches_float64(emulated(limit, immediate_copies=True), OpCase(dtype, "ntxent", 40, 300))


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=str)
def test_product_matches_float64(case):
    # lse and P y against the float64 softmax; then the gradients as the backend takes them from
    # them (dx = (h / tau) P y, dy from the column pass alone).
    assert_product_matches_oracle(emulated_product(), op_inputs(case), case.dtype, str(case))
    assert_op_matches_float64(emulated_with_product(), case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_product_in_the_chunked_layout(dtype):
    # D = 300 on a 99 KiB device: each CTA's product chunk is summed last, from the chunk in shared memory.
    assert not cuda_emulation.load().resident_layout(dtype, 300, SM86)
    case = OpCase(dtype, "cross", 40, 300)
    assert_product_matches_oracle(emulated_product(SM86), op_inputs(case), dtype, str(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_product_with_copies_landing_at_once(dtype):
    case = OpCase(dtype, "cross", 40, 300)
    for limit in (UNLIMITED, SM86):
        assert_product_matches_oracle(emulated_product(limit, immediate_copies=True), op_inputs(case), dtype, str(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", FIXED_SHIFT_CASES)
def test_product_where_a_fixed_shift_would_fail(kind, dtype):
    # tau = 0.004 (logits spread over hundreds), rows 40x too long, a negative tau: the running
    # max keeps each row's largest term at 1, so fp16 operands neither overflow nor vanish.
    inputs = fixed_shift_inputs(kind, dtype)
    assert_product_matches_oracle(emulated_product(), inputs, dtype, kind, fixed_shift_tolerance(kind, dtype))


def test_fp16_product_of_far_apart_rows_at_a_tiny_tau():
    # Each anchor's candidates in the first tiles lie far from it (scores near -1), its nearest ones
    # come last: with tau = 0.01 the first tiles' terms are ~e^-200 of the final max. Only a max that
    # follows each tile (and rescales what came before) leaves fp16 operands <= 1 that are exact
    # where it matters; a shift fixed by the first tile would overflow fp16 on the later ones.
    g = torch.Generator().manual_seed(12)
    n, d = 70, 32
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    far = torch.nn.functional.normalize(-x[:, None, :] + 0.3 * torch.randn(n, 2, d, generator=g), dim=2)
    near = torch.nn.functional.normalize(x[:, None, :] + 0.6 * torch.randn(n, 1, d, generator=g), dim=2)
    y = torch.cat([far.reshape(-1, d), near.reshape(-1, d)])  # 140 far rows (3 tiles), then 70 near ones
    excluded = torch.full((n, 2), -1, dtype=torch.int32)
    tau = torch.tensor(0.01)
    inputs = (x.half(), y.half(), excluded, tau, torch.ones(n))
    assert_product_matches_oracle(emulated_product(), inputs, torch.float16, "far apart")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_product_rows_without_negatives(dtype):
    # Rows whose only candidates are excluded: lse = -inf and P y = 0, never NaN; and no candidates.
    x, y, excluded, tau, grad_lse = op_inputs(OpCase(dtype, "cross", 70, 24), seed=4)
    y = y[:2]
    excluded[:, :] = -1
    excluded[::3] = torch.tensor([0, 1], dtype=torch.int32)  # every third anchor excludes both candidates
    lse, product = emulated_product()(x, y, excluded, tau)
    assert torch.isinf(lse[::3]).all() and (lse[::3] < 0).all() and (product[::3] == 0).all()
    assert_product_matches_oracle(emulated_product(), (x, y, excluded, tau, grad_lse), dtype, "no negatives")
    lse, product = emulated_product()(x, y[:0], excluded.fill_(-1), tau)
    assert torch.isinf(lse).all() and (lse < 0).all() and (product == 0).all() and product.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_backward_without_dx(dtype):
    # need_dx false: no dx at all (the rows pass does not run), and the same dy, bit for bit.
    emu = cuda_emulation.load()
    x, y, excluded, tau, grad_lse = op_inputs(OpCase(dtype, "cross", 70, 40))
    lse = emu.negative_lse(x, y, excluded, tau, UNLIMITED, False)
    dx, dy = emu.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True, True, UNLIMITED, False)
    no_dx, same_dy = emu.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True, False, UNLIMITED, False)
    assert dx.shape == x.shape and no_dx.numel() == 0 and torch.equal(dy, same_dy)
    nothing = emu.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, False, False, UNLIMITED, False)
    assert all(t.numel() == 0 for t in nothing)
    with pytest.raises(RuntimeError, match="need_dx"):
        emu.negative_lse_backward(grad_lse, x, None, excluded, tau, lse, False, False, UNLIMITED, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_matches_the_cpu_kernel(dtype):
    # Both kernels round the same weights the same way (csrc/lse_math.h), so they agree far
    # closer than either does with float64: up to the last bit of the gradients in the input
    # dtype, where fp32 sums added in another order may round to neighbours (one ulp, eps).
    x, y, excluded, tau, grad_lse = op_inputs(OpCase(dtype, "cross", 70, 40))
    got = emulated()(x, y, excluded, tau, grad_lse, True)
    lse = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True)
    for name, a, b in zip(("lse", "dx", "dy"), got, (lse, dx, dy)):
        assert_rel_close(a, b, 1e-6 if name == "lse" else torch.finfo(dtype).eps, name)


def test_fp16_column_weights_do_not_underflow_next_to_a_large_upstream_gradient():
    # Issue 11 through the column pass: each streamed tile of 64 anchors has its own scale
    # (csrc/lse_math.h), so the 1e5x upstream gradient of anchor 5 leaves the weights of the
    # other tile's anchors alone; with one scale for all of them dy's error is ~0.2 here.
    x, y, excluded, tau, grad_lse = outlier_inputs(128, 40, 64, 1e5)
    lse, dx, dy = emulated()(x, y, excluded, tau, grad_lse, True)
    expected = op_oracle(x, y, excluded, tau, grad_lse)
    for name, got, want in zip(("lse", "dx", "dy"), (lse, dx, dy), expected):
        assert_rel_close(got, want, 1e-5 if name == "lse" else 1e-2, name)
    # The CPU kernel rounds the same weights the same way (see test_rounding_matches_the_cpu_kernel).
    cpu_dx, cpu_dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True)
    assert_rel_close(dx, cpu_dx, torch.finfo(torch.float16).eps, "dx against the CPU kernel")
    assert_rel_close(dy, cpu_dy, torch.finfo(torch.float16).eps, "dy against the CPU kernel")


def test_fp16_symmetric_weights_do_not_underflow_next_to_a_large_upstream_gradient():
    # The same through the symmetric pass (y None, dx = (E + E^T) x): each output row and streamed
    # tile of 64 anchors has its own scale (csrc/lse_math.h's symmetric view); with one scale for
    # all, the rows away from anchor 5's tile lose their precision to fp16's subnormals.
    assert_symmetric_outlier_matches_oracle(emulated())


ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_symmetric_pass_with_an_asymmetric_table(dtype):
    # y None with a table no anchor mirrors: an entry (i, j) drops E[i, j] where anchor i excludes
    # j and E[j, i] where anchor j excludes i, and the tiles only the second masks take the masked
    # path too (the streamed anchors' records).
    assert_op_matches_oracle(emulated(), asymmetric_inputs(dtype), dtype, "asymmetric")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_symmetric_pass_with_lse_spread_too_wide_for_one_shift(dtype):
    # tau = 0.004: lse log2(e) spreads over more than 96 across the rows, so one shared shift
    # would push alpha = w 2^(shift - lse2) out of float32's range: the two-exp formula writes dx.
    assert_wide_spread_matches_oracle(emulated(), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_symmetric_pass_with_rows_without_negatives(dtype):
    # y None: a row without negatives (lse -inf) takes only the other anchors' terms, entries masked
    # both ways give 0 although their exps overflow, and with no negatives at all dx = 0.
    assert_rows_without_negatives_match_oracle(emulated(), dtype)


def test_strided_inputs_and_no_negatives():
    # A transposed view (padded copy on the host) and rows whose only candidate is excluded.
    emu_op = emulated()
    g = torch.Generator().manual_seed(8)
    x = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=0).to(torch.float16).T  # 5 x 3, strided
    y = torch.nn.functional.normalize(torch.randn(1, 3, generator=g), dim=1).to(torch.float16)
    excluded = torch.tensor([[0, -1], [-1, -1], [0, 0], [-1, -1], [0, -1]], dtype=torch.int32)
    tau = torch.tensor(0.5)
    grad_lse = torch.ones(5)
    lse, dx, dy = emu_op(x, y, excluded, tau, grad_lse, True)
    assert torch.isinf(lse[[0, 2, 4]]).all() and torch.isfinite(lse[[1, 3]]).all()
    assert (dx[[0, 2, 4]] == 0).all()
    expected = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    expected_dx, expected_dy = torch.ops.macl_kernels.negative_lse_backward(
        grad_lse, x, y, excluded, tau, expected, True
    )
    assert_rel_close(lse[[1, 3]], expected[[1, 3]], 1e-6, "lse")
    assert_rel_close(dx, expected_dx, 2e-3, "dx")
    assert_rel_close(dy, expected_dy, 2e-3, "dy")
    # No candidates at all: no tile to stream, every anchor without negatives.
    lse, dx, dy = emu_op(x, y[:0], excluded.fill_(-1), tau, grad_lse, True)
    assert torch.isinf(lse).all() and (lse < 0).all() and (dx == 0).all() and dy.shape == (0, 3)
