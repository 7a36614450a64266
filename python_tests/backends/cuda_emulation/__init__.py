"""The CUDA kernels of csrc/cuda compiled as host C++ and run on the CPU (emulator.cpp).

:func:`load` builds the emulator once per source version (torch's JIT extension cache)
and returns it, or skips the calling test when it cannot be built here (no C++
compiler, no CUDA headers).
"""

from __future__ import annotations

import functools
import glob
import os

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


@functools.lru_cache(maxsize=1)
def _build():
    from torch.utils import cpp_extension

    include = cuda_include_dir()
    if include is None:
        return None, "no CUDA headers (cuda_runtime.h, cuda_fp16.h) found"
    try:
        module = cpp_extension.load(
            name="macl_cuda_emulator",
            sources=[os.path.join(HERE, "emulator.cpp")],
            extra_include_paths=[CSRC, include],
            extra_cflags=["-O2", "-std=c++20"],
            verbose=False,
        )
    except (RuntimeError, OSError) as exc:  # no compiler, or the build failed
        return None, f"the emulator did not build: {exc}"
    return module, None


def load():
    module, reason = _build()
    if module is None:
        pytest.skip(reason)
    return module
