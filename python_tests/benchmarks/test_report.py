"""Rows to CSV, markdown (ratios, tables) and plots, on hand-made rows."""

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


def _row(backend, n, status="ok", seconds=1.0, mib=10.0, mode="fwd_bwd"):
    case = Case(backend, "macl", "ntxent", mode, n, 128, "float32")
    result = {"median_s": seconds, "min_s": seconds, "runs": 3, "peak_bytes": mib * 2**20, "loss": 4.0}
    return report.make_row(case, Outcome(status, result if status == "ok" else {}), ENV)


ROWS = [
    _row("torch", 8192, seconds=2.0, mib=10.0),
    _row("lightly", 8192, seconds=8.0, mib=1000.0),
    _row("reference", 8192, seconds=1.0, mib=500.0),
    _row("torch", 16384, seconds=8.0, mib=20.0),
    _row("lightly", 16384, status="OOM"),
    _row("reference", 16384, status="OOM"),
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


def test_markdown_tables_show_failures_and_end_the_text():
    text = report.markdown(ROWS, ENV, "python -m benchmarks.run", 8192, ["Not measured: triton"])
    assert "- Not measured: triton" in text
    assert "| `torch` | `lightly` | `reference` |" in text  # fused backends first
    assert text.splitlines()[-1] == "| 16384 | 20 MiB | OOM | OOM |"


def test_plots_one_png_per_group(tmp_path):
    rows = ROWS + [_row("torch", 65536, mode="fwd", seconds=60.0)]
    paths = plots.plot_all(rows, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == [
        "macl_ntxent_fwd_bwd_d128_float32.png",
        "macl_ntxent_fwd_d128_float32.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in paths)
