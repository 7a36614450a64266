"""The public entry points: ``macl_loss``, ``nt_xent_loss`` and their ``nn.Module`` forms."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import backends, distributed
from ._config import DEFAULT_MIN_TEMPERATURE, MACLConfig, check_inputs
from ._fused import fused_macl_loss
from ._stats import MACLStats
from .backends.reference import macl_loss_reference

LossOutput = Union[torch.Tensor, Tuple[torch.Tensor, MACLStats]]


def _run(z0, z1, negatives, cfg: MACLConfig, backend: str, return_stats: bool) -> LossOutput:
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    check_inputs(z0, z1, negatives, cfg.layout)
    impl = backends.resolve(backend, z0.device)
    if cfg.gather_distributed and distributed.world_size() > 1:
        distributed.check_same_problem(z0, cfg.layout)
        if impl == backends.REFERENCE:
            loss, stats = distributed.reference_loss_across_ranks(z0, z1, negatives, cfg)
        else:
            loss, stats = fused_macl_loss(z0, z1, negatives, cfg, impl, across_ranks=True, with_stats=return_stats)
    elif impl == backends.REFERENCE:
        loss, stats = macl_loss_reference(z0, z1, negatives, cfg)
    else:
        loss, stats = fused_macl_loss(z0, z1, negatives, cfg, impl, with_stats=return_stats)
    return (loss, stats) if return_stats else loss


def macl_loss(
    z0: torch.Tensor,
    z1: torch.Tensor,
    *,
    temperature: float = 0.1,
    alpha: float = 0.5,
    A_0: float = 0.0,
    schedule: str = "linear",
    reweight: bool = True,
    eps: float = 1e-8,
    min_temperature: float = DEFAULT_MIN_TEMPERATURE,
    layout: str = "ntxent",
    negatives: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    gather_distributed: bool = False,
    backend: str = "auto",
    return_stats: bool = False,
) -> LossOutput:
    """Model-Aware Contrastive Learning loss of two views ``z0``, ``z1`` (N x D each).

    The defaults equal lightly's ``MACLLoss()``: SimCLR's ``ntxent`` layout, the
    linear schedule ``tau = temperature * (1 + alpha * (A - A_0))`` floored at
    ``min_temperature``, and the detached reweighting ``V = 1 / (1 - P + eps)``.
    See MATH.md for ``layout`` (``"ntxent"``, ``"cross"``, ``"cross_sym"``,
    ``"queue"`` with ``negatives=`` the K x D bank), ``schedule`` (``"linear"``,
    ``"exp"``) and ``reduction`` (``"mean"``, ``"sum"``, ``"none"``).

    ``gather_distributed=True`` (lightly's name), inside an initialized process
    group of more than one rank: the anchors of this rank against the candidates
    of all ranks, with one global tau; the loss is over this rank's anchors and
    DDP's gradient averaging yields the gradient of the global loss (see
    :mod:`macl_kernels.distributed`). Without a group, or with one rank, it changes
    nothing.

    ``backend``: ``"auto"`` (fastest available for the device), ``"reference"``
    (dense, for checking) or a fused backend name, see
    :func:`macl_kernels.available_backends`.

    Returns the loss (float32 for half-precision inputs), and with
    ``return_stats=True`` also a :class:`MACLStats` of detached 0-dim tensors.
    """
    cfg = MACLConfig(
        temperature=temperature,
        alpha=alpha,
        A_0=A_0,
        schedule=schedule,
        reweight=reweight,
        eps=eps,
        min_temperature=min_temperature,
        layout=layout,
        reduction=reduction,
        gather_distributed=gather_distributed,
    )
    return _run(z0, z1, negatives, cfg, backend, return_stats)


def nt_xent_loss(
    z0: torch.Tensor,
    z1: torch.Tensor,
    *,
    temperature: float = 0.1,
    layout: str = "ntxent",
    negatives: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    gather_distributed: bool = False,
    backend: str = "auto",
    return_stats: bool = False,
) -> LossOutput:
    """Plain NT-Xent / InfoNCE at a fixed temperature: MACL with ``alpha=0, reweight=False``."""
    return macl_loss(
        z0,
        z1,
        temperature=temperature,
        alpha=0.0,
        reweight=False,
        layout=layout,
        negatives=negatives,
        reduction=reduction,
        gather_distributed=gather_distributed,
        backend=backend,
        return_stats=return_stats,
    )


class MACLLoss(nn.Module):
    """``nn.Module`` form of :func:`macl_loss`, constructed like lightly's ``MACLLoss``.

    ``MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0)`` is a drop-in replacement;
    the other keyword arguments of :func:`macl_loss` are accepted as well.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        alpha: float = 0.5,
        A_0: float = 0.0,
        *,
        backend: str = "auto",
        return_stats: bool = False,
        **settings,
    ) -> None:
        super().__init__()
        # Checked here so that a bad setting fails at construction, not at step 1. The other
        # settings of macl_loss (schedule, reweight, eps, min_temperature, layout, reduction,
        # gather_distributed) are MACLConfig's fields, with its defaults (those of macl_loss).
        self.config = MACLConfig(temperature=temperature, alpha=alpha, A_0=A_0, **settings)
        backends.check_name(backend)
        if not isinstance(return_stats, bool):
            raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
        self.backend = backend
        self.return_stats = return_stats

    def forward(self, z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> LossOutput:
        return _run(z0, z1, negatives, self.config, self.backend, self.return_stats)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"temperature={c.temperature}, alpha={c.alpha}, A_0={c.A_0}, schedule={c.schedule!r}, "
            f"reweight={c.reweight}, eps={c.eps}, layout={c.layout!r}, reduction={c.reduction!r}, "
            f"gather_distributed={c.gather_distributed}, backend={self.backend!r}"
        )


class NTXentLoss(MACLLoss):
    """``nn.Module`` form of :func:`nt_xent_loss` (MACL with ``alpha=0, reweight=False``)."""

    def __init__(self, temperature: float = 0.1, **kwargs) -> None:
        for fixed in ("alpha", "reweight", "A_0", "schedule", "eps"):
            if fixed in kwargs:
                raise TypeError(f"NTXentLoss fixes {fixed}; use MACLLoss to set it")
        super().__init__(temperature=temperature, alpha=0.0, reweight=False, **kwargs)
