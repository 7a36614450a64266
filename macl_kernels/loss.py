"""The public entry points: ``macl_loss``, ``nt_xent_loss`` and their ``nn.Module`` forms."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import backends, distributed
from ._config import DEFAULT_MIN_TEMPERATURE, MACLConfig, _check_matrix, check_inputs, check_temperature_device, promote
from ._fused import fused_macl_loss
from ._stats import MACLStats
from .backends.reference import macl_loss_reference
from .memory_bank import BankSize, MemoryBank

LossOutput = Union[torch.Tensor, Tuple[torch.Tensor, MACLStats]]
Temperature = Union[float, torch.Tensor]

# What nt_xent_loss / NTXentLoss fix: plain NT-Xent / InfoNCE is MACL at alpha = 0 without V.
NT_XENT_FIXED = dict(alpha=0.0, reweight=False)
NT_XENT_UNUSED = ("A_0", "schedule", "eps")


def _nt_xent_settings(kwargs: dict, caller: str) -> dict:
    for fixed in (*NT_XENT_FIXED, *NT_XENT_UNUSED):
        if fixed in kwargs:
            raise TypeError(f"{caller} fixes {fixed}; use the MACL form to set it")
    return {**kwargs, **NT_XENT_FIXED}


def _autocast_off(device_type: str):
    """A context without autocast for ``device_type``: the loss computes in its inputs' (promoted) dtype."""
    enabled = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _run(
    z0, z1, negatives, cfg: MACLConfig, backend: str, return_stats: bool, shared_negatives: bool = False
) -> LossOutput:
    """``shared_negatives``: the negatives are the same rows on every rank (a memory bank that gathers)."""
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    check_inputs(z0, z1, negatives, cfg.layout)
    check_temperature_device(cfg.temperature, z0.device)
    # Mixed precision (one view bf16 under autocast, the other fp32): computed in the wider dtype,
    # and without autocast, which would run the dense and pure-PyTorch matmuls in bf16.
    z0, z1, negatives = promote(z0, z1, negatives)
    impl = backends.resolve(backend, z0.device)
    with _autocast_off(z0.device.type):
        if cfg.gather_distributed and distributed.world_size() > 1:
            distributed.check_same_problem(z0, cfg.layout, negatives)
            if impl == backends.REFERENCE:
                loss, stats = distributed.reference_loss_across_ranks(z0, z1, negatives, cfg, shared_negatives)
            else:
                loss, stats = fused_macl_loss(
                    z0, z1, negatives, cfg, impl, across_ranks=True, with_stats=return_stats,
                    shared_negatives=shared_negatives,
                )  # fmt: skip
        elif impl == backends.REFERENCE:
            loss, stats = macl_loss_reference(z0, z1, negatives, cfg)
        else:
            loss, stats = fused_macl_loss(z0, z1, negatives, cfg, impl, with_stats=return_stats)
    return (loss, stats) if return_stats else loss


def macl_loss(
    z0: torch.Tensor,
    z1: torch.Tensor,
    *,
    temperature: Temperature = 0.1,
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
    """Model-Aware Contrastive Learning loss of two views ``z0``, ``z1`` (N x D each, N >= 1).

    The defaults equal lightly's ``MACLLoss()``: SimCLR's ``ntxent`` layout, the
    linear schedule ``tau = temperature * (1 + alpha * (A - A_0))`` floored at
    ``min_temperature``, and the detached reweighting ``V = 1 / (1 - P + eps)``.
    See MATH.md for ``layout`` (``"ntxent"``, ``"cross"``, ``"cross_sym"``,
    ``"queue"``), ``schedule`` (``"linear"``, ``"exp"``) and ``reduction``
    (``"mean"``, ``"sum"``, ``"none"``).

    ``temperature``: a float, or a 0-dim tensor T that may require a gradient (CLIP's
    ``1 / logit_scale.exp()``, an ``nn.Parameter``): T gets the exact gradient.

    ``negatives``: K x D extra negatives (MATH.md section 8). For ``queue`` the bank,
    the only negatives (required); for ``ntxent``, ``cross`` and ``cross_sym`` they
    join the in-batch negatives of the anchors whose candidates come from the second
    view (hard negatives). They get a gradient exactly when they require one.

    Views and negatives of different float dtypes (under autocast, say) are computed
    in the widest of them. A batch of one pair is valid: an anchor without negatives
    has loss 0 and gradient 0.

    ``gather_distributed=True`` (lightly's name), inside an initialized process
    group of more than one rank: the anchors of this rank against the candidates
    (and extra negatives) of all ranks, with one global tau; the loss is over this
    rank's anchors and DDP's gradient averaging yields the gradient of the global
    loss (see :mod:`macl_kernels.distributed`). Without a group, or with one rank,
    it changes nothing.

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


def nt_xent_loss(z0: torch.Tensor, z1: torch.Tensor, *, temperature: Temperature = 0.5, **options) -> LossOutput:
    """Plain NT-Xent / InfoNCE: :func:`macl_loss` with ``alpha=0, reweight=False``.

    ``temperature=0.5`` is lightly's ``NTXentLoss`` default; ``options`` are the other
    keyword arguments of :func:`macl_loss` (``layout``, ``negatives``, ...).
    """
    return macl_loss(z0, z1, temperature=temperature, **_nt_xent_settings(options, "nt_xent_loss"))


def _memory_bank(memory_bank, gather_distributed: bool) -> Optional[MemoryBank]:
    if memory_bank is None or isinstance(memory_bank, MemoryBank):
        return memory_bank
    if memory_bank == 0:  # lightly's memory_bank_size=0: no bank
        return None
    return MemoryBank(memory_bank, gather_distributed=gather_distributed)


class MACLLoss(nn.Module):
    """``nn.Module`` form of :func:`macl_loss`, constructed like lightly's ``MACLLoss``.

    ``MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0)`` is a drop-in replacement;
    the other keyword arguments of :func:`macl_loss` are accepted as well.

    ``temperature=nn.Parameter(...)`` registers the parameter (a learnable T); a
    tensor that does not require a gradient becomes a buffer.

    ``memory_bank``: a :class:`MemoryBank`, or its size (K or (K, D); 0 or None:
    none). Its rows are the ``negatives`` of every call (for ``layout="queue"`` the
    only ones, MoCo's queue; for the other layouts extra ones), and after the loss,
    when ``z0`` requires a gradient, ``z1`` is enqueued (lightly's rule).
    """

    def __init__(
        self,
        temperature: Temperature = 0.1,
        alpha: float = 0.5,
        A_0: float = 0.0,
        *,
        memory_bank: Union[MemoryBank, BankSize, None] = None,
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
        if isinstance(temperature, nn.Parameter) or not isinstance(temperature, torch.Tensor):
            self.temperature = temperature  # a Parameter registers itself
        elif temperature.requires_grad:
            raise TypeError(
                "MACLLoss keeps a learnable temperature as an nn.Parameter: pass nn.Parameter(T), or pass "
                "the tensor expression to macl_loss(temperature=...) at every step"
            )
        else:
            self.register_buffer("temperature", temperature)
        self.memory_bank = _memory_bank(memory_bank, self.config.gather_distributed)

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:  # lightly's attribute, settable between steps (checked again)
        self.config = dataclasses.replace(self.config, alpha=value)

    @property
    def A_0(self) -> float:
        return self.config.A_0

    @A_0.setter
    def A_0(self, value: float) -> None:
        self.config = dataclasses.replace(self.config, A_0=value)

    def forward(self, z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> LossOutput:
        cfg = self.config
        # The temperature as it is now: the module's own (moved, cast) parameter or buffer, or a
        # number set after construction (a schedule, as with lightly's), checked again here.
        if self.temperature is not cfg.temperature:
            cfg = dataclasses.replace(cfg, temperature=self.temperature)
        if self.memory_bank is None:
            return _run(z0, z1, negatives, cfg, self.backend, self.return_stats)
        if negatives is not None:
            raise ValueError("this loss has a memory bank: its negatives come from the bank, pass none")
        _check_matrix("z1", z1)  # before the bank reads its width
        # A bank that gathers holds the same rows on every rank: they are not gathered again.
        shared = self.memory_bank.gather_distributed
        out = _run(z0, z1, self.memory_bank.negatives(z1), cfg, self.backend, self.return_stats, shared)
        if isinstance(z0, torch.Tensor) and z0.requires_grad:  # after the loss, as lightly's NTXentLoss
            self.memory_bank.update(z1)
        return out

    def extra_repr(self) -> str:
        c = self.config
        temperature = "tensor" if isinstance(c.temperature, torch.Tensor) else c.temperature
        return (
            f"temperature={temperature}, alpha={c.alpha}, A_0={c.A_0}, schedule={c.schedule!r}, "
            f"reweight={c.reweight}, eps={c.eps}, layout={c.layout!r}, reduction={c.reduction!r}, "
            f"gather_distributed={c.gather_distributed}, backend={self.backend!r}"
        )


class NTXentLoss(MACLLoss):
    """``nn.Module`` form of :func:`nt_xent_loss`, constructed like lightly's ``NTXentLoss``.

    ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)`` has
    lightly's defaults and meanings: with ``memory_bank_size`` K or (K, D) the bank of
    past second-view embeddings is the only negatives (``layout="queue"``), updated
    after each loss whose first view requires a gradient. Other keyword arguments of
    :func:`nt_xent_loss` are accepted as well. Unlike lightly's, a temperature <= 0
    is refused (it would turn the loss around).
    """

    def __init__(
        self,
        temperature: Temperature = 0.5,
        memory_bank_size: Union[BankSize, MemoryBank] = 0,
        gather_distributed: bool = False,
        **kwargs,
    ) -> None:
        if "memory_bank" in kwargs:
            raise TypeError("NTXentLoss takes its bank as memory_bank_size= (a size K or (K, D), or a MemoryBank)")
        settings = _nt_xent_settings(kwargs, "NTXentLoss")
        bank = _memory_bank(memory_bank_size, gather_distributed)
        if bank is not None:
            settings.setdefault("layout", "queue")
        super().__init__(temperature=temperature, memory_bank=bank, gather_distributed=gather_distributed, **settings)
