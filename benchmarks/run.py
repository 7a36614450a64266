"""The benchmark sweep: ``python -m benchmarks.run [--device cpu|cuda] [--preset cpu|gpu|tiny] [--out DIR]``.

Every fused backend available on the device and the baselines (lightly's MACLLoss,
the dense reference eager and under torch.compile, inf-cl on GPU), each case in a
fresh subprocess (benchmarks.measure). Writes DIR/results.csv, DIR/results.md,
DIR/machine.json and one PNG per group, and prints the markdown, its tables last.

Cases run in the preset's order (each series by increasing N, the most important
cases first, so that a short sweep budget cuts the least). A case is recorded without being run when the result is
already known, with a status that says so (see :mod:`benchmarks.report`):
"unavailable"; "projected > X GiB", a dense baseline projected over the memory
budget (its M x C matrix, or its peak at the last N scaled by N^2); "projected > X s",
a run projected past the time cap (the last run of the series, or else of the
backend, scaled by the flops); "not run", after an OOM, timeout or projection at a
smaller N of the same series, or when the sweep's time budget would be exceeded.
Only a case that ran and failed is "OOM" or "timeout".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

import macl_kernels as mk
from macl_kernels.testing import fused_backends

from . import machine, plots, report, targets
from .cases import Case
from .isolate import Outcome, run_isolated
from .presets import PRESETS, Limits, make_preset
from .report import NOT_RUN, is_projected

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
CHILD_OVERHEAD_S = 4.0  # a subprocess's imports and warm-up, for the sweep budget's projections


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on cuda, cpu on cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: benchmarks/out)")
    csv_list = lambda cast: lambda text: [cast(x) for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--backends", type=csv_list(str), help="only these backends, e.g. torch,lightly")
    p.add_argument("--layouts", type=csv_list(str))
    p.add_argument("--modes", type=csv_list(str), help="fwd, fwd_bwd")
    p.add_argument("--sizes", type=csv_list(int), help="only these N")
    p.add_argument("--dims", type=csv_list(int), help="only these D")
    p.add_argument("--dtypes", type=csv_list(str), help="e.g. float32,bfloat16")
    p.add_argument("--max-minutes", type=float, help="override the preset's sweep time budget")
    p.add_argument("--memory-gib", type=float, help="override the preset's CPU memory budget per case")
    p.add_argument("--run-cap-s", type=float, help="override the preset's time cap of one run")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p.parse_args(argv)


def select(cases: List[Case], args: argparse.Namespace) -> List[Case]:
    filters = {"backend": args.backends, "layout": args.layouts, "mode": args.modes}
    filters.update(n=args.sizes, d=args.dims, dtype=args.dtypes)
    return [c for c in cases if all(v is None or getattr(c, k) in v for k, v in filters.items())]


def override_limits(limits: Limits, args: argparse.Namespace) -> Limits:
    changes = {"sweep_minutes": args.max_minutes, "memory_budget_gib": args.memory_gib, "run_cap_s": args.run_cap_s}
    return Limits(**{**limits.__dict__, **{k: v for k, v in changes.items() if v is not None}})


class Planner:
    """Decides, from the results so far, whether a case needs running at all."""

    def __init__(self, limits: Limits, device: str, memory_gib: Optional[float] = None) -> None:
        self.limits = limits
        self.device = device
        # What a dense baseline may use: the CPU cap, or the GPU's memory.
        self.memory_gib = limits.memory_budget_gib if memory_gib is None else memory_gib
        self.failed: Dict[tuple, tuple] = {}  # series -> (status, N)
        self.last_ok: Dict[object, tuple] = {}  # series, and backend -> (case, median seconds, peak bytes)
        self.started = time.monotonic()

    def projected_run_s(self, case: Case) -> Optional[float]:
        """From the last run of the series, else of the backend, scaled by the work (MATH.md section 7)."""
        last = self.last_ok.get(case.series()) or self.last_ok.get(case.backend)
        if last is None:
            return None
        case0, t0, _ = last
        return t0 * case.flops() / case0.flops()

    def projected_dense_bytes(self, case: Case) -> int:
        """A lower bound of what a dense baseline needs: its M x C matrix, or its last peak scaled by N^2."""
        lower = targets.dense_bytes_lower_bound(case)
        if lower and case.series() in self.last_ok:
            case0, _, peak0 = self.last_ok[case.series()]
            lower = max(lower, int(peak0 * (case.n / case0.n) ** 2))
        return lower

    def projected_case_s(self, case: Case) -> float:
        run = self.projected_run_s(case)
        if run is None:
            return CHILD_OVERHEAD_S
        lim = self.limits
        runs_s = run if run >= lim.long_run_s else min(max(lim.min_runs * run, lim.target_s), lim.max_runs * run)
        return CHILD_OVERHEAD_S + runs_s

    def plan(self, case: Case) -> Optional[Outcome]:
        """An outcome recorded without running, or None to run the case."""
        outcome = self._known_outcome(case)
        if outcome is not None:
            self.record(case, outcome)  # a projected failure ends its series like a measured one
            return outcome
        if self.limits.sweep_minutes is not None:
            end = time.monotonic() - self.started + self.projected_case_s(case)
            if end > 60 * self.limits.sweep_minutes:
                return Outcome(NOT_RUN, note=f"past the sweep's {self.limits.sweep_minutes} min budget")
        return None

    def _known_outcome(self, case: Case) -> Optional[Outcome]:
        reason = targets.unavailable_reason(case, self.device)
        if reason is not None:
            return Outcome("unavailable", note=reason)
        if case.series() in self.failed:
            status, n = self.failed[case.series()]
            return Outcome(NOT_RUN, note=f"{status} at N = {n} already")
        budget = self.memory_gib
        dense = self.projected_dense_bytes(case)
        if budget is not None and dense > budget * 2**30:
            return Outcome(f"projected > {budget:g} GiB", note=f"projected to need {dense / 2**30:.1f} GiB")
        run = self.projected_run_s(case)
        if run is not None and run > self.limits.run_cap_s:
            return Outcome(f"projected > {self.limits.run_cap_s:g} s", note=f"projected {run:.0f} s per run")
        return None

    def record(self, case: Case, outcome: Outcome) -> None:
        if outcome.status == "ok":
            last = (case, outcome.result["median_s"], outcome.result.get("peak_bytes", 0))
            self.last_ok[case.series()] = self.last_ok[case.backend] = last
        elif outcome.status in ("OOM", "timeout") or is_projected(outcome.status):
            self.failed.setdefault(case.series(), (outcome.status, case.n))


def device_memory_gib(device: str, limits: Limits) -> Optional[float]:
    if torch.device(device).type == "cuda" and limits.memory_budget_gib is None:
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    return limits.memory_budget_gib


def measure_case(case: Case, limits: Limits, device: str) -> Outcome:
    args = [case.to_json(), limits.to_json(), device]
    return run_isolated("benchmarks.measure", args, timeout_s=limits.case_timeout_s())


def unavailable_fused(device: str) -> List[str]:
    """Notes for the fused backends this package knows that cannot run on ``device``."""
    notes = []
    for name in mk.known_backends():
        if name in ("auto", mk.backends.REFERENCE) or name in mk.available_backends(device):
            continue
        try:
            mk.backends.resolve(name, torch.device(device))
        except RuntimeError as exc:
            notes.append(f"Not measured: {exc}")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    preset = make_preset(args.preset or ("gpu" if args.device == "cuda" else "cpu"), args.device,
                         fused_backends(args.device))  # fmt: skip
    limits = override_limits(preset.limits, args)
    cases = select(preset.cases, args)
    if args.list:
        for c in cases:
            print(c.backend, c.op, c.layout, c.mode, c.n, c.d, c.dtype)
        return 0

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.run", *(shlex.quote(a) for a in given)])
    env = machine.describe(args.device)
    sweep = {**env, "command": command, "preset": preset.name, "limits": limits.__dict__}
    write_json(sweep, os.path.join(args.out, "machine.json"))
    planner = Planner(limits, args.device, device_memory_gib(args.device, limits))
    rows: List[report.Row] = []
    # A time cap's SIGTERM (benchmarks/gpu_check.sh) becomes an exception: the running case's
    # subprocess is killed (benchmarks.isolate) and the report below is still written.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    progress = tqdm(cases, desc=f"bench {preset.name}", unit="case", file=sys.stderr)
    interrupted = False
    try:
        for case in progress:
            progress.set_postfix_str(f"{case.backend} {case.layout} {case.mode} N={case.n} D={case.d} {case.dtype}")
            outcome = planner.plan(case)
            if outcome is None:
                outcome = measure_case(case, limits, args.device)
                planner.record(case, outcome)
            rows.append(report.make_row(case, outcome, env))
            report.write_csv(rows, csv_path)  # after every case: an interrupted sweep keeps its rows
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted after {len(rows)} of {len(cases)} cases: writing the report of those", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)  # main() may run inside another program (tests)
    progress.close()

    # The sweep's own wall-clock time, in its outputs: the only source for a claim about it.
    sweep["interrupted"] = interrupted
    sweep["elapsed_s"] = round(time.monotonic() - planner.started, 1)
    sweep["load_average_at_end"] = machine.load_average()
    sweep["unavailable"] = unavailable_fused(args.device)
    write_json(sweep, os.path.join(args.out, "machine.json"))
    text = report.write_markdown(rows, sweep, args.out)
    if not args.no_plots:
        plots.plot_all(rows, args.out)
    errors = [r for r in rows if r["status"] == "error"]
    for r in errors:
        print(f"error: {r['backend']} {r['layout']} {r['mode']} N={r['n']}: {r['note']}", file=sys.stderr)
    print(f"wrote the results to {args.out} in {report.format_duration(sweep['elapsed_s'])}")
    print(text)
    return 130 if interrupted else 0


def _raise_interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write_json(value: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
