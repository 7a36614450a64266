"""The package's metadata and build knobs (pyproject.toml, setup.py, requirements-dev.txt).

The built artifacts themselves are checked by ``make wheel`` (part of ``make test``):
twine's check, and tools/check_wheel.py, which installs the wheel into a fresh venv
with only torch and no compiler and computes the loss there.
"""

import importlib.util
import os
import subprocess
import sys
import types

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import macl_kernels as mk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its functions, without running the build (that is guarded by __main__)."""
    spec = importlib.util.spec_from_file_location("macl_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def fake_torch(version="2.14.1+cu130", cuda="13.0", gpu=False):
    return types.SimpleNamespace(
        __version__=version,
        version=types.SimpleNamespace(cuda=cuda),
        cuda=types.SimpleNamespace(is_available=lambda: gpu),
    )


def test_the_version_is_written_once(setup_py, pyproject):
    assert setup_py.base_version() == mk.__version__
    assert "version" in pyproject["project"]["dynamic"]
    assert str(Version(mk.__version__)) == mk.__version__  # a canonical PEP 440 version, no local label


def test_requirements_dev_lists_the_build_requirements_and_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    declared = pyproject["build-system"]["requires"] + extras["test"] + extras["bench"] + extras["dev"]
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert sorted(set(listed)) == sorted(set(declared))
    assert "torch" not in {Requirement(r).name for r in pyproject["build-system"]["requires"]}  # see its comment


def test_metadata_a_user_reads(pyproject):
    project = pyproject["project"]
    assert project["license"] == "MIT" and os.path.isfile(os.path.join(ROOT, "LICENSE"))
    assert project["readme"] == "README.md"
    assert [Requirement(r).name for r in project["dependencies"]] == ["torch"]
    assert [Requirement(r).name for r in project["optional-dependencies"]["triton"]] == ["triton"]
    versions = {
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")
    }
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in versions  # the Python running the tests


@pytest.mark.parametrize(
    "env, choice",
    [
        ({}, "auto"),
        ({"MACL_KERNELS_CUDA": "0"}, "0"),
        ({"MACL_KERNELS_CUDA": "1"}, "1"),
        ({"MACL_KERNELS_CUDA": "Auto"}, "auto"),
        ({"MACL_KERNELS_FORCE_CUDA": "1"}, "1"),  # the old name
        ({"MACL_KERNELS_FORCE_CUDA": "1", "MACL_KERNELS_CUDA": "0"}, "0"),  # the new name wins
    ],
)
def test_cuda_knob(setup_py, monkeypatch, env, choice):
    for name in ("MACL_KERNELS_CUDA", "MACL_KERNELS_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert setup_py.cuda_choice() == choice


def test_cuda_knob_rejects_other_values(setup_py, monkeypatch):
    monkeypatch.setenv("MACL_KERNELS_CUDA", "yes")
    with pytest.raises(SystemExit, match="auto, 0 or 1"):
        setup_py.cuda_choice()


def test_cuda_forced_on_fails_loudly_when_it_cannot_be_built(setup_py, monkeypatch):
    monkeypatch.setenv("MACL_KERNELS_CUDA", "1")
    assert setup_py.want_cuda(fake_torch(), "/usr/local/cuda")  # no GPU needed
    with pytest.raises(SystemExit, match="without CUDA"):
        setup_py.want_cuda(fake_torch(version="2.14.1+cpu", cuda=None), "/usr/local/cuda")
    with pytest.raises(SystemExit, match="CUDA_HOME"):
        setup_py.want_cuda(fake_torch(), None)


def test_cuda_auto_needs_a_toolkit_and_a_gpu(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("MACL_KERNELS_CUDA", "auto")
    assert setup_py.want_cuda(fake_torch(gpu=True), "/usr/local/cuda")
    assert not setup_py.want_cuda(fake_torch(gpu=False), "/usr/local/cuda")
    assert "no GPU is visible" in capsys.readouterr().out
    assert not setup_py.want_cuda(fake_torch(gpu=True), None)
    monkeypatch.setenv("MACL_KERNELS_CUDA", "0")
    assert not setup_py.want_cuda(fake_torch(gpu=True), "/usr/local/cuda")


def test_local_version_label_names_torch_and_cuda(setup_py):
    assert setup_py.local_label(fake_torch(), with_cuda=True) == "torch2.14.1.cu130"
    assert setup_py.local_label(fake_torch("2.11.0+cu128", "12.8"), with_cuda=True) == "torch2.11.0.cu128"
    assert setup_py.local_label(fake_torch(), with_cuda=False) == "torch2.14.1.cpu"
    labelled = Version(f"{mk.__version__}+{setup_py.local_label(fake_torch(), True)}")
    assert labelled.public == mk.__version__ and labelled.local == "torch2.14.1.cu130"


def test_debug_knob_changes_the_flags(monkeypatch):
    def flags(debug):
        code = "import runpy; m = runpy.run_path('setup.py'); print(m['CXX_FLAGS'], m['NVCC_FLAGS'])"
        env = {**os.environ, "MACL_KERNELS_DEBUG": debug}
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True).stdout

    release, debug = flags("0"), flags("1")
    assert "-O3" in release and "-O0" not in release and "-G" not in release
    assert "-O0" in debug and "'-g'" in debug and "'-G'" in debug and "-O3" not in debug


def test_cuda_library_headers_come_from_the_toolkit_or_the_nvidia_wheels(setup_py, tmp_path):
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    for header in setup_py.CUDA_LIBRARY_HEADERS:
        (toolkit / "include" / header).touch()
    assert setup_py.cuda_library_includes(str(toolkit)) == []  # a full toolkit: nothing to add
    if importlib.util.find_spec("nvidia") is None:
        pytest.skip("no nvidia-* wheels installed (a CPU build of torch)")
    dirs = setup_py.cuda_library_includes(str(tmp_path / "slim-toolkit"))
    assert dirs and all(os.path.isabs(d) for d in dirs)
    for header in setup_py.CUDA_LIBRARY_HEADERS:
        assert any(os.path.isfile(os.path.join(d, header)) for d in dirs), header


def test_building_without_torch_stops_and_says_how(tmp_path):
    # What `pip install .` does in its isolated build environment: no torch importable.
    code = (
        "import sys, runpy; sys.modules['torch'] = None; "
        f"sys.argv = ['setup.py', 'build_ext', '--build-temp', {str(tmp_path)!r}]; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--no-build-isolation" in result.stderr + result.stdout
