"""Fail if any CUDA kernel of csrc/cuda spills registers: ptxas's resource report, checked.

Compiles each ``csrc/cuda/*.cu`` to a cubin (device code only, no GPU needed) for
the given architectures with the extension's own nvcc flags and ``-Xptxas -v``,
prints one line per kernel (registers, shared memory, spill stores and loads) and
exits 1 if a kernel spills or if no kernel was reported at all. ``make test`` runs
it for sm_90.

    python tools/check_spills.py [--arch 90 --arch 80] [--log build/ptxas.log]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
SPILLS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
USAGE = re.compile(r"Used (?P<registers>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")  # static shared memory; absent when there is none


def nvcc_command(source: str, arch: str, output: str) -> List[str]:
    """nvcc for the device code of ``source``, with the flags setup.py's build uses."""
    import torch.utils.cpp_extension as ext

    nvcc = os.path.join(ext.CUDA_HOME, "bin", "nvcc") if ext.CUDA_HOME else "nvcc"
    includes = [os.path.join(ROOT, "csrc"), *ext.include_paths()]
    return [
        nvcc,
        "-cubin",
        f"-arch=sm_{arch}",
        "-O3",
        "-std=c++17",
        "-Xptxas=-v",
        *ext.COMMON_NVCC_FLAGS,
        *[f"-I{path}" for path in includes],
        source,
        "-o",
        output,
    ]


def parse_report(text: str) -> List[Dict[str, object]]:
    """One dict per kernel: name, arch, registers, smem, stack, spill stores and loads (bytes)."""
    kernels: List[Dict[str, object]] = []
    for line in text.splitlines():
        entry = ENTRY.search(line)
        if entry:
            kernels.append({"name": entry["name"], "arch": entry["arch"]})
            continue
        if not kernels:
            continue
        spills = SPILLS.search(line)
        if spills:
            kernels[-1].update({k: int(v) for k, v in spills.groupdict().items()})
        usage = USAGE.search(line)
        if usage:
            kernels[-1].update({"registers": int(usage["registers"]), "smem": 0})
            smem = SMEM.search(line)
            if smem:
                kernels[-1]["smem"] = int(smem["smem"])
    return kernels


def demangle(names: List[str]) -> List[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability without the dot, e.g. 90 (default: 90)")
    parser.add_argument("--log", help="also write ptxas's full report to this file")
    args = parser.parse_args()
    archs = args.arch or ["90"]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("check_spills: no CUDA sources in csrc/cuda", file=sys.stderr)
        return 1

    report = []
    build_dir = os.path.join(ROOT, "build", "spill_check")
    os.makedirs(build_dir, exist_ok=True)
    for source in sources:
        for arch in archs:
            output = os.path.join(build_dir, f"{os.path.basename(source)}.sm_{arch}.cubin")
            run = subprocess.run(nvcc_command(source, arch, output), capture_output=True, text=True)
            report.append(run.stdout + run.stderr)
            if run.returncode != 0:
                print(run.stdout + run.stderr, file=sys.stderr)
                print(f"check_spills: nvcc failed on {source} for sm_{arch}", file=sys.stderr)
                return 1
    text = "\n".join(report)
    if args.log:
        with open(args.log, "w") as f:
            f.write(text)

    kernels = parse_report(text)
    if not kernels:
        print("check_spills: ptxas reported no kernels; is -Xptxas -v in effect?", file=sys.stderr)
        return 1
    bad = [k for k in kernels if k.get("stores", -1) != 0 or k.get("loads", -1) != 0]
    names = demangle([str(k["name"]) for k in kernels])
    print(f"{'arch':6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel")
    for k, name in zip(kernels, names):
        spill = f"{k.get('stores', '?')}/{k.get('loads', '?')}"
        short = re.sub(r"macl::cuda::(\(anonymous namespace\)::)?", "", name).split("(")[0]
        regs, smem, stack = (k.get(key, "?") for key in ("registers", "smem", "stack"))
        print(f"{k['arch']:6} {regs:>4} {smem:>6} {stack:>5} {spill:>11}  {short}")
    if bad:
        print(f"check_spills: {len(bad)} of {len(kernels)} kernels spill (or were not reported)", file=sys.stderr)
        return 1
    targets = ", ".join(f"sm_{arch}" for arch in archs)
    print(f"check_spills: {len(kernels)} kernels, 0 bytes of spill stores and loads ({targets})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
