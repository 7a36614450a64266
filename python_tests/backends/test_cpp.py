"""The C++ CPU backend's own tests (the conformance suite covers the loss itself).

Here: that it is built and picked by ``auto``, block edges of its tiles and of its
symmetric schedule, the op against the chunked torch backend on arbitrary excluded
tables, no gradient work for candidates that do not require one, every compiled
instruction-set variant, determinism across thread counts, opcheck, the memory bound,
and the error without the extension.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import macl_kernels as mk
from macl_kernels import _extension_ops, backends
from macl_kernels._layouts import layout_exclusions
from macl_kernels.backends.torch_chunked import TorchBackend
from macl_kernels.testing import (
    LAYOUTS,
    assert_matches_reference,
    assert_rel_close,
    bitwise_equal,
    loss_and_grads,
    make_views,
    peak_rss_mb,
    relative_error,
)
from python_tests.backends.op_checks import (
    FIXED_SHIFT_CASES,
    OpCase,
    assert_product_matches_oracle,
    fixed_shift_inputs,
    fixed_shift_tolerance,
    op_inputs,
    random_exclusions,
)

BLOCK = 256  # kBlock of csrc/cpu/negative_lse_cpu.cpp
CPU = torch.device("cpu")


def test_built_and_picked_by_auto():
    # Guards against a build or import failure silently removing "cpp" from the conformance suite.
    assert _extension_ops.LOAD_ERROR is None, _extension_ops.LOAD_ERROR
    assert "cpp" in mk.available_backends("cpu")
    assert backends.resolve("auto", CPU).name == "cpp"


def test_cpp_is_for_cpu_tensors_only():
    reason = backends.CPP.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "CPU tensors" in reason


# N pairs -> M = 2N ntxent rows: one block plus a sliver, two blocks (even schedule),
# three and five blocks (odd schedules with a resting block each round), all with the
# positives' columns in other blocks than their rows.
@pytest.mark.parametrize("n", [129, 256, 384, 640])
def test_symmetric_schedule_block_edges(n):
    z0, z1, _ = make_views(n, 7, torch.float64, seed=n)
    assert_matches_reference("cpp", z0, z1, reduction="none")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rectangular_block_edges(layout):
    # 257 anchors (a one-row second block) against 2 * 257 or 257 + 300 candidates.
    z0, z1, bank = make_views(BLOCK + 1, 5, torch.float64, seed=3, bank_rows=300)
    assert_matches_reference("cpp", z0, z1, bank if layout == "queue" else None, layout=layout, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("with_candidates", [False, True])
def test_op_matches_torch_backend_on_any_exclusions(with_candidates, dtype):
    # The contract of backends.base: y = None means y is x, and nothing forces the
    # table to be symmetric; rows and columns of a symmetric tile are masked apart (for
    # fp16, in both of the rounded views of csrc/lse_math.h). The torch backend runs in
    # float64 on the same values.
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(2 * BLOCK + 45, 6, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(BLOCK + 3, 6, generator=g, dtype=torch.float64), dim=1)
    x, y = x.to(dtype).double(), y.to(dtype).double()
    y = y if with_candidates else None
    cols = x.shape[0] if y is None else y.shape[0]
    excluded = random_exclusions(x.shape[0], cols, seed=5)
    upstream = torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    results = []
    for backend, run_dtype in ((backends.CPP, dtype), (TorchBackend(), torch.float64)):
        xs = x.to(run_dtype).requires_grad_(True)
        ys = None if y is None else y.to(run_dtype).requires_grad_(True)
        tau = torch.tensor(0.2, dtype=torch.float64 if run_dtype == torch.float64 else torch.float32)
        lse = backend.negative_lse(xs, ys, excluded, tau)
        (lse * upstream.to(lse.dtype)).sum().backward()
        results.append([lse.detach(), xs.grad] + ([] if ys is None else [ys.grad]))
    for name, got, expected in zip(("lse", "dx", "dy"), *results):
        assert_rel_close(got, expected, 1e-12 if dtype == torch.float64 else 1e-3, name)


class _KernelCalls(TorchDispatchMode):
    """The extension's ops run under it: (op name, need_dy, need_dx) of each backward call, the name of the others."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.macl_kernels.negative_lse_backward:
            need_dx = args[7] if len(args) > 7 else (kwargs or {}).get("need_dx", True)
            self.calls.append(("backward", args[6], need_dx))
        elif func.namespace == "macl_kernels":
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["cross", "random"])
def test_product_matches_float64(dtype, layout):
    # lse and P y of the product op: 600 anchors against 613 candidates, three blocks of 256
    # columns, so that a row's running max rises from block to block (its sum and product rescaled).
    case = OpCase(dtype, layout, 600, 24)
    assert_product_matches_oracle(torch.ops.macl_kernels.negative_lse_product, op_inputs(case), dtype, str(case))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", FIXED_SHIFT_CASES)
def test_product_at_extreme_logits(kind, dtype):
    # tau = 0.004, rows 40x too long, a negative tau: each row's largest term is 1 whatever its logits.
    inputs = fixed_shift_inputs(kind, dtype)
    product = torch.ops.macl_kernels.negative_lse_product
    assert_product_matches_oracle(product, inputs, dtype, kind, fixed_shift_tolerance(kind, dtype))


@pytest.mark.parametrize("bank_requires_grad", [False, True])
def test_candidates_get_gradient_work_only_when_they_require_a_gradient(bank_requires_grad):
    # MATH.md section 8: a bank without gradient costs no gradient work (macl_kernels/_extension_ops.py asks for no
    # dy); and dx comes from the forward's P y (negative_lse_product): the backward kernel runs for dy alone.
    z0, z1, bank = make_views(8, 4, seed=3, bank_rows=5)
    bank.requires_grad_(bank_requires_grad)
    with _KernelCalls() as forward:
        loss = mk.macl_loss(z0.requires_grad_(True), z1, layout="queue", negatives=bank, backend="cpp")
    with _KernelCalls() as backward:
        loss.backward()
    assert forward.calls == ["negative_lse_product"]
    assert backward.calls == ([("backward", True, False)] if bank_requires_grad else [])


def test_without_an_anchor_gradient_the_forward_keeps_no_product():
    # No dx needed (frozen anchors, or no grad mode): the plain forward, and the backward kernel for dy alone.
    # (need_dx false: the row pass for a dx that nothing needs would be a whole pass over S thrown away.)
    z0, z1, bank = make_views(8, 4, seed=3, bank_rows=5)
    with _KernelCalls() as forward:
        loss = mk.macl_loss(z0, z1, layout="queue", negatives=bank.requires_grad_(True), backend="cpp")
    with _KernelCalls() as backward:
        (bank_grad,) = torch.autograd.grad(loss, bank)
    assert forward.calls == ["negative_lse"] and backward.calls == [("backward", True, False)]
    (expected,) = torch.autograd.grad(mk.macl_loss(z0, z1, layout="queue", negatives=bank, backend="torch"), bank)
    assert_rel_close(bank_grad, expected, 1e-5, "the bank's gradient")


def test_backward_without_dx_needs_candidates_in_the_kernel_and_its_fake():
    # Without y, dx holds both roles: need_dx = False is refused by the op and, alike, by its fake kernel.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    excluded = layout_exclusions("ntxent", 3, x.device)
    tau, grad = torch.tensor(0.5), torch.ones(6)
    lse = torch.ops.macl_kernels.negative_lse(x, None, excluded, tau)
    with pytest.raises(RuntimeError, match="need_dx = false needs y"):
        torch.ops.macl_kernels.negative_lse_backward(grad, x, None, excluded, tau, lse, False, False)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="need_dx = false needs y"):
        fake = [mode.from_tensor(t) for t in (grad, x, excluded, tau, lse)]
        torch.ops.macl_kernels.negative_lse_backward(fake[0], fake[1], None, fake[2], fake[3], fake[4], False, False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_bits_for_any_number_of_threads(layout):
    # The tiles of a round run in parallel but each block's contributions arrive in the
    # schedule's order, and every gemm is BLAS's sequential one whatever the thread count
    # (csrc/cpu/blas_threads.h: MKL plans its blocking for the global thread count
    # otherwise), so 1, 2 or 3 threads give identical results. Odd 300-pair problems give
    # tiles with a partial block, where MKL's plans for 1 and 2 threads differ.
    z0, z1, bank = make_views(300, 16, seed=10, bank_rows=BLOCK + 20)
    bank = bank if layout == "queue" else None
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads in (2, 1, 3, 2):
            torch.set_num_threads(n_threads)
            loss, grads = loss_and_grads(z0, z1, bank, backend="cpp", layout=layout, reduction="none")
            runs.append([loss, *grads])
    finally:
        torch.set_num_threads(threads)
    assert all(bitwise_equal(runs[0], run) for run in runs[1:])


def test_leaves_the_callers_blas_threading_as_it_was():
    # The op makes its gemms sequential for its own duration only: afterwards a gemm in
    # the calling thread runs as before (with MKL, 2 threads plan this 256 x 88 product,
    # the kernel's own kind of call, differently from 1, so a setting left behind would
    # change these bits).
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(256, 16, generator=g), torch.randn(88, 16, generator=g)

    def product():
        return torch.addmm(torch.empty(256, 88), a, b.T, beta=0, alpha=5.0)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        before = product()
        z0, z1, _ = make_views(300, 16, seed=10)
        loss_and_grads(z0, z1, None, backend="cpp")
        after = product()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(before, after)


VARIANT_SCRIPT = """
import sys, torch
from macl_kernels.testing import assert_matches_reference, make_views
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1], torch.backends.cpu.get_cpu_capability()
for layout in ("ntxent", "cross_sym"):
    for dtype in (torch.float32, torch.float64):
        z0, z1, _ = make_views(300, 13, dtype, seed=11)
        assert_matches_reference("cpp", z0, z1, layout=layout)
print("ok")
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_every_instruction_set_variant(capability):
    # ATen's capability (the ambient one runs in every other test) also picks the tile passes.
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("x86 CPU with AVX2 needed")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    out = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT, capability], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


MISSING_EXTENSION_SCRIPT = """
import sys
sys.modules["macl_kernels._C"] = None  # as if the extension had not been built
import torch, macl_kernels as mk
assert "cpp" not in mk.available_backends("cpu")
z0, z1 = torch.randn(8, 4), torch.randn(8, 4)
assert torch.isfinite(mk.macl_loss(z0, z1))  # auto falls back to torch
try:
    mk.macl_loss(z0, z1, backend="cpp")
except RuntimeError as e:
    print(e)
"""


def test_missing_extension_keeps_the_package_usable_and_says_how_to_build():
    out = subprocess.run([sys.executable, "-c", MISSING_EXTENSION_SCRIPT], capture_output=True, text=True, check=True)
    message = out.stdout.strip()
    assert "backend 'cpp' cannot run on cpu" in message
    assert "macl_kernels._C" in message and "make install" in message


@pytest.mark.slow
def test_memory_bound_at_16k_pairs():
    # N = 16384 pairs, ntxent: the dense 32768 x 32768 float32 matrix alone is 4 GiB.
    # The step's own peak (RSS above its start) stays under 256 MiB: measured 47 MiB on
    # 2026-11-28; the blocks of scratch are O(block * C), the rest O(N * D).
    assert peak_rss_mb(16384, 64, "cpp") < 256


def clustered_rows(n: int, d: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """n unit rows near one common direction: near-uniform probabilities, a large mean."""
    center = torch.randn(d, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(center + spread * torch.randn(n, d, generator=generator, dtype=torch.float64))


def fp16_cross_at_32k(seed: int):
    """(x, y, excluded, generator): N = 32768 fp16 anchors and candidates near one direction, cross layout.

    Near-uniform probabilities (p ~ 1 / N) keep the gradients themselves in fp16's normal range.
    """
    n, d = 32768, 8
    g = torch.Generator().manual_seed(seed)
    common = clustered_rows(2 * n, d, 0.3, g)
    return common[:n].half(), common[n:].half(), layout_exclusions("cross", n, CPU), g


def sampled_oracle(x, y, lse, grad_lse, tau: float, g: torch.Generator, sample: int = 256, also=()):
    """The cross layout's float64 dx on sampled anchors (and `also`), dy on sampled candidates.

    Returns (rows, expected dx[rows], p[rows, :]), (cols, expected dy[cols], p[:, cols]), coef.
    """
    n = x.shape[0]
    x64, y64, coef = x.double(), y.double(), grad_lse.double() / tau
    rows = torch.cat([torch.randperm(n, generator=g)[:sample], torch.tensor(also, dtype=torch.long)])
    logits = (x64[rows] @ y64.T) / tau
    logits[torch.arange(rows.numel()), rows] = float("-inf")  # cross: the positive is not a negative
    p_rows = torch.softmax(logits, dim=1)
    assert_rel_close(lse[rows], torch.logsumexp(logits, dim=1), 1e-6, "lse")
    expected_dx = coef[rows, None] * (p_rows @ y64)
    cols = torch.randperm(n, generator=g)[:sample]
    logits_t = (x64 @ y64[cols].T) / tau - lse.double()[:, None]
    logits_t[cols, torch.arange(sample)] = float("-inf")
    p_cols = logits_t.exp()  # p[r, c] for every anchor r and the sampled candidates c
    expected_dy = (coef[:, None] * p_cols).T @ x64
    return (rows, expected_dx, p_rows), (cols, expected_dy, p_cols), coef


def test_fp16_weights_do_not_underflow_at_32k():
    # Issue 11: a backward weight E = coef * p, with coef = dL/dlse / tau = 1 / (N tau) for a
    # mean over N = 32768 anchors at tau = 0.1 (3e-4) and p ~ 1 / N (3e-5), is ~1e-8: below
    # half of fp16's smallest subnormal (6e-8), so rounding E to fp16 for a half-precision
    # product (the old CUDA rule, emulated below) makes nearly every weight 0. The kernels
    # round p (<= 1) times a factor <= 1 instead and apply the rest of coef in float32
    # (csrc/lse_math.h); the CPU kernel rounds the same way, so this guards the rule.
    x, y, excluded, g = fp16_cross_at_32k(13)
    n = x.shape[0]
    tau = torch.tensor(0.1)
    grad_lse = torch.full((n,), 1.0 / n)
    lse = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True)
    (rows, expected_dx, p_rows), (cols, expected_dy, p_cols), coef = sampled_oracle(x, y, lse, grad_lse, 0.1, g)
    assert_rel_close(dx[rows], expected_dx, 1e-2, "dx")
    assert_rel_close(dy[cols], expected_dy, 1e-2, "dy")

    # The old rule on the same values: the negatives' gradient is gone.
    x64, y64 = x.double(), y.double()
    old_dx = (coef[rows, None] * p_rows).half().double() @ y64
    old_dy = (coef[:, None] * p_cols).half().double().T @ x64
    assert relative_error(old_dx, expected_dx) > 0.5 and relative_error(old_dy, expected_dy) > 0.5


def test_fp16_column_weights_do_not_underflow_next_to_large_upstream_gradients():
    # Issue 11 again, through the column view (dy = E^T x, a sum over anchors): its weights are
    # rounded as p * coef[r] / scale with the scale multiplied back in float32. With one scale
    # for all anchors, max |coef|, one anchor whose upstream gradient is 1e3 or 1e5 times the
    # others' (per-sample weights, MACL's reweighting) makes every other p * coef / scale
    # ~1 / (N outlier): below fp16's subnormals, at a ratio that falls as N grows (here dy's
    # error is over 0.2 with either outlier, checked below). Each tile of 64 anchors has its
    # own scale now (csrc/lse_math.h), the CUDA kernels' rule that the CPU kernel rounds the
    # same way: only the outlier's own tile shares its scale. One run holds both outliers,
    # in different tiles.
    x, y, excluded, g = fp16_cross_at_32k(17)
    n = x.shape[0]
    tau = torch.tensor(0.1)
    grad_lse = torch.full((n,), 1.0 / n)
    outliers = {n // 3: 1e5, 2 * n // 3: 1e3}
    for row, factor in outliers.items():
        grad_lse[row] *= factor
    lse = torch.ops.macl_kernels.negative_lse(x, y, excluded, tau)
    dx, dy = torch.ops.macl_kernels.negative_lse_backward(grad_lse, x, y, excluded, tau, lse, True)
    (rows, expected_dx, _), (cols, expected_dy, p_cols), coef = sampled_oracle(
        x, y, lse, grad_lse, 0.1, g, also=list(outliers)
    )
    assert_rel_close(dx[rows], expected_dx, 1e-2, "dx")  # the row view: each row its own coef
    assert_rel_close(dy[cols], expected_dy, 1e-2, "dy")

    # One scale for the whole problem, on the same values (and on the 1e3 outlier alone):
    # the other anchors' share of dy is gone.
    def whole_problem_scale_error(coef):
        scale = coef.abs().max()
        old_dy = ((coef / scale)[:, None] * p_cols).half().double().T @ x.double() * scale
        return relative_error(old_dy, (coef[:, None] * p_cols).T @ x.double())

    only_1e3 = coef.clone()
    only_1e3[n // 3] = only_1e3[0]
    assert whole_problem_scale_error(coef) > 0.2 and whole_problem_scale_error(only_1e3) > 0.2
