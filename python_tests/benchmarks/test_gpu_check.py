"""benchmarks/gpu_check.sh cannot rot: its --dry-run runs every step on the CPU; gpu_check's verdicts."""

import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_prints_the_timing_table_last(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("MACL_TEST_DEVICE", None)
    done = subprocess.run(
        ["bash", SCRIPT, str(tmp_path), "--dry-run"], env=env, capture_output=True, text=True, timeout=300
    )
    # Exit status 1 means a step found a failure (in any backend: that is the script working); 2 is misuse.
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-2000:]
    for name in ("machine", "conformance", "gpu_tests", "gpu_check", "bench"):
        assert (tmp_path / f"{name}.log").is_file()
    assert " passed" in (tmp_path / "conformance.log").read_text()  # pytest ran the selected tests
    assert " skipped" in (tmp_path / "gpu_tests.log").read_text()  # gpu-marked tests collected, skipped on CPU
    correctness = (tmp_path / "gpu_check.md").read_text()
    for dtype in ("bfloat16", "float32"):
        assert any(line.startswith(f"| triton | 40 | 16 | {dtype} |") and line.endswith("| ok |")
                   for line in correctness.splitlines())  # fmt: skip
    table = (tmp_path / "bench" / "results.md").read_text().strip()
    assert done.stdout.strip().endswith(table.splitlines()[-1])  # the timing table comes last
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
