"""The sweep's CLI end to end (tiny), and its planner: what is recorded without being run."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import run
from benchmarks.cases import Case
from benchmarks.isolate import REPO_ROOT, Outcome
from benchmarks.presets import Limits, tiny_preset
from benchmarks.report import COLUMNS

LIMITS = tiny_preset(["torch"]).limits


@pytest.mark.slow
def test_cli_tiny_sweep_writes_csv_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--preset", "tiny", "--sizes", "64"]
    cmd += ["--backends", "torch,lightly,inf-cl", "--modes", "fwd_bwd", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = {(r["backend"], r["layout"]): r for r in reader}
    assert {k: r["status"] for k, r in rows.items()} == {
        ("torch", "ntxent"): "ok",
        ("lightly", "ntxent"): "ok",
        ("torch", "cross_sym"): "ok",
        ("inf-cl", "cross_sym"): "unavailable",
    }
    ours, lightly = rows[("torch", "ntxent")], rows[("lightly", "ntxent")]
    assert float(ours["loss"]) == pytest.approx(float(lightly["loss"]), rel=1e-5)  # same inputs, same loss
    assert float(ours["gflops"]) > 0 and float(ours["median_s"]) > 0 and int(ours["runs"]) >= LIMITS.min_runs
    assert ours["device"] == "cpu" and ours["torch"] and ours["date"]

    markdown = (out / "results.md").read_text()
    assert "| 64 |" in markdown and "unavailable" in markdown
    assert proc.stdout.rstrip().endswith(markdown.rstrip().splitlines()[-1])  # the table is printed last
    assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == [
        "infonce_cross_sym_fwd_bwd_d16_float32.png",
        "macl_ntxent_fwd_bwd_d16_float32.png",
    ]


@pytest.mark.slow
def test_a_time_cap_ends_the_sweep_with_its_report_and_no_child_left(tmp_path):
    """gpu_check.sh's caps send SIGTERM: the rows so far get their report, and no measurement outlives the sweep."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--preset", "tiny", "--no-plots"]
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "results.csv").is_file() and time.monotonic() < deadline:  # one case measured
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert "interrupted" in (out / "results.md").read_text()
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) >= 1
    children = subprocess.run(["pgrep", "-f", "benchmarks.measure"], capture_output=True, text=True).stdout.split()
    assert children == [], children


def test_list_prints_the_selected_cases_in_order_of_n(capsys):
    assert run.main(["--preset", "tiny", "--device", "cpu", "--backends", "reference", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["reference macl ntxent fwd_bwd 64 16 float32", "reference macl ntxent fwd_bwd 128 16 float32"]


def _case(backend="torch", n=1024, mode="fwd_bwd", layout="ntxent", op="macl"):
    return Case(backend, op, layout, mode, n, 128, "float32")


def _limits(**changes):
    return Limits(**{**LIMITS.__dict__, **changes})


def test_planner_records_unavailable_cases_without_running():
    planner = run.Planner(_limits(), "cpu")
    verdict = planner.plan(_case("inf-cl", op="infonce", layout="cross_sym"))
    assert verdict.status == "unavailable" and "CUDA" in verdict.note
    assert planner.plan(_case("lightly", op="infonce", layout="cross_sym")).status == "unavailable"
    assert planner.plan(_case("torch")) is None


def test_planner_stops_a_series_after_its_first_oom_or_timeout():
    planner = run.Planner(_limits(), "cpu")
    planner.record(_case("lightly", n=4096), Outcome("OOM"))
    verdict = planner.plan(_case("lightly", n=8192))
    assert verdict.status == "not run" and verdict.note == "OOM at N = 4096 already"
    assert planner.plan(_case("lightly", n=8192, mode="fwd")) is None  # another series


def test_planner_projects_dense_memory_and_run_time():
    planner = run.Planner(_limits(memory_budget_gib=1.0), "cpu")
    # ntxent at N = 16384: one 32768 x 32768 float32 matrix is 4 GiB; projected, not an OOM that happened
    verdict = planner.plan(_case("reference", n=16384))
    assert verdict.status == "projected > 1 GiB" and verdict.note == "projected to need 4.0 GiB"
    assert planner.plan(_case("reference", n=32768)).status == "not run"  # the series ended at 16384
    assert planner.plan(_case("torch", n=16384)) is None  # fused: no dense matrix
    planner.record(_case("torch", n=1024), Outcome("ok", {"median_s": 1.0, "peak_bytes": 2**30}))
    assert planner.plan(_case("torch", n=4096)) is None  # projected 16 s < 30 s cap, memory not projected
    verdict = planner.plan(_case("torch", n=8192))  # projected 64 s
    assert verdict.status == f"projected > {LIMITS.run_cap_s:g} s" and verdict.note == "projected 64 s per run"
    planner.record(_case("lightly", n=1024), Outcome("ok", {"median_s": 0.1, "peak_bytes": 2**28}))
    assert planner.plan(_case("lightly", n=2048)) is None  # 1 GiB
    assert planner.plan(_case("lightly", n=4096)).status == "projected > 1 GiB"  # 4 GiB


def test_planner_projects_dense_memory_against_the_gpu_memory():
    planner = run.Planner(_limits(memory_budget_gib=None), "cuda", memory_gib=80.0)
    planner.record(_case("reference", n=16384), Outcome("ok", {"median_s": 0.1, "peak_bytes": 10 * 2**30}))
    verdict = planner.plan(_case("reference", n=65536))  # 16 x 10 GiB
    assert verdict.status == "projected > 80 GiB" and "160" in verdict.note
    assert run.device_memory_gib("cpu", _limits(memory_budget_gib=3.0)) == 3.0


def test_planner_projects_a_new_series_from_the_backend_last_run():
    planner = run.Planner(_limits(run_cap_s=100.0), "cpu")
    planner.record(_case("torch", n=8192), Outcome("ok", {"median_s": 4.0, "peak_bytes": 0}))
    assert planner.projected_run_s(_case("torch", n=65536, mode="fwd")) == pytest.approx(64.0)  # 64x N^2, 1/4 flops
    verdict = planner.plan(_case("torch", n=131072, mode="fwd"))
    assert verdict.status == "projected > 100 s" and "256 s" in verdict.note
    assert planner.projected_run_s(_case("cpp", n=8192)) is None


def test_planner_keeps_to_the_sweep_budget_without_ending_the_series():
    planner = run.Planner(_limits(sweep_minutes=0.01), "cpu")
    verdict = planner.plan(_case("torch"))
    assert verdict.status == "not run" and "budget" in verdict.note
    assert planner.failed == {}
