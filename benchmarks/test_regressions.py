"""Small, fast speed regressions of every backend (pytest-benchmark): ``make bench-regress``.

One small shape per device (CPU: N = 512, CUDA: N = 4096; D = 128, float32, ntxent),
forward and forward + backward, for every fused backend available here and the
baselines. Each benchmark also checks its loss against the float64 reference, so
``pytest benchmarks/test_regressions.py --benchmark-disable`` is a quick test run.
``make bench-regress`` saves each run under .benchmarks/ and shows the change
against the previous one.
"""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from macl_kernels.testing import fused_backends

from . import targets
from .cases import MODES, Case, loss_kwargs
from .measure import case_views, make_step
from .presets import COMPILED_REFERENCE, INF_CL, LIGHTLY, REFERENCE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 4096 if DEVICE == "cuda" else 512
D = 128
BACKENDS = [*fused_backends(DEVICE), LIGHTLY, REFERENCE, COMPILED_REFERENCE]


def _synchronized(step):
    if DEVICE != "cuda":
        return step

    def step_and_wait():
        step()
        torch.cuda.synchronize()

    return step_and_wait


def _check_against_reference(case: Case, z0: torch.Tensor, z1: torch.Tensor, loss: torch.Tensor) -> None:
    ref = mk.macl_loss(z0.detach().double(), z1.detach().double(), backend="reference", **loss_kwargs(case))
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent(benchmark, backend, mode):
    case = Case(backend, "macl", "ntxent", mode, N, D, "float32")
    reason = targets.unavailable_reason(case, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    fn = targets.build(case)
    z0, z1 = case_views(case, N, torch.device(DEVICE))
    losses = []
    benchmark.extra_info.update(n=N, d=D, gflop=case.flops() / 1e9, device=DEVICE)
    benchmark(_synchronized(make_step(fn, z0, z1, mode, losses)))
    _check_against_reference(case, z0, z1, losses[-1])


@pytest.mark.parametrize("backend", [*fused_backends(DEVICE), INF_CL])
def test_cross_sym_infonce(benchmark, backend):
    case = Case(backend, "infonce", "cross_sym", "fwd_bwd", N, D, "float32")
    reason = targets.unavailable_reason(case, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    z0, z1 = case_views(case, N, torch.device(DEVICE))
    losses = []
    benchmark.extra_info.update(n=N, d=D, gflop=case.flops() / 1e9, device=DEVICE)
    benchmark(_synchronized(make_step(targets.build(case), z0, z1, case.mode, losses)))
    _check_against_reference(case, z0, z1, losses[-1])
