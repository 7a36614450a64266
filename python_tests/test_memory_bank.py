"""MemoryBank's FIFO rule, row by row against lightly's rule written out plainly (test_migration.py runs
lightly's own NTXentLoss with its bank next to ours)."""

import torch
import torch.nn.functional as F

from macl_kernels import MemoryBank


def test_batches_fill_from_the_pointer_and_drop_what_passes_the_end():
    size, dim = 5, 3
    bank = MemoryBank((size, dim))
    expected = bank.negatives(torch.zeros(1, dim)).clone()
    pointer = 0
    g = torch.Generator().manual_seed(0)
    # 2 + 3 ends exactly at the end (the pointer returns to 0); then 4 + 3 passes it (2 rows dropped).
    for rows in (2, 3, 4, 3, 2):
        keys = torch.randn(rows, dim, generator=g)
        bank.update(keys)
        fits = min(rows, size - pointer)  # lightly: the rows past the end are dropped, not wrapped
        expected[pointer : pointer + fits] = F.normalize(keys, dim=1)[:fits]
        pointer = 0 if pointer + rows >= size else pointer + rows
        assert torch.equal(bank.bank, expected), f"after a batch of {rows}"
        assert int(bank.pointer) == pointer
