"""The sweeps: which cases each preset measures and under which limits.

``cpu`` is what ``make bench`` runs (under 10 minutes on a quiet 2-core machine),
``gpu`` is the H100/H200 sweep of benchmarks/gpu_check.sh (cut to the time its budget leaves), ``tiny``
takes seconds and is what the tests and dry runs use.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .cases import Case

# Baselines of benchmarks.targets: what a user would run instead of a fused backend.
LIGHTLY = "lightly"
REFERENCE = "reference"
COMPILED_REFERENCE = "reference+compile"
INF_CL = "inf-cl"
DENSE = (LIGHTLY, REFERENCE, COMPILED_REFERENCE)  # they build the M x C matrix
BASELINES = (*DENSE, INF_CL)


@dataclass(frozen=True)
class Limits:
    """How one case is measured and when it is given up."""

    memory_budget_gib: Optional[float]  # CPU: address-space cap of a measurement; None: no cap (GPU: its memory)
    run_cap_s: float  # a single run longer than this is a timeout
    startup_s: float  # allowance for imports, inputs, warm-up and compilation
    target_s: float  # repeats stop once this much time is measured ...
    min_runs: int  # ... and at least this many runs were made ...
    max_runs: int  # ... or at most this many
    long_run_s: float  # a run at least this long is measured once
    sweep_minutes: Optional[float]  # cases that would end past this are not run (recorded as "not run")
    headline_n: int  # N of the summary's ratios

    def case_timeout_s(self) -> float:
        """Wall-clock cap of one measurement subprocess (see benchmarks.measure for the run policy)."""
        measuring = max(self.run_cap_s, self.min_runs * self.long_run_s, self.target_s + self.long_run_s)
        return self.startup_s + measuring

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Limits":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    limits: Limits
    cases: List[Case]


def _grid(backends: Sequence[str], op: str, layout: str, mode: str, sizes, dims, dtypes) -> List[Case]:
    return [Case(b, op, layout, mode, n, d, dtype) for n in sizes for d in dims for dtype in dtypes for b in backends]


def powers_of_two(lo: int, hi: int) -> List[int]:
    return [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]


def cpu_preset(fused: Sequence[str]) -> Preset:
    # fwd+bwd of every backend from 512 to 32768 (the dense ones stop at their memory
    # budget); forward only at 65536, where fwd+bwd takes minutes. The torch fallback's
    # 32768 comes last, so that a tight sweep budget cuts it before the kernels'; its
    # forward at 65536 (about 3 minutes here) does not fit the 10-minute sweep at all.
    kernels = [b for b in fused if b != "torch"]
    fallback = [b for b in fused if b == "torch"]
    cases = _grid([*fused, *DENSE], "macl", "ntxent", "fwd_bwd", powers_of_two(512, 16384), [128], ["float32"])
    cases += _grid([*kernels, *DENSE], "macl", "ntxent", "fwd_bwd", [32768], [128], ["float32"])
    cases += _grid(kernels, "macl", "ntxent", "fwd", [65536], [128], ["float32"])
    cases += _grid(fallback, "macl", "ntxent", "fwd_bwd", [32768], [128], ["float32"])
    limits = Limits(
        memory_budget_gib=8.0,  # lightly needs 6.7 GB at N = 8192
        run_cap_s=150.0,
        startup_s=60.0,
        target_s=1.0,
        min_runs=3,
        max_runs=20,
        long_run_s=10.0,
        sweep_minutes=9.5,
        headline_n=8192,
    )
    return Preset("cpu", "cpu", limits, cases)


def gpu_preset(fused: Sequence[str]) -> Preset:
    # In order of importance, so that a cut-short run (the GPU lease is short) still has
    # the numbers that matter: the headline (ntxent, D = 128, bf16, forward + backward at
    # N = 8192 and 32768, every backend and the dense baselines), then fp32, then D = 256,
    # then the rest of the sweep: inf-cl's layout, forward only, and N = 65536 (each series
    # still by increasing N). The dense baselines past the GPU's memory are projected
    # from their peak at the smaller N and not run.
    kernels = [b for b in fused if b != "torch"] or list(fused)
    headline, largest = [8192, 32768], [65536]
    cases = _grid([*fused, *DENSE], "macl", "ntxent", "fwd_bwd", headline, [128], ["bfloat16"])
    cases += _grid(fused, "macl", "ntxent", "fwd_bwd", headline, [128], ["float32"])
    cases += _grid(kernels, "macl", "ntxent", "fwd_bwd", headline, [256], ["bfloat16", "float32"])
    cases += _grid([*kernels, INF_CL], "infonce", "cross_sym", "fwd_bwd", [*headline, *largest], [128], ["bfloat16"])
    cases += _grid(kernels, "macl", "ntxent", "fwd", headline, [128], ["bfloat16", "float32"])
    cases += _grid([*fused, *DENSE], "macl", "ntxent", "fwd_bwd", largest, [128], ["bfloat16"])
    cases += _grid(fused, "macl", "ntxent", "fwd_bwd", largest, [128], ["float32"])
    limits = Limits(
        memory_budget_gib=None,
        run_cap_s=30.0,
        startup_s=120.0,  # cold Triton and inductor compilation
        target_s=0.5,
        min_runs=5,
        max_runs=50,
        long_run_s=5.0,
        sweep_minutes=4.5,
        headline_n=32768,
    )
    return Preset("gpu", "cuda", limits, cases)


def tiny_preset(fused: Sequence[str], device: str = "cpu") -> Preset:
    # Seconds on CPU; no torch.compile (its first compilation alone takes ~20 s here).
    backends = [*fused, LIGHTLY, REFERENCE]
    cases = _grid(backends, "macl", "ntxent", "fwd_bwd", [64, 128], [16], ["float32"])
    cases += _grid(fused, "macl", "ntxent", "fwd", [128], [16], ["float32"])
    cases += _grid([*fused, INF_CL], "infonce", "cross_sym", "fwd_bwd", [64], [16], ["float32"])
    limits = Limits(
        memory_budget_gib=2.0,
        run_cap_s=30.0,
        startup_s=60.0,
        target_s=0.05,
        min_runs=3,
        max_runs=5,
        long_run_s=5.0,
        sweep_minutes=None,
        headline_n=128,
    )
    return Preset("tiny", device, limits, cases)


PRESETS: Dict[str, Callable[..., Preset]] = {"cpu": cpu_preset, "gpu": gpu_preset, "tiny": tiny_preset}


def make_preset(name: str, device: str, fused: Sequence[str]) -> Preset:
    if name == "tiny":
        return tiny_preset(fused, device)
    preset = PRESETS[name](fused)
    return dataclasses.replace(preset, device=device)
