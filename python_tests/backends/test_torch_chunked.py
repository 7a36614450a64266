"""The chunked PyTorch backend: block edges, its op on its own, and its memory bound."""

import pytest
import torch

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


def test_memory_bound_at_16k_pairs():
    # N = 16384 pairs, ntxent: the dense 32768 x 32768 float32 matrix alone is 4 GiB.
    # The step's own peak (RSS above its start) stays under 512 MiB: measured 144 MiB on
    # 2026-11-28; the blocks of scratch are O(block * C), the rest O(N * D).
    assert peak_rss_mb(16384, 64, "torch") < 512
