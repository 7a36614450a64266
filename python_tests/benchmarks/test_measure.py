"""One measurement: the run policy, peak memory, and OOM / timeout / error recorded instead of crashing."""

import pytest
import torch

from benchmarks import measure
from benchmarks.cases import Case
from benchmarks.isolate import run_isolated
from benchmarks.memory import PeakMemory, is_out_of_memory
from benchmarks.presets import Limits, tiny_preset

LIMITS = tiny_preset(["torch"]).limits


def _limits(**changes):
    return Limits(**{**LIMITS.__dict__, **changes})


def _fake_timer(durations):
    it = iter(durations)
    return lambda: next(it)


def test_a_long_run_is_measured_once():
    assert measure.repeat_runs(_fake_timer([9.0, 9.0]), _limits(long_run_s=5.0)) == [9.0]


def test_short_runs_repeat_until_min_runs_and_target_time():
    limits = _limits(min_runs=3, target_s=1.0, max_runs=10, long_run_s=5.0)
    assert measure.repeat_runs(_fake_timer([0.1] * 20), limits) == [0.1] * 10  # 1 s of runs, at most 10
    assert measure.repeat_runs(_fake_timer([0.6] * 20), limits) == [0.6] * 3  # at least 3


def test_peak_memory_sees_a_temporary_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(16 * 2**20)  # 64 MiB, touched
    del block
    assert memory.peak() >= 60 * 2**20


def test_out_of_memory_errors_are_recognized():
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(ValueError("z0 must be 2-D"))


def _measure(case, limits, timeout_s=120):
    return run_isolated("benchmarks.measure", [case.to_json(), limits.to_json(), "cpu"], timeout_s)


@pytest.mark.slow
def test_an_allocation_over_the_budget_is_recorded_as_oom():
    # lightly at N = 1024 needs several 2048 x 2048 float32 matrices (16 MiB each)
    case = Case("lightly", "macl", "ntxent", "fwd_bwd", 1024, 16, "float32")
    outcome = _measure(case, _limits(memory_budget_gib=0.01))
    assert outcome.status == "OOM", outcome
    assert "allocate" in outcome.note


@pytest.mark.slow
def test_a_failing_case_is_recorded_as_an_error():
    outcome = _measure(Case("no-such-backend", "macl", "ntxent", "fwd", 8, 4, "float32"), LIMITS)
    assert outcome.status == "error" and "no-such-backend" in outcome.note


def test_a_process_over_the_time_cap_is_recorded_as_timeout():
    outcome = run_isolated("benchmarks.measure", ["{}", "{}", "cpu"], timeout_s=0.2)  # killed while importing
    assert outcome.status == "timeout"
