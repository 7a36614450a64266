"""Argument checking for the MACL loss, in one place.

Every public entry point builds a :class:`MACLConfig` (hyper-parameters, checked
once) and calls :func:`check_inputs` (tensors, checked on every call) before any
backend runs, so bad input always fails with a ``ValueError``/``TypeError`` that
names the argument instead of a shape error deep inside a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch

from . import _layouts

LAYOUTS = tuple(_layouts.LAYOUTS)  # the names; each layout is described in _layouts
SCHEDULES = ("linear", "exp")
REDUCTIONS = ("mean", "sum", "none")

# The floor of the adaptive temperature (MATH.md section 2). Logits are bounded by
# 1 / tau, so 1e-4 keeps them within float32's comfortable range; it only binds
# for degenerate settings (linear schedule with alpha * (1 + A_0) >= 1 near A = -1).
DEFAULT_MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class MACLConfig:
    """The checked hyper-parameters of one MACL loss (see MATH.md sections 2-3)."""

    temperature: float = 0.1
    alpha: float = 0.5
    A_0: float = 0.0
    schedule: str = "linear"
    reweight: bool = True
    eps: float = 1e-8
    min_temperature: float = DEFAULT_MIN_TEMPERATURE
    layout: str = "ntxent"
    reduction: str = "mean"
    gather_distributed: bool = False  # anchors against every rank's candidates (macl_kernels.distributed)

    def __post_init__(self) -> None:
        _check_real("temperature", self.temperature, positive=True)
        _check_real("alpha", self.alpha)
        _check_real("A_0", self.A_0)
        _check_real("eps", self.eps, non_negative=True)
        _check_real("min_temperature", self.min_temperature, positive=True)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_bool("reweight", self.reweight)
        _check_bool("gather_distributed", self.gather_distributed)
        if self.gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this PyTorch build lacks")
        if self.schedule == "exp" and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 for schedule='exp' (tau = temperature * alpha**A), got {self.alpha}")


def _check_real(name: str, value, *, positive: bool = False, non_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {list(choices)}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_matrix(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows x embedding dim), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_inputs(z0, z1, negatives: Optional[torch.Tensor], layout: str) -> None:
    """Check the embeddings (and the bank of the ``queue`` layout) of one call."""
    _check_matrix("z0", z0)
    _check_matrix("z1", z1)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    n, d = z0.shape
    if n < 2:
        raise ValueError(f"z0 and z1 need at least 2 rows (samples) to have a negative, got {n}")
    if d < 1:
        raise ValueError(f"z0 and z1 need an embedding dimension >= 1, got {d}")
    if z0.dtype != z1.dtype:
        raise TypeError(f"z0 and z1 must have the same dtype, got {z0.dtype} and {z1.dtype}")
    if z0.device != z1.device:
        raise ValueError(f"z0 and z1 must be on the same device, got {z0.device} and {z1.device}")
    if layout == "queue":
        if negatives is None:
            raise ValueError("layout='queue' needs negatives=, the K x D bank of negatives")
        _check_matrix("negatives", negatives)
        if negatives.shape[1] != d:
            raise ValueError(f"negatives must have the embedding width of z0 ({d}), got shape {tuple(negatives.shape)}")
        if negatives.shape[0] < 1:
            raise ValueError("negatives must hold at least one row")
        if negatives.dtype != z0.dtype:
            raise TypeError(f"negatives must have the dtype of z0 ({z0.dtype}), got {negatives.dtype}")
        if negatives.device != z0.device:
            raise ValueError(f"negatives must be on the device of z0 ({z0.device}), got {negatives.device}")
    elif negatives is not None:
        raise ValueError(f"negatives= is only used by layout='queue', got layout={layout!r}")
