"""Peak memory of a measurement and its memory cap.

CPU: peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident size when the measurement starts; the cap is an address-space
limit (``RLIMIT_AS``) of the current size plus the budget, so that an allocation over
budget fails with an error (recorded as OOM) instead of swapping or being killed.
CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start.
:class:`PeakMemory` itself lives in :mod:`macl_kernels.testing`, whose memory-bound
tests measure the same way.
"""

from __future__ import annotations

import resource

from macl_kernels.testing import PeakMemory, proc_status_kib

__all__ = ["OOM_MESSAGES", "PeakMemory", "cap_address_space", "is_out_of_memory"]

# Substrings of the errors PyTorch, Python and the C++ runtime raise when an allocation fails.
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "bad_alloc", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in OOM_MESSAGES)


def cap_address_space(budget_bytes: int) -> bool:
    """Limit this process's address space to its current size plus ``budget_bytes``."""
    size_kib = proc_status_kib("VmSize")
    if size_kib is None:
        return False
    limit = size_kib * 1024 + budget_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return True
