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

import macl_kernels as mk
from macl_kernels.backends import torch_chunked
from macl_kernels.backends import triton as triton_backend
from macl_kernels.backends.triton import backend as backend_module
from macl_kernels.backends.triton import backward, configs, forward, ops, prologue
from macl_kernels.testing import LAYOUTS, assert_matches_reference, assert_rel_close, make_views

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


def test_prune_hook_keeps_configs_that_fit_and_do_not_spill(monkeypatch):
    monkeypatch.setattr(configs, "shared_memory_limit", lambda: 163 * 1024)  # sm_80
    gpu = configs.GPU_CONFIGS  # 128x64 w4 s3, 64x128 w4 s3, 128x128 w8 s3, 128x64 w8 s2, 64x64 w4 s2
    x = torch.empty(1, 256, dtype=torch.bfloat16)
    # Forward at D = 256: the 3-stage 128-wide candidate tiles overflow 163 KiB.
    assert configs.pruner("BLOCK_M", 0)(gpu, {}, x_ptr=x, BLOCK_D=256, D=256) == [gpu[0], gpu[3], gpu[4]]
    # Row pass at D = 128: 4 warps on a 128-row resident tile spill.
    assert configs.pruner("BLOCK_M", 1)(gpu, {}, x_ptr=x, BLOCK_D=128, D=128) == gpu[1:]
    # Column pass (two live score tiles, the candidates resident): only the small tile is left.
    assert configs.pruner("BLOCK_N", 2)(gpu, {}, x_ptr=x, BLOCK_D=128, D=128) == [gpu[4]]


def test_fp32_dots_are_tf32x3_unless_tf32_is_allowed():
    assert configs.dot_precision(torch.float32, False) == "tf32x3"
    assert configs.dot_precision(torch.float32, True) == "tf32"
    assert configs.dot_precision(torch.float64, True) == "ieee"


@pytest.fixture
def tiny_tiles(monkeypatch):
    """16 x 16 tiles and 16-wide embedding chunks: every block edge and the chunked-D path are hit."""
    tile = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    for kernel in (forward.negative_lse_fixed, backward.rows_fixed, backward.columns_fixed):
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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_chunks(tiny_tiles, dtype):
    z0, z1, _ = make_views(20, 40, dtype, seed=3)
    assert_matches_reference("triton", z0, z1)


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
    lse = ops.negative_lse(x.half(), y.half(), excluded, tau, False)
    dy = ops.negative_lse_columns(x.half(), y.half(), excluded, tau, lse, h, False)
    y64 = y.clone().requires_grad_(True)
    torch_chunked.TorchBackend().negative_lse(x, y64, excluded, tau.double()).mul(h.double()).sum().backward()
    assert_rel_close(dy, y64.grad, 2e-3, "dy")


def _unit_rows(rows, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def test_normalize_gradcheck_with_missing_gradients():
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.normalize(a, b)[:3], (z0, z1))
    assert torch.autograd.gradcheck(lambda a, b: ops.normalize(a, b)[0], (z0, z1))  # u1 and s+ unused


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

    for got, expected in zip(grads(lambda a, b: ops.normalize(a, b)[:3]), grads(by_autograd)):
        assert_rel_close(got, expected, 1e-12, "dz")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_normalize_matches_torch(dtype):
    z0, z1, _ = make_views(19, 33, dtype, seed=6)
    wide = torch.cat([z0, z1], dim=1)  # strided column slices are read in place
    u0, u1, cos, norm0, norm1 = ops.normalize(wide[:, :33], wide[:, 33:])
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
    for z, u in zip((z0, z1), ops.normalize(z0, z1)[:2]):
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
        lse = ops.negative_lse(x, None, excluded, tau, False)
        u0, u1, cos, norm0, _ = ops.normalize(x, x)
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
