"""The machine and software a benchmark ran on, for every CSV row and the results' header."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Dict

import torch

import macl_kernels


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1-minute load average ("n/a" where the OS has none): how busy the machine was, beside its times."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return "n/a"


def describe(device: str) -> Dict[str, str]:
    """Device name, CPU, memory, OS, versions and load; CUDA is only queried for a CUDA device."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{_cpu_name()}, {cpus} cores, {_memory_gib():.0f} GiB RAM"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        device_name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        device_name = cpu
    return {
        "device": torch.device(device).type,
        "device_name": device_name,
        "host": cpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "macl_kernels": macl_kernels.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "torch_threads": str(torch.get_num_threads()),
        "load_average": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
