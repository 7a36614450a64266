"""The dense reference: MATH.md transcribed with full matrices, the oracle of every test.

It builds each layout's whole M x C similarity matrix exactly as MATH.md's table
describes it (positives and excluded columns as index maps and masks) and lets
autograd differentiate it. It is O(M*C) in memory: use it to check, not to train.
Call it on float64 inputs for a float64 ground truth.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._config import MACLConfig
from .._math import accumulation_dtype, adaptive_temperature, anchor_loss, reduce_loss
from .._stats import MACLStats, make_stats


def _dense_problem(
    u0: torch.Tensor, u1: torch.Tensor, bank: Optional[torch.Tensor], layout: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (S, positive column of each row, excluded-column mask) for one layout."""
    n = u0.shape[0]
    rows = torch.arange(n, device=u0.device)
    if layout == "ntxent":
        x = torch.cat([u0, u1])
        sim = x @ x.T
        positive = torch.cat([rows + n, rows])
        excluded = torch.eye(2 * n, dtype=torch.bool, device=u0.device)
    elif layout == "cross":
        sim = u0 @ u1.T
        positive = rows
        excluded = torch.zeros(n, n, dtype=torch.bool, device=u0.device)
    elif layout == "cross_sym":
        s01 = u0 @ u1.T
        sim = torch.cat([s01, s01.T])  # u0 against u1, then u1 against u0
        positive = torch.cat([rows, rows])
        excluded = torch.zeros(2 * n, n, dtype=torch.bool, device=u0.device)
    elif layout == "queue":
        candidates = torch.cat([u1, bank])
        sim = u0 @ candidates.T
        positive = rows
        other_views = torch.ones(n, n, dtype=torch.bool, device=u0.device)
        other_views.fill_diagonal_(False)  # the other rows of u1 are not negatives
        bank_cols = torch.zeros(n, bank.shape[0], dtype=torch.bool, device=u0.device)
        excluded = torch.cat([other_views, bank_cols], dim=1)
    else:  # pragma: no cover - MACLConfig rejects unknown layouts
        raise ValueError(f"unknown layout {layout!r}")
    return sim, positive, excluded


def macl_loss_reference(
    z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor], cfg: MACLConfig
) -> Tuple[torch.Tensor, MACLStats]:
    """The MACL loss and its statistics, densely; inputs are assumed already checked."""
    acc = accumulation_dtype(z0.dtype)
    u0 = F.normalize(z0.to(acc), dim=1, eps=1e-12)
    u1 = F.normalize(z1.to(acc), dim=1, eps=1e-12)
    bank = None if negatives is None else F.normalize(negatives.detach().to(acc), dim=1, eps=1e-12)

    alignment = (u0 * u1).sum(dim=1).mean().detach()
    tau = adaptive_temperature(alignment, cfg)

    sim, positive, excluded = _dense_problem(u0, u1, bank, cfg.layout)
    logits = sim / tau
    columns = torch.arange(logits.shape[1], device=logits.device)
    is_negative = ~excluded & (columns[None, :] != positive[:, None])
    positive_logit = logits.gather(1, positive[:, None]).squeeze(1)
    negative_lse = torch.logsumexp(logits.masked_fill(~is_negative, float("-inf")), dim=1)
    d = positive_logit - negative_lse

    loss = reduce_loss(anchor_loss(d, cfg), cfg.reduction)
    return loss, make_stats(alignment, tau, d)
