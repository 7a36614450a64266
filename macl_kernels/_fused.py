"""The loss assembled around a backend's negatives' log-sum-exp.

Per layout (MATH.md section 1) this normalizes the views, takes the positive
cosines as row-wise dots, derives A and tau on the device, asks the backend for
the log-sum-exp over each anchor's negatives and finishes with the shared
per-anchor math. Only O(N*D) tensors are ever formed here (across ranks:
O(world_size * N * D) for the gathered candidates).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import distributed
from ._config import MACLConfig
from ._math import adaptive_temperature, anchor_loss, reduce_loss
from ._stats import MACLStats, make_stats
from .backends.base import Backend, normalize_rows

NO_COLUMN = -1  # an unused slot of the excluded-columns table


def excluded_columns(first: torch.Tensor, second: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (M, 2) int32 table of columns that are not negatives (see backends.base)."""
    if second is None:
        second = torch.full_like(first, NO_COLUMN)
    return torch.stack([first, second], dim=1).to(torch.int32)


def layout_exclusions(layout: str, n: int, device: torch.device, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Per-anchor excluded columns of the n pairs of one rank, in a global batch of world_size * n pairs.

    The candidates are those of the global batch (for ``ntxent``: all u0 rows, then
    all u1 rows), in which this rank's pairs start at row ``rank * n``.
    """
    rows = torch.arange(n, device=device) + rank * n
    if layout == "ntxent":
        total = world_size * n
        anchors = torch.cat([rows, rows + total])
        return excluded_columns(anchors, (anchors + total) % (2 * total))  # itself and its positive
    if layout in ("cross", "cross_sym"):
        return excluded_columns(rows)  # the positive column
    return excluded_columns(torch.full_like(rows, NO_COLUMN))  # queue: the bank holds negatives only


def fused_macl_loss(
    z0: torch.Tensor,
    z1: torch.Tensor,
    negatives: Optional[torch.Tensor],
    cfg: MACLConfig,
    backend: Backend,
    *,
    across_ranks: bool = False,
    with_stats: bool = True,
) -> Tuple[torch.Tensor, Optional[MACLStats]]:
    """The MACL loss through ``backend``; inputs are assumed already checked.

    ``across_ranks``: this rank's anchors against the candidates of every rank of the
    process group, with one global A (see :mod:`macl_kernels.distributed`); inputs
    are then assumed to agree across ranks too, and ``y`` is never None for the backend.
    """
    u0, u1, positive_cos = backend.normalize(z0, z1)
    # One A, hence one tau, for the whole (global) batch.
    alignment = distributed.global_mean(positive_cos) if across_ranks else positive_cos.detach().mean()
    tau = adaptive_temperature(alignment, cfg)

    n = z0.shape[0]
    rank, world_size = (distributed.rank(), distributed.world_size()) if across_ranks else (0, 1)
    excluded = layout_exclusions(cfg.layout, n, z0.device, rank=rank, world_size=world_size)
    if cfg.layout == "ntxent":
        # In one process the candidates are the anchors themselves: y=None lets backends use the symmetry.
        candidates = distributed.gather_views(u0, u1).flatten(0, 1) if across_ranks else None
        lse = backend.negative_lse(torch.cat([u0, u1]), candidates, excluded, tau)
        positive_cos = torch.cat([positive_cos, positive_cos])
    elif cfg.layout == "cross":
        lse = backend.negative_lse(u0, distributed.gather_rows(u1) if across_ranks else u1, excluded, tau)
    elif cfg.layout == "cross_sym":
        all_u0, all_u1 = distributed.gather_views(u0, u1) if across_ranks else (u0, u1)
        lse = torch.cat(
            [backend.negative_lse(u0, all_u1, excluded, tau), backend.negative_lse(u1, all_u0, excluded, tau)]
        )
        positive_cos = torch.cat([positive_cos, positive_cos])
    else:  # queue: the bank is normalized like the inputs, gets no gradient and is not gathered
        _, bank = normalize_rows(negatives.detach())
        lse = backend.negative_lse(u0, bank, excluded, tau)

    d = positive_cos / tau - lse
    loss = reduce_loss(anchor_loss(d, cfg), cfg.reduction)
    if not with_stats:
        return loss, None
    mean = distributed.global_mean if across_ranks else torch.mean
    return loss, make_stats(alignment, tau, torch.sigmoid(d), mean)
