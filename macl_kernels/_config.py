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
from typing import Optional, Tuple, Union

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
    """The checked hyper-parameters of one MACL loss (see MATH.md sections 2-3 and 8).

    ``temperature`` is a float > 0, or a 0-dim floating-point tensor T (any autograd
    expression, e.g. CLIP's ``1 / logit_scale.exp()``, or an ``nn.Parameter``) that
    then gets the exact gradient of MATH.md section 8. A tensor's value is not
    checked (that would cost a host synchronization every step); tau is floored at
    ``min_temperature`` whatever it holds.
    """

    temperature: Union[float, torch.Tensor] = 0.1
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
        _check_temperature(self.temperature)
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
    if not -math.inf < value < math.inf:  # not math.isfinite: dynamo cannot trace it on a symbolic float (dynamic=True)
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_temperature(value) -> None:
    if not isinstance(value, torch.Tensor):
        _check_real("temperature", value, positive=True)
    elif value.dim() != 0:
        raise ValueError(f"temperature as a tensor must be 0-dim (a scalar), got shape {tuple(value.shape)}")
    elif not value.is_floating_point():
        raise TypeError(f"temperature as a tensor must have a floating-point dtype, got {value.dtype}")


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
    """Check the embeddings and the extra negatives (the bank of the ``queue`` layout) of one call."""
    _check_matrix("z0", z0)
    _check_matrix("z1", z1)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    n, d = z0.shape
    if n < 1:
        raise ValueError(f"z0 and z1 need at least 1 row (sample), got {n}")
    if d < 1:
        raise ValueError(f"z0 and z1 need an embedding dimension >= 1, got {d}")
    if z0.device != z1.device:
        raise ValueError(f"z0 and z1 must be on the same device, got {z0.device} and {z1.device}")
    if negatives is None:
        if _layouts.LAYOUTS[layout].needs_negatives:
            raise ValueError(f"layout={layout!r} needs negatives=, the K x D bank of negatives")
        return
    _check_matrix("negatives", negatives)
    if negatives.shape[1] != d:
        raise ValueError(f"negatives must have the embedding width of z0 ({d}), got shape {tuple(negatives.shape)}")
    if negatives.shape[0] < 1:
        raise ValueError("negatives must hold at least one row (pass None for no extra negatives)")
    if negatives.device != z0.device:
        raise ValueError(f"negatives must be on the device of z0 ({z0.device}), got {negatives.device}")


def check_temperature_device(temperature, device: torch.device) -> None:
    """A tensor temperature is on the inputs' device, or a CPU scalar (torch moves those into any device's ops)."""
    if isinstance(temperature, torch.Tensor) and temperature.device not in (device, torch.device("cpu")):
        raise ValueError(
            f"temperature as a tensor must be on the device of z0 ({device}) or on the CPU, got {temperature.device}"
        )


def promote(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The tensors (None skipped) cast to their widest floating dtype, where mixed precision is computed.

    The casts are differentiable (gradients come back in each input's dtype) and
    copy nothing for a tensor already in that dtype.
    """
    dtypes = [t.dtype for t in tensors if t is not None]
    wide = dtypes[0]
    for dtype in dtypes[1:]:
        wide = torch.promote_types(wide, dtype)
    return tuple(None if t is None else t.to(wide) for t in tensors)
