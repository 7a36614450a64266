"""Build of macl_kernels: the Python package and its compiled ops, ``macl_kernels._C``.

The C++ CPU ops (backend="cpp") are always built. The CUDA kernels (backend="cuda") are
added when a GPU and CUDA_HOME are present, or when MACL_KERNELS_FORCE_CUDA=1 (how
``make test`` proves on a machine without a GPU that they compile), for the
architectures of TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). Without torch at build time
the package is installed without the extension and the pure-PyTorch backend serves.
"""

import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TILE_PASSES = "csrc/cpu/tile_passes.cpp"  # compiled once per instruction set, see CpuVariantsBuild
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller; without it, it runs on one thread.
CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-Xptxas=-v", "-lineinfo"]


def cpu_variants():
    """(capability, flags) for each build of the vectorized tile passes, baseline first (see csrc/cpu)."""
    variants = [("DEFAULT", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        variants.append(("AVX2", ["-mavx2", "-mfma", "-mf16c"]))
        variants.append(("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]))
    return variants


def want_cuda(cuda_home) -> bool:
    if os.environ.get("MACL_KERNELS_FORCE_CUDA", "0") == "1":
        return True
    import torch

    return cuda_home is not None and torch.cuda.is_available()


def extension_and_command():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("macl_kernels: torch is not importable at build time; building without the C++/CUDA extension")
        return [], {}

    class CpuVariantsBuild(cpp_extension.BuildExtension):
        """Compiles TILE_PASSES once per CPU instruction set, as ATen does with its CPU kernels.

        Each variant gets its own -m flags and CPU_CAPABILITY namespace; the objects are
        linked after the baseline objects so that inline code shared with them keeps its
        baseline build, and tile_passes_dispatch.cpp picks one at run time.
        """

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
    with_cuda = want_cuda(cuda_home)
    sources = ["csrc/ops.cpp", "csrc/cpu/negative_lse_cpu.cpp", "csrc/cpu/tile_passes_dispatch.cpp"]
    macros = [(f"MACL_CPU_{capability}", None) for capability, _ in cpu_variants()[1:]]
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = {}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        # ATen's CUDA headers include cusparse.h etc., which pip's CUDA wheels ship here.
        wheel_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
        include_dirs += [os.path.abspath(wheel_include)] if os.path.isdir(wheel_include) else []
        kwargs["extra_compile_args"] = {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}
        make_extension = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": CXX_FLAGS}
        make_extension = cpp_extension.CppExtension
    depends = glob.glob("csrc/**/*.h", recursive=True) + [TILE_PASSES]
    extension = make_extension(
        "macl_kernels._C",
        sources,
        define_macros=macros,
        include_dirs=include_dirs,
        depends=depends,
        extra_link_args=LINK_FLAGS,
        **kwargs,
    )
    return [extension], {"build_ext": CpuVariantsBuild}


ext_modules, cmdclass = extension_and_command()

setup(
    name="macl_kernels",
    version="0.1.0",
    description="Fused, memory-efficient Model-Aware Contrastive Learning (MACL) loss for PyTorch",
    packages=find_packages(include=["macl_kernels", "macl_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
