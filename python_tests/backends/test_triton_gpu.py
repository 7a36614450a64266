"""The Triton backend on a real GPU: compiled kernels, torch.compile with inductor, no host sync, CUDA graphs.

All gpu-marked: skipped without CUDA, run by benchmarks/gpu_check.sh
(``python3 -m pytest -m gpu python_tests``). The loss values themselves are
checked by the conformance suite with ``MACL_TEST_DEVICE=cuda``.
"""

import pytest
import torch

import macl_kernels as mk
from macl_kernels._layouts import layout_exclusions
from macl_kernels.testing import (
    assert_compiled_matches_eager,
    assert_dynamic_compile_matches_eager,
    assert_matches_reference,
    bitwise_equal,
    loss_and_grads,
    make_views,
)

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _step(z0, z1, **kwargs):
    a, b = z0.detach().clone().requires_grad_(True), z1.detach().clone().requires_grad_(True)
    loss = mk.macl_loss(a, b, backend="triton", **kwargs)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def test_auto_picks_triton_on_cuda():
    assert mk.backends.resolve("auto", torch.device(DEVICE)).name == "triton"


def test_autotuned_sizes_match_reference():
    # M * C above the small-problem threshold: the autotuned kernels, bf16 tensor cores (ntxent
    # only: each layout compiles its own kernel variants, and the session's minutes are counted).
    z0, z1, _ = make_views(1100, 128, torch.bfloat16, seed=1, device=DEVICE)
    assert_matches_reference("triton", z0, z1)


def test_tf32_dots_within_the_tf32_tolerance():
    z0, z1, _ = make_views(700, 96, torch.float32, seed=2, device=DEVICE)
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None)
    try:
        if before is None:
            matmul.allow_tf32 = True
        else:
            matmul.fp32_precision = "tf32"
        assert_matches_reference("triton", z0, z1, tol=1e-3)
    finally:
        if before is None:
            matmul.allow_tf32 = False
        else:
            matmul.fp32_precision = before


def test_no_host_synchronization_in_forward_and_backward():
    z0, z1, _ = make_views(600, 64, torch.bfloat16, seed=3, device=DEVICE)
    _step(z0, z1)  # compile and autotune first: autotuning synchronizes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(z0, z1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_training_step_captures_in_a_cuda_graph():
    z0, z1, _ = make_views(300, 64, torch.float32, seed=4, device=DEVICE)
    a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        for _ in range(2):
            a.grad = b.grad = None
            mk.macl_loss(a, b, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(side)
    a.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = mk.macl_loss(a, b, backend="triton")
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    expected = _step(z0, z1)
    assert bitwise_equal([loss.detach(), a.grad, b.grad], list(expected))


@pytest.mark.parametrize("layout", ["ntxent", "queue"])
def test_inductor_compiled_step_matches_eager(layout):
    assert_compiled_matches_eager("triton", layout, compiler="inductor", device=DEVICE, n=256, d=64)


def test_inductor_dynamic_step_is_one_graph_for_every_batch_size():
    """dynamic=True with the triton_ops inside inductor's graph: N = 16, 24, 40 through one graph."""
    assert_dynamic_compile_matches_eager("triton", "ntxent", compiler="inductor", device=DEVICE, d=64)


def test_opcheck_of_the_triton_ops():
    from macl_kernels.backends.triton import operators

    g = torch.Generator().manual_seed(6)
    x = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1).to(DEVICE)
    excluded = layout_exclusions("ntxent", 20, DEVICE)
    tau = torch.tensor(0.1, device=DEVICE)
    torch.library.opcheck(operators.negative_lse, (x.clone().requires_grad_(True), None, excluded, tau, False))
    y = torch.nn.functional.normalize(torch.randn(30, 32, generator=g), dim=1).to(DEVICE)
    cross = torch.full((40, 2), -1, dtype=torch.int32, device=DEVICE)
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    torch.library.opcheck(operators.negative_lse_product, (leaf(x), leaf(y), cross, tau, False))
    z0, z1, _ = make_views(20, 32, seed=7, device=DEVICE)
    torch.library.opcheck(operators.normalize, (z0.requires_grad_(True), z1.requires_grad_(True)))


@pytest.mark.parametrize("layout", ["ntxent", "cross"])
def test_deterministic_at_a_tuned_size(layout):
    # ntxent: the symmetric row pass; cross: P y from the forward and the column pass.
    z0, z1, _ = make_views(2000, 128, torch.bfloat16, seed=8, device=DEVICE)
    first = loss_and_grads(z0, z1, backend="triton", layout=layout)
    second = loss_and_grads(z0, z1, backend="triton", layout=layout)
    assert bitwise_equal([first[0], *first[1]], [second[0], *second[1]])
