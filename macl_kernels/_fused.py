"""The loss assembled around a backend's negatives' log-sum-exp.

For each direction of the layout (:mod:`macl_kernels._layouts`) this normalizes the
views, takes the positive cosines as row-wise dots, derives A and tau on the device,
asks the backend for the log-sum-exp over each anchor's negatives and finishes with
the shared per-anchor math. Only O(N*D) tensors are ever formed here (across ranks:
O(world_size * N * D) for the gathered candidates).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import distributed
from ._config import MACLConfig
from ._layouts import LAYOUTS, Direction, exclusion_table, no_exclusions
from ._math import adaptive_temperature, anchor_loss, reduce_loss
from ._stats import MACLStats, make_stats
from .backends.base import Backend, normalize_rows

__all__ = ["fused_macl_loss"]


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along rows, without a copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _with_tau_gradient(x: torch.Tensor, tau: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """``x`` as the op should read it so that a learnable tau gets its exact gradient (MATH.md section 8).

    The op takes tau as a constant. Its log-sum-exp depends on tau only through
    x / tau (x / sqrt(tau) twice when ``y`` is None), so it reads x * (tau' / tau) with
    tau' = tau detached: 1 in value, x bit for bit, while autograd hands tau the
    gradient -(1/tau) sum_r x_r . dx_r (halved for ``y`` None) from the op's own
    anchor gradient dx. No kernel change, O(M*D) work, and nothing at all unless
    tau requires a gradient.
    """
    if not tau.requires_grad:
        return x
    ratio = tau.detach() / tau
    if symmetric:
        ratio = ratio.sqrt()
    return (x.to(ratio.dtype) * ratio).to(x.dtype)  # the product in the accumulation dtype, for tau's sum


def _direction_lse(
    backend: Backend,
    direction: Direction,
    views: Sequence[torch.Tensor],
    candidates: Optional[Sequence[torch.Tensor]],
    extra: Optional[torch.Tensor],
    tau: torch.Tensor,
    *,
    rank: int,
    world_size: int,
) -> torch.Tensor:
    """The negatives' log-sum-exp of one direction's anchors.

    ``candidates``: the views as candidates (gathered across ranks), or None in one
    process, where a symmetric direction passes ``y=None``. The in-batch candidates
    and the extra negatives are two calls of the op joined by a logaddexp, so that
    the symmetric call keeps its symmetry and a bank without gradient costs none.
    """
    x = _cat([views[v] for v in direction.anchors])
    n = views[0].shape[0]
    parts = []
    if direction.in_batch_negatives(world_size * n) > 0:
        if candidates is None and direction.symmetric:
            y = None
        else:
            y = _cat([(views if candidates is None else candidates)[v] for v in direction.candidates])
        excluded = exclusion_table(direction, n, x.device, rank=rank, world_size=world_size)
        parts.append(backend.negative_lse(_with_tau_gradient(x, tau, y is None), y, excluded, tau.detach()))
    if direction.extra_negatives and extra is not None:
        anchors = _with_tau_gradient(x, tau, symmetric=False)
        parts.append(backend.negative_lse(anchors, extra, no_exclusions(x.shape[0], x.device), tau.detach()))
    if not parts:  # no negative at all (one pair): LSE- = -inf, so d = +inf, loss 0 (MATH.md section 8)
        return torch.full((x.shape[0],), float("-inf"), dtype=tau.dtype, device=x.device)
    return parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])


def fused_macl_loss(
    z0: torch.Tensor,
    z1: torch.Tensor,
    negatives: Optional[torch.Tensor],
    cfg: MACLConfig,
    backend: Backend,
    *,
    across_ranks: bool = False,
    with_stats: bool = True,
    shared_negatives: bool = False,
) -> Tuple[torch.Tensor, Optional[MACLStats]]:
    """The MACL loss through ``backend``; inputs are assumed already checked.

    ``across_ranks``: this rank's anchors against the candidates of every rank of the
    process group, with one global A (see :mod:`macl_kernels.distributed`); inputs
    are then assumed to agree across ranks too, and ``y`` is never None for the backend.
    ``shared_negatives``: the extra negatives are the same rows on every rank (a memory
    bank that enqueues every rank's batch), so they are not gathered, whatever the layout.
    """
    layout = LAYOUTS[cfg.layout]
    u0, u1, positive_cos = backend.normalize(z0, z1)
    # One A, hence one tau, for the whole (global) batch.
    alignment = distributed.global_mean(positive_cos) if across_ranks else positive_cos.detach().mean()
    tau = adaptive_temperature(alignment, cfg)

    views = (u0, u1)
    rank, world_size, candidates = 0, 1, None
    if across_ranks:
        rank, world_size = distributed.rank(), distributed.world_size()
        gathered = distributed.gather_views(*(views[v] for v in layout.candidate_views))
        candidates = dict(zip(layout.candidate_views, gathered))
    extra = None
    if negatives is not None:  # normalized like the inputs; a gradient only if they require one
        _, extra = normalize_rows(negatives)
        if across_ranks and layout.gathers(shared_negatives):
            extra = distributed.gather_rows(extra)

    positive = positive_cos / tau
    # d = l+ - LSE-, direction by direction. (Concatenating the LSEs first and subtracting after
    # lets inductor write the ops' saved outputs into the concatenation's buffer and then reuse
    # that buffer in the backward while they still alias it: wrong gradients on torch 2.14.)
    d = _cat(
        [
            _cat([positive] * len(direction.anchors))
            - _direction_lse(backend, direction, views, candidates, extra, tau, rank=rank, world_size=world_size)
            for direction in layout.directions
        ]
    )
    loss = reduce_loss(anchor_loss(d, cfg), cfg.reduction)
    if not with_stats:
        return loss, None
    mean = distributed.global_mean if across_ranks else torch.mean
    return loss, make_stats(alignment, tau, torch.sigmoid(d), mean)
