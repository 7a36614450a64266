"""The dense reference: MATH.md transcribed with full matrices, the oracle of every test.

It shares no code with what it checks. The layouts are built here from MATH.md's
table (sections 1 and 8), not from :mod:`macl_kernels._layouts`, and the per-anchor
math is the textbook form on the dense softmax, not the stable form of
:mod:`macl_kernels._math`:

    P_rc   = softmax of row r's logits over its candidates (excluded columns removed)
    1 - P  = the sum of P_rc over row r's negatives        (a sum, never a subtraction)
    -log P = -log_softmax at the positive, or -log1p(-(1 - P)) where P > 1/2
    V      = 1 / (1 - P + eps), detached;   loss_r = V * (-log P)   (eps = 0: see below)
    tau    = T * (1 + alpha * (A - A_0))  or  T * alpha**A,  A detached, floored

Autograd differentiates all of it, double backward included, so the gradients
(with respect to the inputs, the extra negatives and a tensor temperature T) are the
exact ones under MATH.md's detach semantics. O(M*C) memory: use it to check, not to
train. Call it on float64 inputs for a float64 ground truth.

With eps = 0, V (-log P) = -log P / (1 - P) is formed in log space instead
(exp(log(-log P) - log(1 - P)), log(1 - P) the log-sum-exp of the negatives'
log-probabilities), since 1 - P underflows (float64: d past about 708) long before the
loss stops being about 1; a row without any negative has loss 0 (MATH.md section 8).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._config import MACLConfig
from .._stats import MACLStats, make_stats


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_problem(
    u0: torch.Tensor, u1: torch.Tensor, extra: torch.Tensor, layout: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, positive column of each row, excluded-column mask) of one layout, MATH.md sections 1 and 8.

    ``extra`` (K x D, K may be 0) are the extra negatives: the queue's bank, or the
    candidates appended to the second view's side in the other layouts.
    """
    n, k = u0.shape[0], extra.shape[0]
    rows = torch.arange(n, device=u0.device)
    no_extra = torch.zeros(n, k, dtype=torch.bool, device=u0.device)
    if layout == "ntxent":  # X = [u0; u1] against [X; Q], itself excluded
        x = torch.cat([u0, u1])
        sim = x @ torch.cat([x, extra]).T
        positive = torch.cat([rows + n, rows])
        itself = torch.eye(2 * n, dtype=torch.bool, device=u0.device)
        excluded = torch.cat([itself, torch.cat([no_extra, no_extra])], dim=1)
    elif layout == "cross":  # u0 against [u1; Q]
        sim = u0 @ torch.cat([u1, extra]).T
        positive = rows
        excluded = torch.zeros(n, n + k, dtype=torch.bool, device=u0.device)
    elif layout == "cross_sym":  # u0 against [u1; Q], then u1 against u0 (Q's columns excluded there)
        sim = torch.cat([u0 @ torch.cat([u1, extra]).T, u1 @ torch.cat([u0, extra]).T])
        positive = torch.cat([rows, rows])
        nothing = torch.zeros(n, n, dtype=torch.bool, device=u0.device)
        excluded = torch.cat([torch.cat([nothing, no_extra], dim=1), torch.cat([nothing, ~no_extra], dim=1)])
    elif layout == "queue":  # u0 against [u1; Q], the other rows of u1 excluded
        sim = u0 @ torch.cat([u1, extra]).T
        positive = rows
        other_views = ~torch.eye(n, dtype=torch.bool, device=u0.device)
        excluded = torch.cat([other_views, no_extra], dim=1)
    else:  # pragma: no cover - MACLConfig rejects unknown layouts
        raise ValueError(f"unknown layout {layout!r}")
    return sim, positive, excluded


def _temperature(alignment: torch.Tensor, cfg: MACLConfig) -> torch.Tensor:
    """MATH.md section 2 (and 8 for a tensor T): the schedule's tau, floored at min_temperature."""
    base = cfg.temperature
    if isinstance(base, torch.Tensor):
        base = base.to(device=alignment.device, dtype=alignment.dtype)
    if cfg.schedule == "linear":
        tau = base * (1 + cfg.alpha * (alignment - cfg.A_0))
    else:
        tau = base * cfg.alpha**alignment
    return torch.clamp(tau, min=cfg.min_temperature)


def _exact_reweighted_loss(log_prob, log_p, is_negative, nll, confident) -> torch.Tensor:
    """eps = 0: V (-log P) = -log P / (1 - P), V detached, computed in log space.

    1 - P underflows long before the ratio stops being ~1 (float64: d past ~708), so
    the loss is exp(log(-log P) - log(1 - P)) with log(1 - P) the log-sum-exp of the
    negatives' log-probabilities, and, where P > 1/2, log(-log P) = log q + log(log1p(q) / q)
    with q = (1 - P) / P = exp(log(1 - P) - log P). A row without negatives has loss 0
    (MATH.md section 8).
    """
    has_negatives = is_negative.any(dim=1)
    log_one_minus_p = log_prob.masked_fill(~is_negative, float("-inf")).logsumexp(dim=1)
    log_one_minus_p = torch.where(has_negatives, log_one_minus_p, 0.0)  # 0: a harmless value where unused
    log_q = log_one_minus_p - log_p
    q = log_q.clamp(max=0.0).exp()  # q < 1 where it is used (P > 1/2); elsewhere no overflow into 0 * inf
    small = q < torch.finfo(q.dtype).eps  # log1p(q) / q = 1 - q/2 + ... is 1 to rounding
    q_used = torch.where(small, 1.0, q)  # the unused branch gets a harmless input (no 0 * inf gradient)
    log_ratio = torch.where(small, 0.0, torch.log(torch.log1p(q_used) / q_used))
    log_nll = torch.where(confident, log_q + log_ratio, torch.log(torch.where(confident, 1.0, nll)))
    return torch.where(has_negatives, torch.exp(log_nll - log_one_minus_p.detach()), 0.0)


def macl_loss_reference(
    z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor], cfg: MACLConfig
) -> Tuple[torch.Tensor, MACLStats]:
    """The MACL loss and its statistics, densely; inputs are assumed already checked (one dtype)."""
    acc = _accumulation_dtype(z0.dtype)
    u0 = F.normalize(z0.to(acc), dim=1, eps=1e-12)
    u1 = F.normalize(z1.to(acc), dim=1, eps=1e-12)
    if negatives is None:
        extra = u0.new_zeros(0, u0.shape[1])
    else:  # differentiable: the negatives get a gradient when they require one
        extra = F.normalize(negatives.to(acc), dim=1, eps=1e-12)

    alignment = (u0 * u1).sum(dim=1).mean().detach()
    tau = _temperature(alignment, cfg)

    sim, positive, excluded = _dense_problem(u0, u1, extra, cfg.layout)
    log_prob = torch.log_softmax((sim / tau).masked_fill(excluded, float("-inf")), dim=1)
    columns = torch.arange(sim.shape[1], device=sim.device)
    is_negative = ~excluded & (columns[None, :] != positive[:, None])
    log_p = log_prob.gather(1, positive[:, None]).squeeze(1)
    one_minus_p = log_prob.exp().masked_fill(~is_negative, 0.0).sum(dim=1)

    # -log P: from the positive's log-probability, or from 1 - P when P is close to 1,
    # where log_softmax would round it to 0. The unused branch gets a harmless input
    # so that its gradient is never 0 * inf.
    confident = log_p > -0.6931471805599453  # P > 1/2
    nll = torch.where(confident, -torch.log1p(-torch.where(confident, one_minus_p, 0.0)), -log_p)
    if cfg.reweight and cfg.eps == 0:
        per_anchor = _exact_reweighted_loss(log_prob, log_p, is_negative, nll, confident)
    elif cfg.reweight:
        denominator = one_minus_p + cfg.eps
        representable = denominator >= torch.finfo(acc).tiny  # else 1 - P = 0: no negative, or underflow
        v = torch.where(representable, 1 / denominator.clamp_min(torch.finfo(acc).tiny), 1.0).detach()
        per_anchor = v * nll
    else:
        per_anchor = nll

    if cfg.reduction == "mean":
        loss = per_anchor.mean()
    elif cfg.reduction == "sum":
        loss = per_anchor.sum()
    else:
        loss = per_anchor
    return loss, make_stats(alignment, tau, log_p.exp())
