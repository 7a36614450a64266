"""The Triton backend's own tests, in Triton's interpreter on the CPU (the conformance suite covers the loss).

Here: availability, block edges and chunked embeddings (tiny tiles forced), the
ops on their own (gradcheck, fake kernels) and the TF32 switch. opcheck of every
op is in conformance/test_opcheck.py, torch.compile tracing in
conformance/test_compile.py, GPU-only checks in test_triton_gpu.py.
"""

import os

import pytest
import torch
import triton
import triton.language as tl

import macl_kernels as mk
from macl_kernels._layouts import layout_exclusions
from macl_kernels._math import accumulation_dtype
from macl_kernels.backends import torch_chunked
from macl_kernels.backends import triton as triton_backend
from macl_kernels.backends.triton import backend as backend_module
from macl_kernels.backends.triton import backward, configs, forward, helpers, operators, prologue
from macl_kernels.backends.triton.launch import Launch
from macl_kernels.testing import LAYOUTS, assert_matches_reference, assert_rel_close, make_views
from python_tests.backends.op_checks import op_oracle, outlier_inputs

INTERPRETED = configs.INTERPRET and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs Triton's interpreter on CPU tensors")


def test_available_wherever_the_interpreter_is_on():
    # Guards against an import error silently removing the backend from the conformance suite.
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in mk.available_backends("cpu")
    if torch.cuda.is_available():
        assert "triton" in mk.available_backends("cuda")


def test_unavailable_reason_says_how_to_enable_it(monkeypatch):
    backend = triton_backend.TritonBackend()
    monkeypatch.setattr(backend_module, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in backend.unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setattr(backend_module, "IMPORT_ERROR", "ImportError: cannot import name 'knobs' from 'triton'")
    assert "pip install triton" in backend.unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(backend_module, "TRITON_INSTALLED", False)
    assert "triton is not installed" in backend.unavailable_reason(torch.device("cuda"))


def test_embedding_chunks_fit_shared_memory_on_gpus(monkeypatch):
    monkeypatch.setattr(configs, "INTERPRET", False)
    assert [configs.block_d(256, 2), configs.block_d(256, 4), configs.block_d(129, 8)] == [256, 128, 64]
    assert [configs.block_d(1, 2), configs.block_d(100, 2), configs.block_d(100, 4)] == [64, 128, 128]
    assert configs.block_d(256, 2, gradient=True) == 128  # fp32 gradient tiles wider than 128 spill


def test_only_tensor_core_dots_at_large_sizes_are_autotuned():
    big = 1 << 20
    assert configs.autotuned(1024, 1024, torch.bfloat16) and configs.autotuned(1024, 1024, torch.float16)
    assert configs.autotuned(1024, 1024, torch.float32)  # TF32 or tf32x3
    assert not configs.autotuned(1024, 1024, torch.float64)  # FMA units, one tile
    assert not configs.autotuned(big // 1024 - 1, 1024, torch.bfloat16)  # small problem


def test_prune_hook_keeps_the_configs_the_table_verified(monkeypatch):
    monkeypatch.setattr(configs, "current_arch", lambda: 90)
    gpu, tiny = configs.GPU_CONFIGS, configs.TINY_CONFIGS  # gpu[4] is the small config
    x = torch.empty(1, 256, dtype=torch.bfloat16)
    args = dict(x_ptr=x, TF32=False, BLOCK_D=128, D=256, ONE_EXP=True)
    key = (90, "columns", "bf16", 128, True)  # D = 256 walked in two 128-wide chunks
    monkeypatch.setitem(configs.verified.CLEAN, key, (configs.shape(gpu[3]), configs.shape(tiny[1])))
    tuned = configs.pruner("columns", "BLOCK_N", 2, tuned=True)
    untuned = configs.pruner("columns", "BLOCK_N", 2, tuned=False)
    assert tuned(configs.GPU_CONFIGS + tiny, {}, **args) == [gpu[3]]  # tiny ones only if no GPU config is clean
    assert untuned([gpu[4]] + tiny, {}, **args) == [tiny[1]]  # the small config spills: the first clean tiny one
    # Nothing clean: the smallest config, which the codegen report's --check then flags.
    monkeypatch.setitem(configs.verified.CLEAN, key, ())
    assert tuned(configs.GPU_CONFIGS + tiny, {}, **args) == [tiny[-1]]
    # The variant and dtype are part of the key: the launch with two factors per score is another kernel.
    assert configs.table_key("columns", dict(args, ONE_EXP=False), 80) == (80, "columns two-factor", "bf16", 128, True)
    fp32 = dict(args, x_ptr=torch.empty(1, 1), TF32=True, WITH_PRODUCT=True, ONLINE=True)
    assert configs.table_key("forward", fp32, 90) == (90, "forward+product online", "tf32", 128, True)


def test_verified_table_has_a_clean_config_for_every_kernel_on_sm80_and_sm90():
    # An empty entry would leave the kernel a spilling config; the codegen report regenerates the table.
    assert {key[0] for key in configs.verified.CLEAN} == {80, 90}
    assert all(configs.verified.CLEAN.values())
    dtypes = {key[2] for key in configs.verified.CLEAN}
    assert dtypes == {"bf16", "fp16", "tf32", "fp32", "fp64"}


def test_prune_hook_estimates_for_targets_without_a_table(monkeypatch):
    monkeypatch.setattr(configs, "current_arch", lambda: 89)  # not in the table: 99 KiB of shared memory
    gpu = configs.GPU_CONFIGS  # 128x64 w4 s3, 64x128 w4 s3, 128x128 w8 s3, 128x64 w8 s2, 64x64 w4 s2
    x = torch.empty(1, 256, dtype=torch.bfloat16)
    forward = configs.pruner("forward", "BLOCK_M", 0, tuned=True)
    # Forward at D = 128: the 3-stage 128-wide candidate tiles and the 128 x 128 tile overflow 99 KiB.
    assert forward(gpu, {}, x_ptr=x, TF32=False, BLOCK_D=128, D=128) == [gpu[0], gpu[3], gpu[4]]
    # Row pass at D = 128: one warpgroup per 64 resident rows, and 3 stages of 128-wide tiles do not fit.
    rows = configs.pruner("backward", "BLOCK_M", 1, tuned=True)
    assert rows(gpu, {}, x_ptr=x, TF32=False, BLOCK_D=128, D=128, ONE_EXP=True) == [gpu[3], gpu[4]]


def test_fp32_dots_are_tf32x3_unless_tf32_is_allowed():
    assert configs.dot_precision(torch.float32, False) == "tf32x3"
    assert configs.dot_precision(torch.float32, True) == "tf32"
    assert configs.dot_precision(torch.float64, True) == "ieee"


@triton.jit
def _tf32_parts_kernel(x_ptr, hi_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(hi_ptr + offsets, helpers.tf32_part(tl.load(x_ptr + offsets)))


@needs_interpreter
def test_tf32x3_split_is_exact():
    # On GPUs tf32x3 dots split each operand into hi (exact in TF32) + lo (their exact fp32 difference).
    g = torch.Generator().manual_seed(12)
    x = torch.cat(
        [torch.randn(1020, generator=g) * 10.0 ** torch.randint(-30, 30, (1020,), generator=g), torch.zeros(4)]
    )
    x[-3:] = torch.tensor([1.0 + 2.0**-11, -(1.0 + 3 * 2.0**-11), 2.0 - 2.0**-20])  # ties round away; carries
    hi = torch.empty_like(x)
    _tf32_parts_kernel[(1,)](x, hi, N=1024)
    assert (hi.view(torch.int32) & 0x1FFF == 0).all()  # 10 mantissa bits left
    assert ((x - hi).abs() <= x.abs() * 2.0**-11).all()  # to nearest
    assert hi[-3:].tolist() == [1.0 + 2.0**-10, -(1.0 + 2 * 2.0**-10), 2.0]


@pytest.fixture
def tiny_tiles(monkeypatch):
    """16 x 16 tiles and 16-wide embedding chunks: every block edge and the chunked-D path are hit."""
    tile = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    for kernel in (
        forward.negative_lse_fixed,
        forward.negative_lse_product_fixed,
        backward.rows_fixed,
        backward.columns_fixed,
    ):
        monkeypatch.setattr(kernel, "configs", [tile])
    monkeypatch.setattr(configs, "MAX_BLOCK_D", 16)
    monkeypatch.setattr(configs, "MIN_BLOCK_D", 16)
    monkeypatch.setattr(prologue, "INTERPRETER_ROWS", 16)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n, d", [(8, 37), (16, 16), (13, 5), (40, 5)])
def test_block_edges_and_embedding_chunks(tiny_tiles, layout, n, d):
    # n = 8: ntxent's positives (r + 8) sit on a tile edge; n = 16: the diagonal and the
    # positives fill whole tiles; n = 13, d = 5: ragged everywhere. d = 37: three chunks.
    # n = 40: interior tiles (no excluded column, no edge) between and after the masked ones.
    z0, z1, bank = make_views(n, d, torch.float64, seed=n + d, bank_rows=19)
    assert_matches_reference("triton", z0, z1, bank if layout == "queue" else None, layout=layout, reduction="none")


@needs_interpreter
@pytest.mark.parametrize("layout", ["ntxent", "cross"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_chunks(tiny_tiles, dtype, layout):
    # cross keeps P y for dx; in fp16 that product always takes the running maximum over the 2 tiles.
    z0, z1, _ = make_views(20, 40, dtype, seed=3)
    assert_matches_reference("triton", z0, z1, layout=layout)


@needs_interpreter
def test_fp16_column_pass_keeps_tiny_weights():
    # Many anchors, each with a tiny E[r, c] = (h / tau) P (here ~1e-7, below fp16's normal range) that
    # add up to a representable dy: the column pass rescales its per-row weights to [-1, 1] first.
    m, c = 4096, 64
    x = _unit_rows(m, 16, 1).abs()
    y = _unit_rows(c, 16, 2)
    excluded = torch.full((m, 2), -1, dtype=torch.int32)
    tau = torch.tensor(1.0)
    h = torch.full((m,), 1e-5)
    lse = operators.negative_lse(x.half(), y.half(), excluded, tau, False)
    dy = operators.negative_lse_columns(x.half(), y.half(), excluded, tau, lse, h, False)
    y64 = y.clone().requires_grad_(True)
    torch_chunked.TorchBackend().negative_lse(x, y64, excluded, tau.double()).mul(h.double()).sum().backward()
    assert_rel_close(dy, y64.grad, 2e-3, "dy")


@needs_interpreter
def test_fp16_column_weights_do_not_underflow_next_to_a_large_upstream_gradient(tiny_tiles):
    # Issue 11 through the column pass: each tile of anchors (16 with tiny_tiles) has its own
    # scale (backward._tile_scale, the rule of csrc/lse_math.h), so the 1e5x upstream gradient
    # of anchor 5 leaves the other tiles' weights alone; with one scale for all anchors the
    # others' p * coef / scale fall below fp16's subnormals and dy's error is ~0.07 here.
    # (At 1e7x the outlier's own p, rounded to fp16 before its factor 1, would underflow.)
    x, y, excluded, tau, grad_lse = outlier_inputs(64, 16, 16, 1e5)
    lse = operators.negative_lse(x, y, excluded, tau, False)
    dx = operators.negative_lse_rows(x, y, excluded, tau, lse, grad_lse, False)
    dy = operators.negative_lse_columns(x, y, excluded, tau, lse, grad_lse, False)
    expected = op_oracle(x, y, excluded, tau, grad_lse)
    for name, got, want in zip(("lse", "dx", "dy"), (lse, dx, dy), expected):
        assert_rel_close(got, want, 1e-5 if name == "lse" else 1e-2, name)


@needs_interpreter
@pytest.mark.parametrize("product", [False, True], ids=["lse", "lse-and-product"])
def test_forward_repairs_only_the_rows_the_fixed_shift_cannot_hold(tiny_tiles, product):
    # The fixed shift (the logit of s = 1) holds every row at tau = 0.5; at tau = 0.005 some rows' sums fall
    # below 2^-60, and at tau = 0.002 their fp32 terms underflow to 0: the first launch marks those rows NaN
    # and the repair launch recomputes them with the running maximum, over 3 candidate tiles (tiny_tiles),
    # so the maximum grows from tile to tile and the sum and P y are rescaled.
    cases = (
        (torch.float64, 0.5, False, 1e-12),
        (torch.float64, 0.005, True, 1e-12),
        (torch.float32, 0.002, True, 1e-5),
    )
    for dtype, tau, repaired, tol in cases:
        x, y = _unit_rows(12, 8, 1, dtype), _unit_rows(40, 8, 2, dtype)
        excluded = torch.full((12, 2), -1, dtype=torch.int32)
        tau_tensor = torch.tensor(tau, dtype=accumulation_dtype(dtype))
        launches = forward.forward_launches(x, y, excluded, tau_tensor, False, product)
        assert bool(launches[0].run().isnan().any()) == repaired
        out = Launch.run_all(launches)
        logits = x.double() @ y.double().T / tau
        where = f"{dtype} at tau={tau}"
        assert_rel_close(out[0] if product else out, torch.logsumexp(logits, dim=1), tol, f"lse, {where}")
        if product:
            assert_rel_close(out[1], torch.softmax(logits, dim=1) @ y.double(), tol, f"P y, {where}")


@needs_interpreter
def test_row_op_takes_P_at_the_lse_it_is_given():
    # With candidates the row op recomputes P y in the forward kernel; E is still exp(s / tau - lse) for the given lse.
    x, y = _unit_rows(8, 5, 7), _unit_rows(6, 5, 8)
    excluded = torch.full((8, 2), -1, dtype=torch.int32)
    tau = torch.tensor(0.2, dtype=torch.float64)
    h = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    lse = operators.negative_lse(x, y, excluded, tau, False)
    dx = operators.negative_lse_rows(x, y, excluded, tau, lse, h, False)
    assert_rel_close(dx, (h / tau)[:, None] * torch.softmax(x @ y.T / tau, dim=1) @ y, 1e-12, "dx")
    assert_rel_close(operators.negative_lse_rows(x, y, excluded, tau, lse + 1.0, h, False), dx / torch.e, 1e-12, "dx")


@needs_interpreter
def test_forward_keeps_P_y_only_when_dx_will_be_needed(monkeypatch):
    x, y = _unit_rows(8, 5, 7), _unit_rows(6, 5, 8)
    excluded = torch.full((8, 2), -1, dtype=torch.int32)
    tau = torch.tensor(0.2, dtype=torch.float64)
    calls = []
    real = operators._differentiable_lse_product  # the product op with its autograd formula
    monkeypatch.setattr(operators, "_differentiable_lse_product", lambda *args: calls.append(1) or real(*args))
    leaves = [x.clone().requires_grad_(True), y.clone().requires_grad_(True)]
    operators.differentiable_negative_lse(*leaves, excluded, tau, False).sum().backward()
    assert calls == [1]
    plain = [x.clone().requires_grad_(True), y.clone().requires_grad_(True)]
    operators.negative_lse(*plain, excluded, tau, False).sum().backward()  # its backward recomputes P y
    for got, expected in zip(leaves, plain):
        assert_rel_close(got.grad, expected.grad, 1e-12, "gradient")
    with torch.no_grad():
        operators.differentiable_negative_lse(*leaves, excluded, tau, False)
    operators.differentiable_negative_lse(x, leaves[1], excluded, tau, False)  # no dx: the plain forward
    operators.differentiable_negative_lse(leaves[0], None, excluded, tau, False)  # ntxent: the symmetric pass
    assert calls == [1]


def test_shared_shift_gives_one_exp_only_within_the_spread():
    weight = torch.tensor([1.0, -0.5, 0.25, 0.5], dtype=torch.float64)
    shift, alpha = backward.shared_shift(torch.tensor([3.0, 50.0, 99.0, float("inf")], dtype=torch.float64), weight)
    assert shift.tolist() == [3.0, 1.0]  # shift = the smallest finite lse2; a spread of 96 still takes one exp
    assert alpha.tolist() == [1.0, -0.5 * 2.0**-47, 0.25 * 2.0**-96, 0.0]  # no negatives (lse2 = inf): 0
    shift, _ = backward.shared_shift(torch.tensor([3.0, 99.5], dtype=torch.float64), weight[:2])
    assert shift.tolist() == [3.0, 0.0]


@needs_interpreter
def test_symmetric_backward_is_exact_with_one_exp_and_with_two():
    x = _unit_rows(8, 6, 3)
    excluded = layout_exclusions("ntxent", 4, "cpu")
    h = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) - 0.3
    for tau, one_exp in ((0.3, True), (0.002, False)):  # at 0.002 the lse spread over the rows is far above 96
        tau = torch.tensor(tau, dtype=torch.float64)
        lse = operators.negative_lse(x, None, excluded, tau, False)
        launches = backward.rows_launches(x, excluded, tau, lse, h, False)
        assert bool(launches[0].args["shift_ptr"][1]) == one_exp
        x64 = x.clone().requires_grad_(True)
        torch_chunked.TorchBackend().negative_lse(x64, None, excluded, tau).mul(h).sum().backward()
        assert_rel_close(Launch.run_all(launches), x64.grad, 1e-10, f"dx at tau={float(tau)}")


def _unit_rows(rows, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def test_normalize_gradcheck_with_missing_gradients():
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: operators.normalize(a, b)[:3], (z0, z1))
    assert torch.autograd.gradcheck(lambda a, b: operators.normalize(a, b)[0], (z0, z1))  # u1 and s+ unused


@needs_interpreter
def test_normalize_backward_of_a_zero_row_equals_autograd_of_f_normalize():
    # Finite differences cannot see through the clamp at 0; autograd of F.normalize is the contract.
    z0, z1, _ = make_views(6, 5, torch.float64, seed=5)
    z0[2] = 0.0
    upstream = [torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    weights = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(normalize):
        a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
        u0, u1, cos = normalize(a, b)
        ((u0 * upstream[0]).sum() + (u1 * upstream[1]).sum() + (cos * weights).sum()).backward()
        return a.grad, b.grad

    def by_autograd(a, b):
        u0, u1 = (torch.nn.functional.normalize(z, dim=1) for z in (a, b))
        return u0, u1, (u0 * u1).sum(1)

    for got, expected in zip(grads(lambda a, b: operators.normalize(a, b)[:3]), grads(by_autograd)):
        assert_rel_close(got, expected, 1e-12, "dz")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_normalize_matches_torch(dtype):
    z0, z1, _ = make_views(19, 33, dtype, seed=6)
    wide = torch.cat([z0, z1], dim=1)  # strided column slices are read in place
    u0, u1, cos, norm0, norm1 = operators.normalize(wide[:, :33], wide[:, 33:])
    exp0, exp1 = (torch.nn.functional.normalize(z.double(), dim=1) for z in (z0, z1))
    tol = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 1e-2
    assert u0.dtype == dtype and cos.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(u0, exp0, tol, "u0")
    assert_rel_close(u1, exp1, tol, "u1")
    assert_rel_close(cos, (exp0 * exp1).sum(1), max(tol, 1e-6), "s+")
    assert_rel_close(norm0, z0.double().norm(dim=1), max(tol, 1e-6), "norm0")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_rows_are_rounded_to_nearest(dtype):
    # The interpreter truncates fp32 -> bf16 where compiled Triton rounds: the kernels round by hand there.
    z0, z1, _ = make_views(50, 77, dtype, seed=5)
    # Truncation would miss about half of the elements by an ulp; a near-tie may flip on the norm's last bit.
    for z, u in zip((z0, z1), operators.normalize(z0, z1)[:2]):
        expected = torch.nn.functional.normalize(z.float(), dim=1).to(dtype)
        assert (u != expected).float().mean() < 0.01
        assert_rel_close(u, expected, 1e-3, "u")


@needs_interpreter
def test_fake_kernels_give_shapes_and_dtypes_only():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 4, dtype=torch.bfloat16)
        excluded = torch.empty(10, 2, dtype=torch.int32)
        tau = torch.empty((), dtype=torch.float32)
        lse = operators.negative_lse(x, None, excluded, tau, False)
        u0, u1, cos, norm0, _ = operators.normalize(x, x)
    assert (lse.shape, lse.dtype) == ((10,), torch.float32)
    assert (u0.shape, u0.dtype, cos.dtype, norm0.shape) == ((10, 4), torch.bfloat16, torch.float32, (10,))


def test_fp32_dots_follow_the_tf32_setting():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision setting")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert backend_module.fp32_dots_use_tf32()
        matmul.fp32_precision = "ieee"
        assert not backend_module.fp32_dots_use_tf32()
    finally:
        matmul.fp32_precision = before
    assert backend_module.fp32_dots_use_tf32() is bool(matmul.allow_tf32)
