"""``gather_distributed=True``: one global batch split across the ranks of a process group.

The global batch is the concatenation of the ranks' batches in rank order. Each rank
computes the loss of its OWN anchors against the candidates of ALL ranks, with one
alignment A and one tau for the whole batch (MATH.md sections 1-2), so every anchor
has exactly the per-anchor loss it would have in a single process.

Gradient convention (lightly's gather layer): the gradient with respect to gathered
candidates is summed across ranks and handed back to the rank that owns them, so the
gradient reaching a rank's inputs is that of the SUM over ranks of the ranks' losses.
With ``reduction="mean"`` (a rank's loss is the mean over its own anchors) each rank
gets world_size x its slice of the gradient of the global mean, and DDP's gradient
averaging yields exactly the gradient of the global mean. With ``"sum"`` a rank's loss
is the sum over its anchors and the rank gets its slice of the global sum's gradient;
with ``"none"`` it gets the rank's per-anchor losses (for ``ntxent`` and ``cross_sym``:
its z0 anchors, then its z1 anchors).

Extra negatives (``negatives=`` of ``ntxent``, ``cross``, ``cross_sym``) are per rank
and gathered like z1: every anchor sees all ranks' negatives, and their gradient
follows the convention above. The ``queue`` bank is not gathered: one bank shared by
all ranks. A tensor temperature T gets on each rank the gradient of that rank's loss
(T is not gathered), so DDP's averaging of T's gradient, as a parameter of the
DDP-wrapped module, gives the gradient of the global mean too.

Costs per call: one small all_gather of the shapes (and a host read of it, so that a
mismatch is a ValueError on every rank instead of a hang), one all_reduce of A, the
all_gather of the needed normalized views (and one of the extra negatives), and in
backward one all_reduce of their gradient. ``return_stats=True`` adds one all_reduce for the global mean P. As with
DDP itself, every rank must run the forward and the backward of each step: the
backward's all_reduce waits for all of them.

Backends see the "local anchors x global candidates" form of their op
(``negative_lse(x_local, y_global, excluded, tau)`` with excluded columns at global
offsets), so every backend runs unchanged; ``backend="reference"`` runs the dense
reference on the gathered batch (O((world_size * N)^2) memory, for checking).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import _layouts
from ._config import LAYOUTS, MACLConfig
from ._math import reduce_loss
from ._stats import MACLStats
from .backends.reference import macl_loss_reference

# Floating dtypes by a code every rank agrees on (all ranks run the same torch).
_FLOAT_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype) and v.is_floating_point}, key=str)


def world_size() -> int:
    """Ranks of the default process group; 1 without torch.distributed or an initialized group."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank()


def check_same_problem(z0: torch.Tensor, layout: str, negatives: Optional[torch.Tensor] = None) -> None:
    """Raise the same ValueError on every rank unless all ranks hold z0/z1 of one shape, dtype and layout
    (and as many extra negatives).

    The collectives that follow need equal shapes everywhere; without this check a
    mismatch would hang or fail deep inside the communication library.
    """
    n, d = z0.shape
    k = 0 if negatives is None else negatives.shape[0]
    mine = torch.tensor([n, d, _FLOAT_DTYPES.index(z0.dtype), LAYOUTS.index(layout), k], device=z0.device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    rows = [t.tolist() for t in table]  # host read: every rank sees the same table
    if any(row != rows[0] for row in rows):
        described = "; ".join(
            f"rank {r}: N={rows_r}, D={dim_r}, {_FLOAT_DTYPES[dtype_r]}, layout={LAYOUTS[layout_r]!r}, K={k_r}"
            for r, (rows_r, dim_r, dtype_r, layout_r, k_r) in enumerate(rows)
        )
        raise ValueError(
            "gather_distributed=True needs z0 and z1 of the same shape and dtype, and the same layout "
            f"and number K of extra negatives, on every rank; got {described}"
        )


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward sums the gradient across ranks and returns the own rows."""

    @staticmethod
    def forward(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        return torch.cat(parts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOwnRows.apply(grad)  # every rank's loss depends on this rank's rows


class _SumOwnRows(torch.autograd.Function):
    """The backward of :class:`_GatherRows`: the sum across ranks, this rank's rows of it.

    The two are adjoint, so each one's backward is the other: a recorded backward
    (``create_graph=True``) gives exact higher-order gradients across ranks.
    """

    @staticmethod
    def forward(grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(total)
        count = grad.shape[0] // dist.get_world_size()
        return total[dist.get_rank() * count : (dist.get_rank() + 1) * count]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(grad)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """(world_size * n, D): every rank's ``rows`` in rank order, differentiable (see the module docstring)."""
    return _GatherRows.apply(rows)


def gather_views(*views: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Every rank's rows of each view (all n x D), each in rank order: one differentiable collective for all."""
    if len(views) <= 1:
        return tuple(gather_rows(view) for view in views)
    n, d = views[0].shape
    gathered = gather_rows(torch.cat(views)).view(-1, len(views), n, d)  # rank-major: each rank's views in turn
    return tuple(gathered.transpose(0, 1).reshape(len(views), -1, d).unbind(0))


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The detached mean of ``values`` over all ranks (each holds the same number of them)."""
    total = values.detach().sum()
    dist.all_reduce(total)
    return total / (values.numel() * dist.get_world_size())


def reference_loss_across_ranks(
    z0: torch.Tensor,
    z1: torch.Tensor,
    negatives: Optional[torch.Tensor],
    cfg: MACLConfig,
    shared_negatives: bool = False,
) -> Tuple[torch.Tensor, MACLStats]:
    """The dense reference on the gathered batch, reduced over this rank's anchors.

    O((world_size * N)^2) memory like the reference itself: for checking only. The
    statistics are those of the global batch, as in the fused path. ``shared_negatives``:
    the negatives are the same rows on every rank (not gathered), as in the fused path.
    """
    all_z0, all_z1 = gather_views(z0, z1)
    if negatives is not None and _layouts.LAYOUTS[cfg.layout].gathers(shared_negatives):
        negatives = gather_rows(negatives)
    per_anchor_cfg = dataclasses.replace(cfg, reduction="none")
    per_anchor, stats = macl_loss_reference(all_z0, all_z1, negatives, per_anchor_cfg)
    own = _layouts.own_anchor_rows(cfg.layout, z0.shape[0], dist.get_rank(), dist.get_world_size(), z0.device)
    return reduce_loss(per_anchor[own], cfg.reduction), stats
