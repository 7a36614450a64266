"""Rows of a sweep: the CSV, and the markdown (headline ratios, then one table per group)."""

from __future__ import annotations

import csv
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
        return f"{format_seconds(row['median_s'])} ({row['gflops']:.3g} GFLOP/s)"
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
        lines += [f"**N = {n}, {group_title(group)}** (median time, peak memory above baseline)", ""]
        lines += ["| fused backend | " + " | ".join(f"vs `{b}`" for b in bases) + " |", "|---|" + "---|" * len(bases)]
        lines += [f"| `{f}` | " + " | ".join(compare(at_n[f], at_n[b]) for b in bases) + " |" for f in fused]
        best = min(fused, key=lambda b: at_n[b]["median_s"])
        if LIGHTLY in at_n:
            lines += [
                "",
                f"Best fused backend here, `{best}`, against lightly's `MACLLoss`: "
                f"{format_seconds(at_n[best]['median_s'])} vs {format_seconds(at_n[LIGHTLY]['median_s'])}, "
                f"{format_mib(at_n[best]['peak_mib'])} vs {format_mib(at_n[LIGHTLY]['peak_mib'])}: "
                f"**{compare(at_n[best], at_n[LIGHTLY])}**.",
            ]
        lines.append("")
    return lines


def markdown(rows: Sequence[Row], env: Dict[str, str], command: str, headline_n: int, notes: Sequence[str]) -> str:
    lines = [
        f"# macl_kernels benchmark on {env['device_name']}",
        "",
        f"{env['date']}; `{command}`; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"Python {env['python']}, {env['os']}; host: {env['host']}.",
        "",
        "Each cell is one fresh subprocess: median of several runs after a warm-up (CPU: wall clock; "
        "GPU: `triton.testing.do_bench`), achieved GFLOP/s by MATH.md section 7 (forward 2·M·C·D, forward + backward "
        "8·M·C·D), peak memory above the process's baseline after imports, inputs and warm-up (CPU: peak "
        "RSS; GPU: `max_memory_allocated`). OOM: over the memory budget; timeout: over the time cap "
        "(see the CSV's note column for what was projected rather than run).",
        "",
    ]
    lines += [f"- {note}" for note in notes]
    lines += ["", *headline(rows, headline_n)]
    for group, members in groups(rows).items():
        lines += [f"## {group_title(group)}", "", "Median time (achieved GFLOP/s):", ""]
        lines += _table(members, "time")
        lines += ["", "Peak memory:", ""]
        lines += _table(members, "memory")
        lines.append("")
    return "\n".join(lines)
