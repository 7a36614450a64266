"""Plots of a sweep's rows: time and peak memory against N, log-log, one line per backend.

Where a backend's series ends (it failed: OOM, timeout, error; or it was projected
over a limit and not run), a cross on the top edge of the plot at that N, labelled
with the backend and the status as the tables show it ("projected > 8 GiB").
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from .report import Row, backend_order, group_title, groups, is_projected  # noqa: E402

MIN_MIB = 0.1  # a peak too small to see on a log axis is drawn here
FAILED = ("OOM", "timeout", "error")


def _ends_series(status: str) -> bool:
    return status in FAILED or is_projected(status)


def _plot_panel(ax, rows: List[Row], value, ylabel: str) -> None:
    failures = []  # (N, label, color) of the first failure of each backend
    for i, name in enumerate(backend_order(rows)):
        color = f"C{i % 10}"
        mine = sorted((r for r in rows if r["backend"] == name), key=lambda r: r["n"])
        ok = [r for r in mine if r["status"] == "ok"]
        ax.plot([r["n"] for r in ok], [value(r) for r in ok], "o-", color=color, label=name)
        failed = [r for r in mine if _ends_series(r["status"])]
        if failed:
            failures.append((failed[0]["n"], f"{name}: {failed[0]['status']}", color))
    sizes = sorted({r["n"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("N (pairs per batch)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    top = ax.get_ylim()[1]
    stacked: Dict[int, int] = {}
    for n, label, color in failures:
        k = stacked[n] = stacked.get(n, -1) + 1
        ax.plot([n], [top], "x", color=color, markersize=10, markeredgewidth=2, clip_on=False)
        ax.annotate(label, (n, top), textcoords="offset points", xytext=(0, 6 + 11 * k), ha="center",
                    color=color, fontsize=8)  # fmt: skip
    ax.set_ylim(top=top)


def plot_group(rows: List[Row], title: str, path: str) -> None:
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.6))
    _plot_panel(ax_time, rows, lambda r: r["median_s"], "time (s): median of runs, or one run")
    _plot_panel(ax_mem, rows, lambda r: max(r["peak_mib"], MIN_MIB), "peak memory above baseline (MiB)")
    ax_time.legend(loc="upper left", fontsize=9)
    device = rows[0].get("device_name", "")
    fig.suptitle(f"{title}\n{device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(rows: Sequence[Row], out_dir: str) -> List[str]:
    """One PNG per group of rows (see :func:`benchmarks.report.groups`); returns the paths."""
    paths = []
    for group, members in groups(rows).items():
        op, layout, mode, d, dtype = group
        path = os.path.join(out_dir, f"{op}_{layout}_{mode}_d{d}_{dtype}.png")
        plot_group(members, group_title(group), path)
        paths.append(path)
    return paths
