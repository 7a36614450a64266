"""The conformance suite: every fused backend answers to the same tests, a new backend inherits them.

The backends are those that can run on the test device (Triton under its
interpreter on the CPU). ``benchmarks/gpu_check.sh`` runs this package on a GPU,
where ``MACL_TEST_DEVICE=cuda`` moves every case onto the device. Sizes stay small
so that interpreted kernels finish in seconds.
"""

import os

import pytest
import torch

from macl_kernels.testing import fused_backends, make_views

DEVICE = os.environ.get("MACL_TEST_DEVICE", "cpu")
BACKENDS = fused_backends(DEVICE)
BANK_ROWS = 11  # queue layout: an odd number of bank rows


def views(n, d, dtype=torch.float32, seed=0, layout="ntxent", **kw):
    """Two views on the test device, and the bank when ``layout`` is ``queue`` (else None)."""
    z0, z1, bank = make_views(n, d, dtype, seed=seed, device=DEVICE, bank_rows=BANK_ROWS, **kw)
    return z0, z1, (bank if layout == "queue" else None)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each fused backend available on the test device in turn."""
    return request.param
