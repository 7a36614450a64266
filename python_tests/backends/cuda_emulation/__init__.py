"""The CUDA kernels of csrc/cuda compiled as host C++ and run on the CPU (emulator.cpp).

:func:`load` builds the emulator once per source version (torch's JIT extension cache)
and returns it, or skips the calling test when it cannot be built here (no C++
compiler, no CUDA headers); a build error fails the test.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
CSRC = os.path.join(ROOT, "csrc")


def cuda_include_dir():
    """A directory with cuda_runtime.h, cuda_fp16.h and cuda_bf16.h (the types and host intrinsics used)."""
    import torch
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, *sorted(glob.glob("/usr/local/cuda*"))]
    candidates = [os.path.join(home, "include") for home in homes if home]
    candidates += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    needed = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", os.path.join("crt", "host_defines.h"))
    for path in candidates:
        if all(os.path.exists(os.path.join(path, h)) for h in needed):
            return os.path.abspath(path)
    return None


def missing_tools():
    """Why the emulator cannot be built on this machine (no C++ compiler or CUDA headers), or None."""
    from torch.utils import cpp_extension

    if shutil.which(cpp_extension.get_cxx_compiler()) is None:
        return "no C++ compiler"
    if cuda_include_dir() is None:
        return "no CUDA headers (cuda_runtime.h, cuda_fp16.h, crt/host_defines.h) found"
    return None


@functools.lru_cache(maxsize=1)
def _build():
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="macl_cuda_emulator",
        sources=[os.path.join(HERE, "emulator.cpp")],
        extra_include_paths=[CSRC, cuda_include_dir()],
        extra_cflags=["-O2", "-std=c++20"],
        verbose=False,
    )


def load():
    """The emulator module; skips the test on a machine without the tools to build it. A
    build that fails with the tools present fails the test (the kernels did not compile)."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    return _build()
