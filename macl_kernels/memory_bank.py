"""``MemoryBank``: a FIFO bank of past embeddings used as negatives (MoCo's queue, lightly's memory bank).

``MACLLoss(memory_bank=...)`` and ``NTXentLoss(memory_bank_size=...)`` own one: each
call reads the bank's rows as the negatives of the loss and, after the loss and
only when the first view requires a gradient (a training step, not an evaluation),
enqueues the second view's embeddings, as lightly's ``NTXentLoss`` does.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

BankSize = Union[int, Sequence[int]]


def _parse_size(size: BankSize) -> Tuple[int, Optional[int]]:
    """(K, D) from K (D taken from the first batch) or (K, D); both must be >= 1."""
    if isinstance(size, bool) or not isinstance(size, (int, tuple, list)):
        raise TypeError(f"memory bank size must be an int K or a (K, D) pair, got {type(size).__name__}")
    parts = (size,) if isinstance(size, int) else tuple(size)
    if len(parts) not in (1, 2) or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in parts):
        raise ValueError(f"memory bank size must be an int K >= 1 or a pair (K, D) of ints >= 1, got {size!r}")
    return parts[0], (parts[1] if len(parts) == 2 else None)


class MemoryBank(nn.Module):
    """K past embeddings (unit rows, K x D), replaced first in, first out.

    ``size``: K, the width D then being taken from the first batch, or ``(K, D)``.
    The bank starts as K random unit vectors (as lightly's), in float32 unless built
    lazily (then in the first batch's dtype); ``.to()`` moves and casts it like any
    buffer. Not saved in the state dict (as lightly's). ``gather_distributed=True``:
    each update enqueues the batches of all ranks in rank order, so that every rank
    keeps the same bank (lightly's meaning).

    The update follows lightly exactly: the batch is written from the pointer on; when
    it reaches the end, the rows that do not fit are dropped and the pointer returns
    to 0. The pointer lives on the bank's device: no host synchronization.
    """

    def __init__(self, size: BankSize, gather_distributed: bool = False) -> None:
        super().__init__()
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
        self.size, dim = _parse_size(size)
        self.gather_distributed = gather_distributed
        self.register_buffer("bank", None if dim is None else self._random_rows(dim), persistent=False)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long), persistent=False)

    def _random_rows(self, dim: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = torch.randn(self.size, dim)
        rows = rows if like is None else rows.to(device=like.device, dtype=like.dtype)
        return F.normalize(rows, dim=1)

    def negatives(self, like: torch.Tensor) -> torch.Tensor:
        """The bank's rows (K x D) on ``like``'s device, built on first use with its width and dtype.

        A bank on another device moves there once (lightly's stays on the CPU and is
        copied every step). The rows are the bank's own storage (detached, no copy):
        the next :meth:`update` overwrites them, after the loss that read them is formed.
        """
        if self.bank is None:
            self.bank = self._random_rows(like.shape[1], like)
        if self.bank.device != like.device:
            self.bank = self.bank.to(like.device)
        if self.pointer.device != like.device:
            self.pointer = self.pointer.to(like.device)
        if self.bank.shape[1] != like.shape[1]:
            raise ValueError(
                f"the memory bank holds rows of width {self.bank.shape[1]}, got embeddings of width {like.shape[1]}"
            )
        return self.bank.detach()

    @torch.no_grad()
    def update(self, keys: torch.Tensor) -> None:
        """Enqueue the unit rows of ``keys`` (B x D; of every rank with ``gather_distributed``)."""
        bank = self.negatives(keys)
        if self.gather_distributed and distributed.world_size() > 1:
            keys = distributed.gather_rows(keys.detach())
        keys = F.normalize(keys.detach().to(bank.dtype), dim=1)
        # Bank row j receives batch row j - pointer when that is in [0, B): the rows past
        # the end are dropped (lightly's rule), written with one masked copy, no sync.
        offset = torch.arange(self.size, device=bank.device) - self.pointer
        written = (offset >= 0) & (offset < keys.shape[0])
        bank.copy_(torch.where(written[:, None], keys[offset.clamp(0, keys.shape[0] - 1)], bank))
        after = self.pointer + keys.shape[0]
        self.pointer.copy_(torch.where(after >= self.size, torch.zeros_like(after), after))

    def forward(self, keys: torch.Tensor, update: bool = True) -> torch.Tensor:
        """A copy of the bank's rows as they are, then ``keys`` enqueued when ``update`` (lightly's order)."""
        rows = self.negatives(keys).clone()
        if update:
            self.update(keys)
        return rows

    def extra_repr(self) -> str:
        width = "from the first batch" if self.bank is None else self.bank.shape[1]
        return f"size={self.size}, dim={width}, gather_distributed={self.gather_distributed}"
