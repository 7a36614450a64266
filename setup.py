"""The build of macl_kernels' compiled ops, ``macl_kernels._C`` (the package's metadata is in pyproject.toml).

The ops compile against the torch they will run with, so torch must be importable
when they are built: ``pip install --no-build-isolation .``. A build in pip's
isolated environment, which has no torch, stops with that advice instead of
installing a package without its ops. The C++ CPU ops (backend="cpp") are always
built. Knobs, as environment variables:

- ``MACL_KERNELS_CUDA=auto|0|1``: the CUDA kernels (backend="cuda") for the
  architectures of ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). ``auto`` (the
  default) builds them when a CUDA toolkit is found and a GPU is visible; ``1``
  builds them without a GPU too (how ``make test`` proves that they compile) and
  fails without a toolkit or with a CPU-only torch; ``0`` never.
  ``MACL_KERNELS_FORCE_CUDA=1``, the old name, still means ``1``.
- ``MACL_KERNELS_DEBUG=1``: a debug build, -O0 -g and asserts on (-G for the kernels).
- ``MACL_KERNELS_LOCAL_VERSION=1``: the version gets a local label naming the torch
  and CUDA the ops are built for, e.g. ``0.1.0+torch2.14.1.cu130`` (``.cpu``
  without the CUDA kernels), as ``make wheel`` builds. Off by default: pip insists
  that a wheel built from an sdist has the sdist's version.
- ``CUDA_HOME``, ``MAX_JOBS``: torch's, where the toolkit is and how many compilers run at once.

All builds of this tree (``make install``'s editable install, ``make wheel``,
``setup.py build_ext --inplace``) share build/objects, so ninja recompiles only
what changed since the last of them.
"""

import glob
import importlib.util
import os
import platform
import re

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
OBJECTS = os.path.join(ROOT, "build", "objects")
SOURCES = ["csrc/ops.cpp", "csrc/cpu/negative_lse_cpu.cpp", "csrc/cpu/tile_passes_dispatch.cpp"]
TILE_PASSES = "csrc/cpu/tile_passes.cpp"  # compiled once per instruction set, see CpuVariantsBuild
DEBUG = os.environ.get("MACL_KERNELS_DEBUG", "0") == "1"
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller; without it, it runs on one thread.
CXX_FLAGS = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
CXX_FLAGS += ["-fvisibility=hidden", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"]
NVCC_FLAGS += ["-Xptxas=-v"]  # the resource report tools/check_spills.py reads
# The CUDA library headers that ATen's CUDA headers include (ATen/cuda/CUDAContextLight.h).
CUDA_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
NO_TORCH = (
    "macl_kernels compiles its C++/CUDA ops against the torch it will run with, and torch is not "
    "importable in this build environment (pip's build isolation hides the installed one). Install "
    "torch first, then build without isolation: `pip install --no-build-isolation .` "
    "(`pip install --no-build-isolation -e .` for development, or `make install` in a clone)."
)


def base_version() -> str:
    """``macl_kernels.__version__`` (the single source of the version), read without importing the package."""
    with open(os.path.join(ROOT, "macl_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE).group(1)


def cuda_choice() -> str:
    """MACL_KERNELS_CUDA, or 1 when only the old MACL_KERNELS_FORCE_CUDA=1 is set; auto by default."""
    choice = os.environ.get("MACL_KERNELS_CUDA", "").strip().lower()
    if not choice:
        choice = "1" if os.environ.get("MACL_KERNELS_FORCE_CUDA") == "1" else "auto"
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"MACL_KERNELS_CUDA must be auto, 0 or 1, got {choice!r}")
    return choice


def want_cuda(torch, cuda_home) -> bool:
    """Whether to build the CUDA kernels; says why, and fails when they were asked for but cannot be built."""
    choice = cuda_choice()
    if choice == "1" and torch.version.cuda is None:
        raise SystemExit(f"MACL_KERNELS_CUDA=1, but torch {torch.__version__} is a build without CUDA")
    if choice == "1" and cuda_home is None:
        raise SystemExit(
            "MACL_KERNELS_CUDA=1, but no CUDA toolkit was found: set CUDA_HOME (nvcc is CUDA_HOME/bin/nvcc)"
        )
    toolkit = cuda_home is not None and torch.version.cuda is not None
    if choice == "auto" and not toolkit:
        with_cuda, why = False, ": no CUDA toolkit or no CUDA build of torch"
    elif choice == "auto":
        with_cuda = torch.cuda.is_available()
        why = "" if with_cuda else ": no GPU is visible (MACL_KERNELS_CUDA=1 builds them anyway)"
    else:
        with_cuda, why = choice == "1", ""
    print(f"macl_kernels: MACL_KERNELS_CUDA={choice}, {'with' if with_cuda else 'without'} the CUDA kernels{why}")
    return with_cuda


def cuda_library_includes(cuda_home: str):
    """Include directories for the CUDA library headers that ``CUDA_HOME/include`` lacks.

    A toolkit with only nvcc and the runtime relies on the headers of pip's nvidia-*
    wheels, which a CUDA build of torch depends on: one directory for CUDA 13
    (nvidia/cu13/include), one per library for CUDA 12 (nvidia/cusparse/include, ...).
    """
    missing = [h for h in CUDA_LIBRARY_HEADERS if not os.path.exists(os.path.join(cuda_home, "include", h))]
    spec = importlib.util.find_spec("nvidia") if missing else None  # a namespace package: not imported
    roots = list(spec.submodule_search_locations or []) if spec else []
    dirs, lost = set(), []
    for header in missing:
        found = sorted(path for root in roots for path in glob.glob(os.path.join(root, "*", "include", header)))
        if found:
            dirs.add(os.path.dirname(found[0]))
        else:
            lost.append(header)
    if lost:
        print(f"macl_kernels: {', '.join(lost)} found neither in {cuda_home}/include nor in pip's nvidia wheels")
    return sorted(dirs)


def cpu_variants():
    """(capability, flags) for each build of the vectorized tile passes, baseline first (see csrc/cpu)."""
    variants = [("DEFAULT", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        variants.append(("AVX2", ["-mavx2", "-mfma", "-mf16c"]))
        variants.append(("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]))
    return variants


class NoTorchBuild(build_ext):
    """What builds the extension when torch is missing: stops, saying how to build it."""

    def run(self):
        raise SystemExit(f"error: {NO_TORCH}")


def extension_and_command(torch):
    """The extension ``macl_kernels._C`` and its build command, for the torch at hand; and whether CUDA is in."""
    from torch.utils import cpp_extension

    class CpuVariantsBuild(cpp_extension.BuildExtension):
        """Compiles TILE_PASSES once per CPU instruction set, as ATen does with its CPU kernels.

        Each variant gets its own -m flags and CPU_CAPABILITY namespace; the objects are
        linked after the baseline objects so that inline code shared with them keeps its
        baseline build, and tile_passes_dispatch.cpp picks one at run time.
        """

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = OBJECTS  # shared by every build of this tree: ninja recompiles what changed
            self.force = True  # always link: what goes in depends on the environment, not on file dates

        def build_extension(self, ext):
            objects = []
            for capability, flags in cpu_variants():
                objects += self.compiler.compile(
                    [os.path.join(ROOT, TILE_PASSES)],
                    output_dir=os.path.join(self.build_temp, capability.lower()),
                    macros=[("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)],
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": CXX_FLAGS + flags, "nvcc": []},
                    depends=ext.depends,
                )
            ext.extra_objects = objects + list(ext.extra_objects or [])
            super().build_extension(ext)

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = want_cuda(torch, cuda_home)
    sources = list(SOURCES)
    macros = [(f"MACL_CPU_{capability}", None) for capability, _ in cpu_variants()[1:]]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += cuda_library_includes(cuda_home)
        compile_args = {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}
        make_extension = cpp_extension.CUDAExtension
    else:
        compile_args = {"cxx": CXX_FLAGS}
        make_extension = cpp_extension.CppExtension
    # What the sources include (the CUDA kernels' device code is in .cuh files): a change rebuilds them.
    headers = sorted(path for pattern in ("*.h", "*.cuh") for path in glob.glob(f"csrc/**/{pattern}", recursive=True))
    extension = make_extension(
        "macl_kernels._C",
        sources,
        define_macros=macros,
        include_dirs=include_dirs,
        depends=headers + [TILE_PASSES],
        extra_compile_args=compile_args,
        extra_link_args=LINK_FLAGS,
    )
    return extension, CpuVariantsBuild, with_cuda


def local_label(torch, with_cuda: bool) -> str:
    """``torch2.14.1.cu130``: the torch release (without its own label) and what the kernels were built with."""
    built_for = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    return f"torch{torch.__version__.split('+')[0]}.{built_for}"


def main():
    version = base_version()
    try:
        import torch
    except ImportError:
        # An sdist needs no torch; building the extension then stops with NO_TORCH.
        setup(
            version=version, ext_modules=[Extension("macl_kernels._C", SOURCES)], cmdclass={"build_ext": NoTorchBuild}
        )
        return
    extension, command, with_cuda = extension_and_command(torch)
    if os.environ.get("MACL_KERNELS_LOCAL_VERSION", "0") == "1":
        version += "+" + local_label(torch, with_cuda)
    setup(version=version, ext_modules=[extension], cmdclass={"build_ext": command})


if __name__ == "__main__":  # as setuptools runs it too; python_tests/test_packaging.py imports it
    main()
