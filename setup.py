from setuptools import find_packages, setup

setup(
    name="macl_kernels",
    version="0.1.0",
    description="Fused, memory-efficient Model-Aware Contrastive Learning (MACL) loss for PyTorch",
    packages=find_packages(include=["macl_kernels", "macl_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
