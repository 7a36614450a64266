"""Check a built wheel as a user gets it: a fresh venv that has only torch, and no compiler.

    python tools/check_wheel.py dist/macl_kernels-*.whl [--keep]

The venv gets torch and the packages torch requires (their closure in this
environment, markers evaluated) as symlinks in its site-packages instead of a
5 GB copy; nothing else of this environment is visible there: not the editable
install of macl_kernels, not the test tools, not the source tree. pip installs the
wheel offline with PATH reduced to the venv's bin, then a smoke test runs in the
venv, from an empty directory, in isolated mode (``python -I``):

- macl_kernels and its compiled ops load from the venv (nothing was compiled: no
  compiler is reachable), and importing it leaves triton alone;
- backend="cpp" is available and its loss and gradients match the reference backend;
- the CUDA op library is in (a CUDA kernel registered for the op) when the wheel's
  version label says it was built with CUDA (``+torch2.14.1.cu130``), even on a
  machine without a GPU;
- the installed version is the wheel's, and ``macl_kernels.__version__`` its public part.

Exit status 0 when every check passes. pip only ever adds files to the venv: the
wheel is installed with --no-deps (``pip check`` then checks the requirements), so
the symlinked torch is never uninstalled or replaced.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
from importlib import metadata
from typing import Dict, List

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "nvcc", "ninja")

SMOKE_TEST = r"""
import importlib.metadata, shutil, sys
import torch

import macl_kernels as mk
from macl_kernels import _C

site, version, with_cuda = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
for module in (mk, _C):
    assert module.__file__.startswith(site), f"{module.__name__} loaded from {module.__file__}, not from {site}"
compilers = {name: shutil.which(name) for name in COMPILERS}
assert not any(compilers.values()), f"a compiler is reachable: {compilers}"
assert "triton" not in sys.modules, "import macl_kernels imported triton"
assert importlib.metadata.version("macl_kernels") == version, importlib.metadata.version("macl_kernels")
assert mk.__version__ == version.split("+")[0], mk.__version__
assert "cpp" in mk.available_backends("cpu"), mk.available_backends("cpu")
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("macl_kernels::negative_lse", "CUDA")
assert has_cuda == with_cuda, f"CUDA kernels in the wheel: {has_cuda}, expected {with_cuda}"

g = torch.Generator().manual_seed(0)
views = [torch.randn(48, 16, generator=g, dtype=torch.float64) for _ in range(2)]
results = {}
for backend in ("cpp", "reference"):
    z0, z1 = (v.clone().requires_grad_(True) for v in views)
    loss = mk.macl_loss(z0, z1, backend=backend)
    loss.backward()
    results[backend] = (loss.detach(), z0.grad, z1.grad)
for got, want in zip(results["cpp"], results["reference"]):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
print(f"macl_kernels {version} with torch {torch.__version__}: cpp loss {float(results['cpp'][0]):.6f} "
      f"= reference; CUDA kernels: {has_cuda}; compilers on PATH: none")
""".replace("COMPILERS", repr(COMPILERS))


def torch_closure() -> Dict[str, metadata.Distribution]:
    """torch and every distribution it requires, transitively, as installed in this environment."""
    found: Dict[str, metadata.Distribution] = {}
    todo = ["torch"]
    while todo:
        dist = metadata.distribution(todo.pop())
        name = canonicalize_name(dist.metadata["Name"])
        if name in found:
            continue
        found[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def top_level_entries(dist: metadata.Distribution) -> List[str]:
    """The files and folders ``dist`` put directly into site-packages (its dist-info included)."""
    names = {str(path).replace("\\", "/").split("/", 1)[0] for path in dist.files or []}
    return sorted(n for n in names if n not in ("..", "__pycache__") and not n.endswith(".pth"))


def make_torch_venv(root: str) -> str:
    """A venv at ``root`` whose site-packages holds only torch's closure (symlinks); returns its site-packages."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(root)
    site = subprocess.check_output(
        [os.path.join(root, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
    ).strip()
    here = sysconfig.get_paths()["purelib"]
    for dist in torch_closure().values():
        source_dir = str(dist.locate_file(""))
        for entry in top_level_entries(dist):
            target = os.path.join(site, entry)
            if not os.path.lexists(target) and os.path.lexists(os.path.join(source_dir, entry)):
                os.symlink(os.path.join(source_dir, entry), target)
    if not os.path.isdir(os.path.join(site, "torch")):
        raise SystemExit(f"torch is not installed in {here}: nothing to test the wheel with")
    return site


def run(command: List[str], env: Dict[str, str], cwd: str) -> None:
    print("+", " ".join(arg if len(arg) < 200 else "<smoke test>" for arg in command), flush=True)
    subprocess.run(command, env=env, cwd=cwd, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", help="the wheel to check")
    parser.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    args = parser.parse_args(argv)
    wheel = os.path.abspath(args.wheel)
    version = re.match(r"[^-]+-([^-]+)-", os.path.basename(wheel)).group(1)
    with_cuda = re.search(r"\+.*\.cu\d+$", version) is not None

    root = tempfile.mkdtemp(prefix="macl-wheel-check-")
    try:
        site = make_torch_venv(os.path.join(root, "venv"))
        bin_dir = os.path.join(root, "venv", "bin")
        # Only the venv's bin on PATH, no pip configuration, no CUDA_HOME or CC: what a user without a compiler has.
        env = {"PATH": bin_dir, "HOME": root, "PIP_CONFIG_FILE": os.devnull, "LANG": "C.UTF-8"}
        pip = [os.path.join(bin_dir, "python"), "-m", "pip", "--no-cache-dir", "--disable-pip-version-check"]
        run([*pip, "install", "--no-index", "--no-deps", wheel], env, cwd=root)
        run([*pip, "check"], env, cwd=root)
        empty = tempfile.mkdtemp(dir=root)
        smoke = [os.path.join(bin_dir, "python"), "-I", "-c", SMOKE_TEST, site, version, "1" if with_cuda else "0"]
        run(smoke, env, cwd=empty)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root)  # removes the symlinks, never what they point to
    print(f"ok: {os.path.basename(wheel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
