"""Peak memory of a measurement and its memory cap.

CPU: peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident size when the measurement starts; the cap is an address-space
limit (``RLIMIT_AS``) of the current size plus the budget, so that an allocation over
budget fails with an error (recorded as OOM) instead of swapping or being killed.
CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start.
"""

from __future__ import annotations

import resource
from typing import Optional

import torch

# Substrings of the errors PyTorch, Python and the C++ runtime raise when an allocation fails.
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "bad_alloc", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in OOM_MESSAGES)


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cap_address_space(budget_bytes: int) -> bool:
    """Limit this process's address space to its current size plus ``budget_bytes``."""
    size_kib = _proc_status_kib("VmSize")
    if size_kib is None:
        return False
    limit = size_kib * 1024 + budget_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return True


class PeakMemory:
    """Peak memory in bytes above the level at :meth:`start`, on the CPU or a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"  # the peak since the process started: may include import spikes
        self.baseline = (_proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        if self.method == "VmHWM":
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.baseline)
