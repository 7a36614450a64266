"""One benchmark case, measured in this (fresh) process: ``python -m benchmarks.measure CASE LIMITS``.

Order of events: imports, inputs, memory cap (CPU), warm-up, then the measured runs.
- Warm-up: one run at a small N on CPU (first-call costs: thread pools, lazy
  initialization); at the case's own shape on CUDA (Triton autotuning and cuBLAS
  heuristics are per shape) and for torch.compile (compilation).
- Runs: the first measured run counts; a run of at least ``long_run_s`` is measured
  once, shorter ones are repeated until ``min_runs`` runs and ``target_s`` seconds
  (at most ``max_runs``). The median is reported. CPU: wall clock. CUDA:
  ``triton.testing.do_bench`` (its own warm-up and repetitions, L2 flushed between runs).
- Peak memory: see :mod:`benchmarks.memory`, from the end of the warm-up; on CUDA over
  one run of its own, so that do_bench's L2-flush buffer is not counted.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from macl_kernels.testing import make_views

from . import targets
from .cases import Case
from .isolate import emit
from .memory import PeakMemory, cap_address_space, is_out_of_memory
from .presets import Limits

WARMUP_N = 256
CUDA_WARMUP_RUNS = 2


def case_views(case: Case, n: int, device: torch.device, seed: int = 0) -> List[torch.Tensor]:
    """Two correlated views of one batch of ``n`` pairs in the case's dtype, leaves when it runs a backward."""
    z0, z1, _ = make_views(
        n, case.d, getattr(torch, case.dtype), seed=seed, device=str(device), requires_grad=case.mode == "fwd_bwd"
    )
    return [z0, z1]


def make_step(fn: Callable, z0: torch.Tensor, z1: torch.Tensor, mode: str, losses: List) -> Callable[[], None]:
    """One forward (no autograd graph) or one forward + backward of ``fn``; appends the loss to ``losses``."""
    if mode == "fwd":

        def forward() -> None:
            with torch.no_grad():
                losses.append(fn(z0, z1))

        return forward

    def forward_backward() -> None:
        z0.grad = z1.grad = None
        loss = fn(z0, z1)
        loss.backward()
        losses.append(loss.detach())

    return forward_backward


def stopwatch() -> Callable[[Callable], float]:
    """Seconds one call takes, by the wall clock (CPU)."""

    def timed_cpu(step: Callable) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return timed_cpu


def cuda_samples(step: Callable[[], None]) -> List[float]:
    """(median, min) seconds of ``step`` by ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    return [ms / 1e3 for ms in do_bench(step, quantiles=[0.5, 0.0])]


def repeat_runs(timed: Callable[[], float], limits: Limits) -> List[float]:
    """The run policy of the module docstring."""
    samples = [timed()]
    if samples[0] >= limits.long_run_s:
        return samples
    while len(samples) < limits.max_runs and (len(samples) < limits.min_runs or sum(samples) < limits.target_s):
        samples.append(timed())
    return samples


def measure(case: Case, limits: Limits, device: torch.device) -> Dict:
    fn = targets.build(case)
    z0, z1 = case_views(case, case.n, device)
    if device.type == "cpu" and limits.memory_budget_gib is not None:
        cap_address_space(int(limits.memory_budget_gib * 2**30))

    losses: List[torch.Tensor] = []
    step = make_step(fn, z0, z1, case.mode, losses)
    if device.type == "cuda" or targets.compiles_per_shape(case):
        for _ in range(CUDA_WARMUP_RUNS if device.type == "cuda" else 1):
            step()
    else:
        make_step(fn, *case_views(case, min(case.n, WARMUP_N), device, seed=1), case.mode, [])()

    memory = PeakMemory(device)
    memory.start()
    if device.type == "cuda":
        step()
        peak = memory.peak()
        median_s, min_s = cuda_samples(step)
        runs = None  # chosen by do_bench
    else:
        timed = stopwatch()
        samples = repeat_runs(lambda: timed(step), limits)
        peak = memory.peak()
        median_s, min_s, runs = statistics.median(samples), min(samples), len(samples)
    return {
        "status": "ok",
        "median_s": median_s,
        "min_s": min_s,
        "runs": runs,
        "peak_bytes": peak,
        "loss": float(losses[-1].float()),
        "note": "" if memory.method in ("VmHWM", "torch.cuda.max_memory_allocated") else f"peak by {memory.method}",
    }


def main(argv: List[str]) -> int:
    case, limits, device = Case.from_json(argv[0]), Limits.from_json(argv[1]), torch.device(argv[2])
    try:
        emit(measure(case, limits, device))
    except Exception as exc:  # recorded in the table; the sweep goes on
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        if not is_out_of_memory(exc):
            emit({"status": "error", "note": f"{type(exc).__name__}: {message}"})
            raise
        emit({"status": "OOM", "note": message})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
