"""Test-session setup shared by every test module."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
# variable is read when triton is first imported, so it must be set before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
