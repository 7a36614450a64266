"""Test-session setup shared by every test module."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
# variable is read when triton is first imported, so it must be set before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: run benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
