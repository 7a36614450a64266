"""The detached statistics of MATH.md section 5, returned with ``return_stats=True``."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class MACLStats(NamedTuple):
    """0-dim detached tensors on the input's device; reading them is the caller's sync."""

    alignment: torch.Tensor  # A: mean cosine of the positive pairs
    temperature: torch.Tensor  # tau used, after the floor
    positive_prob: torch.Tensor  # mean over anchors of P, the positive's probability


def make_stats(
    alignment: torch.Tensor,
    tau: torch.Tensor,
    positive_prob: torch.Tensor,
    mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean,
) -> MACLStats:
    """The statistics from A, tau and the per-anchor P; ``mean`` averages P (across ranks when distributed)."""
    return MACLStats(alignment.detach(), tau.detach(), mean(positive_prob.detach()))
