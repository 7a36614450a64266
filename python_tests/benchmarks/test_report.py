"""Rows to CSV, markdown (ratios, tables) and plots, on hand-made rows; the report rebuilt from the CSV."""

import json
import os

import pytest

from benchmarks import plots, report
from benchmarks.cases import Case
from benchmarks.isolate import Outcome

ENV = {
    "device": "cpu",
    "device_name": "test CPU",
    "host": "test host",
    "os": "test OS",
    "python": "3",
    "macl_kernels": "0.1.0",
    "torch": "2",
    "triton": "3",
    "cuda": "none",
    "date": "today",
}
SWEEP = {**ENV, "command": "python -m benchmarks.run", "limits": {"headline_n": 8192}, "unavailable": []}


def _row(backend, n, status="ok", seconds=1.0, mib=10.0, mode="fwd_bwd", runs=3):
    case = Case(backend, "macl", "ntxent", mode, n, 128, "float32")
    result = {"median_s": seconds, "min_s": seconds, "runs": runs, "peak_bytes": mib * 2**20, "loss": 4.0}
    return report.make_row(case, Outcome(status, result if status == "ok" else {}), ENV)


ROWS = [
    _row("torch", 8192, seconds=2.0, mib=10.0),
    _row("lightly", 8192, seconds=8.0, mib=1000.0),
    _row("reference", 8192, seconds=1.0, mib=500.0),
    _row("torch", 16384, seconds=8.0, mib=20.0),
    _row("lightly", 16384, status="OOM"),
    _row("reference", 16384, status="projected > 8 GiB"),
    _row("torch", 32768, seconds=30.0, mib=40.0, runs=1),
    _row("lightly", 32768, status="not run"),
    _row("reference", 32768, status="not run"),
]


def test_gflops_follow_math_section_7():
    # ntxent: M = C = 2N; forward + backward 8 * M * C * D flops
    assert ROWS[0]["gflops"] == pytest.approx(8 * 16384 * 16384 * 128 / 2.0 / 1e9)


def test_csv_round_trip(tmp_path):
    path = tmp_path / "results.csv"
    report.write_csv(ROWS, str(path))
    back = report.read_csv(str(path))
    assert [r["status"] for r in back] == [r["status"] for r in ROWS]
    assert back[0]["n"] == 8192 and back[0]["median_s"] == 2.0 and back[4]["median_s"] == ""


def test_headline_compares_every_fused_backend_with_every_baseline():
    text = "\n".join(report.headline(ROWS, 8192))
    assert "4× faster, 100× less memory" in text  # torch vs lightly
    assert "2× slower, 50× less memory" in text  # torch vs reference
    assert "Best fused backend here, `torch`, against lightly's `MACLLoss`" in text
    assert report.headline(ROWS, 4096) == []  # nothing measured there


def test_markdown_tables_say_what_ran_and_end_the_text():
    text = report.markdown(ROWS, {**SWEEP, "unavailable": ["Not measured: triton"], "elapsed_s": 396.2})
    assert "- Not measured: triton" in text
    assert "The sweep took 6 min 36 s of wall-clock time." in text
    assert "| `torch` | `lightly` | `reference` |" in text  # fused backends first
    # Only a run that failed says OOM; a projection says so; a single run is marked.
    assert "| 16384 | 8.00 s, 137 GFLOP/s | OOM | projected > 8 GiB |" in text
    assert "| 32768 | 30.00 s (1 run), 147 GFLOP/s | not run | not run |" in text
    assert "median" not in text.split("\n## ")[1]  # the tables never call a single run a median
    assert text.splitlines()[-1] == "| 32768 | 40 MiB | not run | not run |"
    assert "took" not in report.markdown(ROWS, SWEEP)  # no elapsed time recorded: no claim


def test_report_is_rebuilt_from_the_csv_and_machine_json(tmp_path):
    report.write_csv(ROWS, str(tmp_path / "results.csv"))
    (tmp_path / "machine.json").write_text(json.dumps(SWEEP))
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    assert (tmp_path / "results.md").read_text() == report.markdown(ROWS, SWEEP) + "\n"


def test_durations():
    assert [report.format_duration(s) for s in (59.6, 60.0, 396.2)] == ["1 min 0 s", "1 min 0 s", "6 min 36 s"]


def test_plots_one_png_per_group(tmp_path):
    rows = ROWS + [_row("torch", 65536, mode="fwd", seconds=60.0)]
    paths = plots.plot_all(rows, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == [
        "macl_ntxent_fwd_bwd_d128_float32.png",
        "macl_ntxent_fwd_d128_float32.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in paths)
