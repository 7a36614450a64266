"""benchmarks/machine.py: what every benchmark row and machine.json record about the run."""

import macl_kernels as mk
from benchmarks import machine, report


def test_the_package_version_is_recorded():
    env = machine.describe("cpu")
    assert env["macl_kernels"] == mk.__version__
    assert "macl_kernels" in report.COLUMNS  # the CSV column make_row fills from it


def test_the_load_average_is_recorded():
    """Times measured on a busy machine say so (the README quotes the load from these files)."""
    load = machine.describe("cpu")["load_average"]
    assert load == "n/a" or float(load) >= 0
