"""Rows of a sweep: the CSV, and the markdown (headline ratios, then one table per group).

    python -m benchmarks.report DIR [--no-plots]

rewrites DIR/results.md (and the plots) from DIR/results.csv and DIR/machine.json,
the files ``benchmarks.run`` writes, without measuring anything.

A row's status says what happened, and a table cell shows it as it is: ``ok``
(measured); ``OOM``, ``timeout``, ``error`` (it ran and failed that way);
``unavailable`` (cannot run here); ``projected > 8 GiB`` / ``projected > 150 s``
(not run: its projected memory or time per run is over the budget); ``not run``
(its series stopped at a smaller N, or the sweep's time ran out; the note says which).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .cases import Case
from .isolate import Outcome
from .presets import BASELINES, LIGHTLY

COLUMNS = [
    "backend", "op", "layout", "mode", "n", "d", "dtype",
    "status", "median_s", "min_s", "runs", "peak_mib", "gflops", "loss", "note",
    "device", "device_name", "macl_kernels", "torch", "triton", "date",
]  # fmt: skip
NUMERIC = {"n": int, "d": int, "runs": int, "median_s": float, "min_s": float, "peak_mib": float, "gflops": float}
MODE_LABEL = {"fwd": "forward", "fwd_bwd": "forward + backward"}
LOSS_LABEL = {"macl": "MACL (lightly's defaults)", "infonce": "InfoNCE (alpha=0, reweight=False)"}

Row = Dict[str, object]
NOT_RUN = "not run"


def is_projected(status: str) -> bool:
    """Whether the status is a projection over a limit (the case was not run)."""
    return status.startswith("projected")


def make_row(case: Case, outcome: Outcome, env: Dict[str, str]) -> Row:
    row: Row = {k: getattr(case, k) for k in ("backend", "op", "layout", "mode", "n", "d", "dtype")}
    row.update(status=outcome.status, note=outcome.note)
    result = outcome.result
    if outcome.status == "ok":
        row.update(
            median_s=result["median_s"],
            min_s=result["min_s"],
            runs=result["runs"],
            peak_mib=result["peak_bytes"] / 2**20,
            gflops=case.flops() / result["median_s"] / 1e9,
            loss=result["loss"],
        )
    row.update({k: env[k] for k in ("device", "device_name", "macl_kernels", "torch", "triton", "date")})
    return row


def write_csv(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> List[Row]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: NUMERIC[k](v) if k in NUMERIC and v != "" else v for k, v in raw.items()})
    return rows


def _case_of(row: Row) -> Case:
    return Case(*(row[k] for k in ("backend", "op", "layout", "mode", "n", "d", "dtype")))


def groups(rows: Iterable[Row]) -> "OrderedDict[Tuple, List[Row]]":
    """Rows by (op, layout, mode, D, dtype), in first-seen order."""
    out: "OrderedDict[Tuple, List[Row]]" = OrderedDict()
    for row in rows:
        out.setdefault(_case_of(row).group(), []).append(row)
    return out


def group_title(group: Tuple) -> str:
    op, layout, mode, d, dtype = group
    return f"{LOSS_LABEL.get(op, op)}, {layout} layout, {MODE_LABEL.get(mode, mode)}, D = {d}, {dtype}"


def backend_order(rows: Iterable[Row]) -> List[str]:
    """Fused backends first (in first-seen order), then the baselines."""
    names = list(OrderedDict.fromkeys(r["backend"] for r in rows))
    return [n for n in names if n not in BASELINES] + [b for b in BASELINES if b in names]


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def format_time(row: Row) -> str:
    """The row's time: the median of its runs, or its single run, marked as such."""
    single = " (1 run)" if row["runs"] == 1 else ""
    return format_seconds(row["median_s"]) + single


def format_mib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.3g} MiB"


def _ok(row: Optional[Row]) -> bool:
    return row is not None and row["status"] == "ok"


def _cell(row: Optional[Row], what: str) -> str:
    if row is None:
        return ""
    if not _ok(row):
        return str(row["status"])
    if what == "time":
        return f"{format_time(row)}, {row['gflops']:.3g} GFLOP/s"
    return format_mib(row["peak_mib"])


def _table(rows: List[Row], what: str) -> List[str]:
    names = backend_order(rows)
    by_key = {(r["n"], r["backend"]): r for r in rows}
    lines = ["| N | " + " | ".join(f"`{n}`" for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for n in sorted({r["n"] for r in rows}):
        lines.append(f"| {n} | " + " | ".join(_cell(by_key.get((n, b)), what) for b in names) + " |")
    return lines


def _ratio(baseline: float, fused: float, more: str, less: str) -> str:
    if fused <= 0 or baseline <= 0:
        return "n/a"
    r = baseline / fused
    return f"{r:.3g}× {more}" if r >= 1 else f"{1 / r:.3g}× {less}"


def compare(fused: Row, baseline: Row) -> str:
    """How ``fused`` compares to ``baseline``: speed and peak memory."""
    speed = _ratio(baseline["median_s"], fused["median_s"], "faster", "slower")
    memory = _ratio(baseline["peak_mib"], fused["peak_mib"], "less memory", "more memory")
    return f"{speed}, {memory}"


def headline(rows: Sequence[Row], n: int) -> List[str]:
    """At N = n, per group: every fused backend against every baseline, and the best one against lightly."""
    lines: List[str] = []
    for group, members in groups(rows).items():
        at_n = {r["backend"]: r for r in members if r["n"] == n and _ok(r)}
        fused = [b for b in backend_order(members) if b not in BASELINES and b in at_n]
        bases = [b for b in BASELINES if b in at_n]
        if not fused or not bases:
            continue
        lines += [f"**N = {n}, {group_title(group)}** (time, peak memory above baseline)", ""]
        lines += ["| fused backend | " + " | ".join(f"vs `{b}`" for b in bases) + " |", "|---|" + "---|" * len(bases)]
        lines += [f"| `{f}` | " + " | ".join(compare(at_n[f], at_n[b]) for b in bases) + " |" for f in fused]
        best = min(fused, key=lambda b: at_n[b]["median_s"])
        if LIGHTLY in at_n:
            lines += [
                "",
                f"Best fused backend here, `{best}`, against lightly's `MACLLoss`: "
                f"{format_time(at_n[best])} vs {format_time(at_n[LIGHTLY])}, "
                f"{format_mib(at_n[best]['peak_mib'])} vs {format_mib(at_n[LIGHTLY]['peak_mib'])}: "
                f"**{compare(at_n[best], at_n[LIGHTLY])}**.",
            ]
        lines.append("")
    return lines


def markdown(rows: Sequence[Row], sweep: Dict) -> str:
    """The whole report; ``sweep`` is the content of machine.json (environment, command, limits, elapsed time)."""
    elapsed = sweep.get("elapsed_s")
    took = f" The sweep took {format_duration(elapsed)} of wall-clock time." if elapsed is not None else ""
    if sweep.get("interrupted"):
        took += " The sweep was interrupted (a time cap): the cases after its last row did not run."
    if "load_average" in sweep:  # how busy the machine was: other work inflates CPU times
        end = sweep.get("load_average_at_end", "n/a")
        took += f" Load average {sweep['load_average']} at the start, {end} at the end."
    lines = [
        f"# macl_kernels benchmark on {sweep['device_name']}",
        "",
        f"{sweep['date']}; `{sweep['command']}`; torch {sweep['torch']}, triton {sweep['triton']}, "
        f"CUDA {sweep['cuda']}, Python {sweep['python']}, {sweep['os']}; host: {sweep['host']}.{took}",
        "",
        "Each cell is one fresh subprocess after a warm-up. Time: the median of its runs, or its only run where "
        f"marked (1 run) (CPU: wall clock, a run of over {sweep['limits'].get('long_run_s', 10):g} s is measured "
        "once; GPU: `triton.testing.do_bench`), with the achieved GFLOP/s by MATH.md section 7 (forward 2·M·C·D, "
        "forward + backward 8·M·C·D). Peak memory: above the process's baseline after imports, inputs and warm-up "
        "(CPU: peak RSS; GPU: `max_memory_allocated`). OOM, timeout: the run itself failed that way. A cell that "
        "was not run says why: projected > the budget (its memory, a dense baseline's M x C matrix or its peak at "
        "the previous N scaled by N², or its time per run scaled by the flops) or not run (its series stopped at a "
        "smaller N, or the sweep's time ran out); the CSV's note column has the numbers.",
        "",
    ]
    lines += [f"- {note}" for note in sweep.get("unavailable", [])]
    lines += ["", *headline(rows, sweep["limits"]["headline_n"])]
    for group, members in groups(rows).items():
        lines += [f"## {group_title(group)}", "", "Time (achieved GFLOP/s):", ""]
        lines += _table(members, "time")
        lines += ["", "Peak memory:", ""]
        lines += _table(members, "memory")
        lines.append("")
    return "\n".join(lines)


def write_markdown(rows: Sequence[Row], sweep: Dict, out_dir: str) -> str:
    """Write out_dir/results.md; returns its text."""
    text = markdown(rows, sweep)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a folder written by benchmarks.run (results.csv, machine.json)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    rows = read_csv(os.path.join(args.dir, "results.csv"))
    with open(os.path.join(args.dir, "machine.json")) as f:
        sweep = json.load(f)
    print(write_markdown(rows, sweep, args.dir))
    if not args.no_plots:
        from . import plots  # matplotlib only when plotting

        plots.plot_all(rows, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
