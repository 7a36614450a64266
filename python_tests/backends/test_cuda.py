"""The CUDA backend's own tests, on a GPU (gpu-marked: benchmarks/gpu_check.sh runs them).

The conformance suite runs the loss through it with MACL_TEST_DEVICE=cuda. Here: it
is built and available; the op on every kind of excluded table and dtype at the edges
of its tiles, gradient chunks and shared-memory layouts (op_checks.OP_CASES, the cases
test_cuda_emulated.py runs on the CPU); the forward that keeps P y (PRODUCT_CASES,
extreme logits, N = 32768); the loss at tile edges and where many tiles and feature
chunks meet; agreement with the C++ CPU kernel; bitwise determinism run to run;
opcheck; the current stream without host synchronization; N = 32768; memory.
"""

import pytest
import torch

import macl_kernels as mk
from macl_kernels import _extension_ops
from macl_kernels._layouts import layout_exclusions
from macl_kernels.testing import (
    LAYOUTS,
    assert_matches_reference,
    assert_rel_close,
    bitwise_equal,
    loss_and_grads,
    make_views,
)
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
)

pytestmark = pytest.mark.gpu


def cuda_op(x, y, excluded, tau, grad_lse, need_dy):
    """The op and its backward on the GPU: (lse, dx, dy)."""
    lse = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, need_dy)
    return lse, dx, dy


def cuda_product(x, y, excluded, tau):
    """The forward that keeps P y: (lse, P y)."""
    return torch.ops.macl_kernels.negative_lse_product(x, y, excluded, tau)


# The op as the backend runs it with candidates: the product forward, dx = (h / tau) P y, the
# backward kernel for dy alone (need_dx false).
cuda_op_with_product = op_with_product(cuda_product, torch.ops.macl_kernels.negative_lse_backward)


def views(n, d, dtype=torch.float32, seed=0, layout="ntxent", bank_rows=37):
    z0, z1, bank = make_views(n, d, dtype, seed=seed, device="cuda", bank_rows=bank_rows)
    return z0, z1, (bank if layout == "queue" else None)


def test_built_with_cuda_kernels_and_available():
    assert _extension_ops.LOAD_ERROR is None, _extension_ops.LOAD_ERROR
    assert "cuda" in _extension_ops.KERNEL_DEVICES, "rebuild the extension here (or with MACL_KERNELS_CUDA=1)"
    assert "cuda" in mk.available_backends("cuda")


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_op_matches_float64(case):
    assert_op_matches_float64(cuda_op, case, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", FIXED_SHIFT_CASES)
def test_rows_the_fixed_shift_cannot_hold(kind, dtype):
    inputs = fixed_shift_inputs(kind, dtype, "cuda")
    assert_op_matches_oracle(cuda_op, inputs, dtype, kind, fixed_shift_tolerance(kind, dtype))


ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("case", PRODUCT_CASES, ids=str)
def test_product_matches_float64(case):
    # The forward with P y (csrc/cuda/forward_product.cuh) and the gradients the backend takes from it.
    assert_product_matches_oracle(cuda_product, op_inputs(case, "cuda"), case.dtype, str(case))
    assert_op_matches_float64(cuda_op_with_product, case, "cuda")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", FIXED_SHIFT_CASES)
def test_product_at_extreme_logits(kind, dtype):
    # The running max keeps each row's largest term at 1: fp16 operands neither overflow nor vanish.
    inputs = fixed_shift_inputs(kind, dtype, "cuda")
    assert_product_matches_oracle(cuda_product, inputs, dtype, kind, fixed_shift_tolerance(kind, dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_symmetric_pass_with_an_asymmetric_table(dtype):
    # y None (csrc/cuda/symmetric_grad.cuh): E[i, j] dropped where anchor i excludes j, E[j, i] where
    # anchor j excludes i, for a table no anchor mirrors (test_cuda_emulated.py's twin).
    assert_op_matches_oracle(cuda_op, asymmetric_inputs(dtype, "cuda"), dtype, "asymmetric")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_symmetric_pass_with_lse_spread_too_wide_for_one_shift(dtype):
    # tau = 0.004: the two-exp formula of the symmetric pass writes dx (test_cuda_emulated.py's twin).
    assert_wide_spread_matches_oracle(cuda_op, dtype, "cuda")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_symmetric_pass_with_rows_without_negatives(dtype):
    # y None, anchor 0 without negatives (lse -inf), overflowing exps on the entries masked both ways.
    assert_rows_without_negatives_match_oracle(cuda_op, dtype, "cuda")


def test_fp16_symmetric_weights_do_not_underflow_next_to_a_large_upstream_gradient():
    # test_cuda_emulated.py's case on the GPU (the symmetric pass's per-row, per-tile fp16 scales).
    assert_symmetric_outlier_matches_oracle(cuda_op, "cuda")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["ntxent", "cross", "random"])
def test_op_bitwise_deterministic(dtype, layout):
    # Several CTAs per SM and many tiles; the op twice on the same inputs gives the same bits.
    x, y, excluded, tau, grad_lse = op_inputs(OpCase(dtype, layout, 1500, 72), "cuda", seed=9)
    first = cuda_op(x, y, excluded, tau, grad_lse, y is not None)
    second = cuda_op(x, y, excluded, tau, grad_lse, y is not None)
    assert bitwise_equal(
        [t for t in first if t is not None and t.numel()], [t for t in second if t is not None and t.numel()]
    )


@pytest.mark.parametrize("n", [15, 16, 17, 32, 33, 100])  # 2n rows: edges of the 16-, 32- and 64-row tiles
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_tile_edges_match_reference(n, layout, dtype):
    z0, z1, bank = views(n, 19, dtype, seed=n, layout=layout, bank_rows=65)
    assert_matches_reference("cuda", z0, z1, bank, layout=layout, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_tiles_and_feature_chunks_match_reference(dtype, layout):
    # D = 130: two 128-feature gradient chunks (fp16/bf16, tensor cores) or three of 64 (fp32).
    z0, z1, bank = views(1000, 130, dtype, seed=1, layout=layout, bank_rows=777)
    assert_matches_reference("cuda", z0, z1, bank, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_agrees_with_the_cpu_kernel(layout):
    z0, z1, bank = views(300, 64, seed=2, layout=layout)
    cuda = loss_and_grads(z0, z1, bank, backend="cuda", layout=layout, reduction="none")
    cpu_bank = None if bank is None else bank.cpu()
    cpu = loss_and_grads(z0.cpu(), z1.cpu(), cpu_bank, backend="cpp", layout=layout, reduction="none")
    for name, got, expected in zip(("loss", "dz0", "dz1"), [cuda[0], *cuda[1]], [cpu[0], *cpu[1]]):
        assert_rel_close(got.cpu(), expected, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(dtype, layout):
    z0, z1, bank = views(700, 96, dtype, seed=3, layout=layout)
    first = loss_and_grads(z0, z1, bank, backend="cuda", layout=layout)
    second = loss_and_grads(z0, z1, bank, backend="cuda", layout=layout)
    assert bitwise_equal([first[0], *first[1]], [second[0], *second[1]])


def op_args(dtype=torch.float32, with_candidates=False):
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(70, 24, generator=g), dim=1).to("cuda", dtype)
    y = torch.nn.functional.normalize(torch.randn(45, 24, generator=g), dim=1).to("cuda", dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(0.2, dtype=acc, device="cuda")
    if with_candidates:
        return x, y, layout_exclusions("queue", 70, x.device), tau
    return x, None, layout_exclusions("ntxent", 35, x.device), tau


@pytest.mark.parametrize("with_candidates", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype, with_candidates):
    x, y, excluded, tau = op_args(dtype, with_candidates)
    args = (x.requires_grad_(True), None if y is None else y.requires_grad_(True), excluded, tau)
    torch.library.opcheck(torch.ops.macl_kernels.negative_lse.default, args)


def test_current_stream_and_no_host_synchronization():
    x, y, excluded, tau = op_args(torch.bfloat16, with_candidates=True)
    expected = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")
        try:
            lse = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
            dx, dy = torch.ops.macl_kernels.negative_lse_backward(torch.ones_like(lse), x, y, excluded, tau, lse, True)
            product_lse, product = cuda_product(x, y, excluded, tau)
            _, product_dy = torch.ops.macl_kernels.negative_lse_backward(
                torch.ones_like(lse), x, y, excluded, tau, lse, True, False
            )
        finally:
            torch.cuda.set_sync_debug_mode(0)
    stream.synchronize()
    expected_dx, expected_dy = torch.ops.macl_kernels.negative_lse_backward(
        torch.ones_like(expected), x, y, excluded, tau, expected, True
    )
    assert torch.equal(lse, expected) and torch.equal(dx, expected_dx) and torch.equal(dy, expected_dy)
    assert torch.equal(product_dy, dy) and torch.equal(cuda_product(x, y, excluded, tau)[1], product)
    assert_rel_close(product_lse, lse, 1e-5, "the product forward's lse")
    # ... and those values are right: the torch backend in float64 on the same inputs.
    oracle = op_oracle(x, y, excluded, tau, torch.ones_like(expected))
    for name, got, want in zip(("lse", "dx", "dy"), (lse, dx, dy), oracle):
        assert_rel_close(got, want, 1e-2, name)


def test_memory_stays_linear_in_the_batch():
    # N = 32768 pairs, ntxent: the dense 65536 x 65536 similarities would take 8 GiB in bf16.
    z0, z1, _ = views(32768, 128, torch.bfloat16, seed=5)
    z0.requires_grad_(True)
    z1.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mk.macl_loss(z0, z1, backend="cuda").backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 512 * 2**20  # O(N * D): inputs, normalized copies, grads


def rows_near_one_direction(rows, d, dtype, seed):
    """Unit rows on the GPU scattered around one random direction (near-uniform softmax, gradients in fp16's range)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(d, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(rows, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(center + noise).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["ntxent", "cross"])
@pytest.mark.parametrize("outliers", [False, True], ids=["uniform", "outliers"])
def test_large_batch_weights_do_not_underflow(dtype, layout, outliers):
    # Issue 11 at N = 32768 pairs (65536 ntxent anchors): with coef = 1 / (M tau) and p ~ 1 / M
    # the weights E = coef * p (~2e-9) are below fp16's smallest subnormal, so the kernels
    # round p times a factor <= 1 and apply the rest in float32 (csrc/lse_math.h; the CPU
    # twin is test_cpp.py::test_fp16_weights_do_not_underflow_at_32k). Rows near one
    # direction keep probabilities near-uniform and the gradients in fp16's normal range.
    # With `outliers`, one anchor's upstream gradient is 1e5 times the others', another's 1e3
    # times, in different tiles: through the column pass (cross: dy = E^T x) and the symmetric
    # pass (ntxent: dx = (E + E^T) x) each tile of 64 anchors in fp16 (in the symmetric pass each
    # output row with it) has its own scale, so the other anchors' weights p * coef / scale stay
    # above fp16's subnormals (CPU twin: test_cpp.py::test_fp16_column_weights_do_not_underflow_
    # next_to_large_upstream_gradients; emulated: test_cuda_emulated.py's).
    n = 32768
    rows = rows_near_one_direction(2 * n, 128, dtype, seed=8 if outliers else 6)
    x, y = (rows, None) if layout == "ntxent" else (rows[:n], rows[n:])
    excluded = layout_exclusions(layout, n, x.device)
    tau = torch.tensor(0.1, device="cuda")
    m = x.shape[0]
    grad_lse = torch.full((m,), 1.0 / m, device="cuda")
    if outliers:
        grad_lse[m // 3] *= 1e5
        grad_lse[2 * m // 3] *= 1e3
    lse = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, y is not None)
    oracle = op_oracle(x, y, excluded, tau, grad_lse)
    assert_rel_close(lse, oracle[0], 1e-5, "lse")
    assert_rel_close(dx, oracle[1], 1e-2, "dx")
    if y is not None:
        assert_rel_close(dy, oracle[2], 1e-2, "dy")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_product_at_32k_pairs_matches_float64(dtype):
    # cross at N = 32768, D = 128 (the case of issue 11's 2x target): lse and P y against float64,
    # and the gradients the backend takes from them (dx from P y, dy from the column pass alone).
    n = 32768
    rows = rows_near_one_direction(2 * n, 128, dtype, seed=10)
    x, y = rows[:n], rows[n:]
    excluded = layout_exclusions("cross", n, x.device)
    tau = torch.tensor(0.1, device="cuda")
    grad_lse = torch.full((n,), 1.0 / n, device="cuda")
    assert_product_matches_oracle(cuda_product, (x, y, excluded, tau, grad_lse), dtype, f"{dtype} cross 32k")
    lse, dx, dy = cuda_op_with_product(x, y, excluded, tau, grad_lse, True)
    oracle = op_oracle(x, y, excluded, tau, grad_lse)
    assert_rel_close(dx, oracle[1], 1e-2, "dx")
    assert_rel_close(dy, oracle[2], 1e-2, "dy")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_at_32k_pairs_matches_float64(dtype):
    # The whole loss at N = 32768 (ntxent), against the torch backend in float64 on the GPU.
    z0, z1, _ = views(32768, 128, dtype, seed=7)
    loss, grads = loss_and_grads(z0, z1, backend="cuda")
    ref_loss, ref_grads = loss_and_grads(z0.double(), z1.double(), backend="torch")
    assert_rel_close(loss, ref_loss, 1e-2, "loss")
    for name, got, want in zip(("dz0", "dz1"), grads, ref_grads):
        assert_rel_close(got, want, 1e-2, name)
