"""The chunked PyTorch backend: block edges, its op on its own, no gradient work for a bank without
gradient, and its memory bound."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import macl_kernels as mk
from macl_kernels.backends import torch_chunked
from macl_kernels.testing import LAYOUTS, assert_matches_reference, make_views, peak_rss_mb


@pytest.mark.parametrize("block_elements", [1, 7, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_small_blocks_match_reference(monkeypatch, block_elements, layout):
    # Blocks of one row, or a few rows that do not divide M: every block edge is hit.
    monkeypatch.setattr(torch_chunked, "BLOCK_ELEMENTS", block_elements)
    z0, z1, bank = make_views(13, 5, torch.float64, seed=1, bank_rows=6)
    assert_matches_reference("torch", z0, z1, bank if layout == "queue" else None, layout=layout, reduction="none")


def test_bank_gets_a_gradient_only_when_it_requires_one():  # MATH.md section 8; every backend: conformance
    z0, z1, bank = make_views(8, 4, seed=3, bank_rows=5)
    z0.requires_grad_(True)
    mk.macl_loss(z0, z1, layout="queue", negatives=bank, backend="torch").backward()
    assert z0.grad is not None and bank.grad is None
    bank.requires_grad_(True)
    mk.macl_loss(z0, z1, layout="queue", negatives=bank, backend="torch").backward()
    assert bank.grad is not None and bank.grad.abs().sum() > 0


class _MatrixProducts(TorchDispatchMode):
    """The multiply-adds of the matrix products run under it, in-place ones too (FlopCounterMode skips addmm_)."""

    PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)

    def __init__(self):
        super().__init__()
        self.multiply_adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PRODUCTS:
            a, b = args[-2], args[-1]  # mm(a, b), addmm(input, a, b)
            self.multiply_adds += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_for_negatives_that_do_not_require_one():
    # MATH.md section 8: a bank that does not require a gradient costs no gradient work (no E^T x product).
    def backward_products(bank_requires_grad):
        z0, z1, bank = make_views(8, 4, seed=3, bank_rows=5)
        bank.requires_grad_(bank_requires_grad)
        loss = mk.macl_loss(z0.requires_grad_(True), z1, layout="queue", negatives=bank, backend="torch")
        with _MatrixProducts() as products:
            loss.backward()
        return products.multiply_adds

    without, with_gradient = backward_products(False), backward_products(True)
    assert 0 < without < with_gradient


def test_memory_bound_at_16k_pairs():
    # N = 16384 pairs, ntxent: the dense 32768 x 32768 float32 matrix alone is 4 GiB.
    # The step's own peak (RSS above its start) stays under 512 MiB: measured 144 MiB on
    # 2026-11-28; the blocks of scratch are O(block * C), the rest O(N * D).
    assert peak_rss_mb(16384, 64, "torch") < 512
