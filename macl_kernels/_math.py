"""The per-anchor math of MATH.md sections 2-4, written once for every Python path.

Backends only compute the O(M*C) part, the log-sum-exp over each anchor's
negatives. Everything per anchor (the adaptive temperature, the stable loss
``V * softplus(-d)`` and its gradient) is O(M) elementwise work and lives here,
so the dense reference and every fused backend share one definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._config import MACLConfig


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dots, log-sum-exps and gradients accumulate in float32 (float64 inputs: float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def adaptive_temperature(alignment: torch.Tensor, cfg: MACLConfig) -> torch.Tensor:
    """tau from the (detached) alignment A, on A's device: no host synchronization.

    A tensor temperature T keeps its autograd graph: dtau/dT is the schedule's factor
    (0 where the floor binds), MATH.md section 8.
    """
    base = cfg.temperature
    if isinstance(base, torch.Tensor):
        base = base.to(alignment)  # A's dtype and device, differentiably
    if cfg.schedule == "linear":
        tau = base * (1.0 + cfg.alpha * (alignment - cfg.A_0))
    else:  # "exp": the arXiv v1/v2 "MACLa" schedule
        tau = base * torch.pow(torch.full_like(alignment, cfg.alpha), alignment)
    # MATH.md section 2: nothing stops tau <= 0, so it is floored, never NaN.
    return tau.clamp_min(cfg.min_temperature)


def anchor_loss_value(d: torch.Tensor, reweight: bool, eps: float) -> torch.Tensor:
    """loss_r = V * softplus(-d) with V = 1 / (sigmoid(-d) + eps), or V = 1 without reweighting."""
    # -log P, exact from d. softplus is linear past its threshold (default 20), which is off by
    # e^-x / x relative: 1e-10 at 20, too much for float64; at 40 it is below float64's rounding.
    nll = F.softplus(-d, threshold=40)
    if not reweight:
        return nll
    if eps > 0:
        return nll / (torch.sigmoid(-d) + eps)
    # eps = 0: V = 1 + e^d overflows for large d while softplus(-d) underflows.
    # For d > 0 write e^d * softplus(-d) = log1p(t) / t with t = e^-d in (0, 1],
    # which tends to 1 as t -> 0 (MATH.md: loss >= 1 always). Below the dtype's epsilon the ratio
    # 1 - t/2 + ... is 1 to rounding, and is taken as 1: a subnormal t (float32: 87 < d < 104) has
    # too few bits to divide by (clamping it to the smallest normal number made the ratio ~0).
    t = torch.exp(-d.clamp_min(0))
    small = t < torch.finfo(d.dtype).eps
    ratio = torch.where(small, 1.0, torch.log1p(t) / torch.where(small, 1.0, t))
    tail = torch.where(d > 0, ratio, torch.exp(d) * nll)
    # d = +inf: a row without negatives (one pair, MATH.md section 8) has loss 0, not the limit 1.
    return torch.where(d == float("inf"), 0.0, nll + tail)


def anchor_loss_slope(d: torch.Tensor, reweight: bool, eps: float) -> torch.Tensor:
    """w = -d loss_r / d d with V held constant: V * (1 - P), and 1 - P = sigmoid(-d)."""
    one_minus_p = torch.sigmoid(-d)
    if not reweight:
        return one_minus_p
    if eps > 0:
        return one_minus_p / (one_minus_p + eps)
    return (d != float("inf")).to(d.dtype)  # V * (1 - P) = 1 exactly when eps = 0; 0 without negatives


class _AnchorLoss(torch.autograd.Function):
    """Per-anchor loss from d = l+ - LSE-, with V detached (MATH.md section 4).

    Autograd of the closed form would multiply an overflowing V by an underflowing
    sigmoid; the slope is exact and finite, so it is written out instead. The
    backward is itself differentiable with V still a constant, so that higher-order
    gradients are exact where the rest of the path is (``create_graph=True``,
    nested ``torch.func.grad``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(d: torch.Tensor, reweight: bool, eps: float) -> torch.Tensor:
        return anchor_loss_value(d, reweight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        d, reweight, eps = inputs
        ctx.save_for_backward(d)
        ctx.reweight = reweight
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (d,) = ctx.saved_tensors
        slope = anchor_loss_slope(d.detach(), ctx.reweight, ctx.eps)
        if torch.is_grad_enabled():
            # The backward is being recorded: the slope as a function of d with V frozen is
            # V * sigmoid(-d) = slope * exp(logsigmoid(-d) - its value now), which is exactly the
            # slope here and has the derivative -slope * sigmoid(d), without forming V.
            log_one_minus_p = F.logsigmoid(-d)
            slope = slope * torch.exp(log_one_minus_p - log_one_minus_p.detach())
        return -grad * slope, None, None


def anchor_loss(d: torch.Tensor, cfg: MACLConfig) -> torch.Tensor:
    """Differentiable per-anchor loss of MATH.md section 3."""
    return _AnchorLoss.apply(d, cfg.reweight, cfg.eps)


def rows_from_product(
    product_lse: torch.Tensor, product: torch.Tensor, lse: torch.Tensor, tau: torch.Tensor, grad_lse: torch.Tensor
) -> torch.Tensor:
    """``dx = E y = (h / tau) P y`` from a forward's ``P y``: no pass over S, in the accumulation dtype.

    The backend contract's row-side gradient (backends/base.py) for the fused forwards that
    keep ``P y`` (the Triton and compiled backends, layouts with candidates). ``P`` is taken
    at ``lse``: the product was normalized by its own forward's ``product_lse`` (the same
    values when both come from one forward), hence the factor ``exp(product_lse - lse)``; a
    row without negatives (``product_lse = -inf``) gets 0, never NaN.
    """
    acc = product.dtype
    factor = torch.where(torch.isfinite(product_lse), torch.exp(product_lse.to(acc) - lse.to(acc)), 0.0)
    coef = grad_lse.to(acc) / tau.to(acc) * factor
    return coef[:, None] * product


def reduce_loss(per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor
