"""benchmarks/gpu_check.sh cannot rot: its --dry-run runs every step on the CPU; gpu_check's verdicts."""

import csv
import os
import subprocess
import sys
import tarfile

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_prints_the_timing_table_last(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(work)}
    env.pop("MACL_TEST_DEVICE", None)
    done = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    # Exit status 1 means a step found a failure (in any backend: that is the script working); 2 is misuse.
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-2000:]
    # The device tool brings back at most 8 files, 2 folders deep: OUT holds exactly these.
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [*(f"bench/{f}" for f in ("machine.json", "results.csv", "results.md")),
                     "gpu_check.csv", "logs.tar.gz", "smoke.csv", "summary.txt"]  # fmt: skip
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}
        read = lambda name: archive.extractfile(logs[name]).read().decode()  # noqa: E731
        for name in ("machine", "smoke", "conformance", "gpu_tests", "gpu_check", "bench"):
            assert f"{name}.log" in logs
        assert " passed" in read("conformance.log")  # pytest ran the selected tests
        assert " skipped" in read("gpu_tests.log")  # gpu-marked tests collected, skipped on CPU
        correctness = read("gpu_check.md")
    for dtype in ("bfloat16", "float32"):
        assert any(line.startswith(f"| triton | 40 | 16 | {dtype} |") and line.endswith("| ok |")
                   for line in correctness.splitlines())  # fmt: skip
    for name in ("smoke", "gpu_check"):
        with open(out / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["verdict"] for r in rows if r["backend"] == "triton"} == {"ok"}, rows
    summary = (out / "summary.txt").read_text()
    for name in ("smoke", "conformance", "gpu_tests", "gpu_check", "bench"):
        assert any(line.startswith(name) for line in summary.splitlines()), summary
    table = (out / "bench" / "results.md").read_text().strip()
    assert done.stdout.strip().endswith(table.splitlines()[-1])  # the timing table comes last
    assert summary.strip().endswith(table.splitlines()[-1])
    assert "`triton`" in table


def test_usage_error_without_an_output_directory():
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


def _row(**changes):
    row = dict(backend="triton", n=8, d=16, dtype="float32", tol=1e-5, oracle="reference", seconds=0.1)
    row.update(loss_err=1e-7, dz0_err=2e-7, dz1_err=3e-7, deterministic=True)
    return {**row, **changes}


def test_verdict_fails_on_error_or_nondeterminism():
    assert gpu_check.verdict(_row()) == "ok"
    assert gpu_check.verdict(_row(dz1_err=2e-5)) == "FAIL"
    assert gpu_check.verdict(_row(deterministic=False)) == "FAIL"
    assert gpu_check.verdict({**_row(), "note": "skipped: time budget"}) == "skipped: time budget"
    table = gpu_check.markdown([_row(), _row(deterministic=False), {**_row(), "note": "error: OOM"}], "GPU")
    assert "| NO |" in table and "| error: OOM |" in table
