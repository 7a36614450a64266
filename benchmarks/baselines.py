"""What a user would run instead of macl_kernels: the baselines of the benchmarks and tests.

Each ``*_loss`` returns a callable ``(z0, z1) -> loss`` on raw (unnormalized) views, so
that every baseline does the same work as ``macl_kernels.macl_loss``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import macl_kernels as mk

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# inf-cl splits D into heads of one of these widths (its Triton kernels' constraint).
INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)


def load_lightly_macl() -> ModuleType:
    """lightly's ``loss/macl_loss.py`` on its own, without importing the ``lightly`` package.

    ``import lightly`` pulls in torchvision; the loss module needs only torch, so it
    is loaded from lightly's installed files (``pip install --no-deps lightly==1.6.0``).
    """
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lightly is not installed: pip install --no-deps lightly==1.6.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss", "macl_loss.py")
    module_spec = importlib.util.spec_from_file_location("lightly_macl_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def lightly_loss() -> LossFn:
    """lightly's ``MACLLoss()`` (the ntxent layout, alpha=0.5, A_0=0, reweighted): dense."""
    return load_lightly_macl().MACLLoss()


def reference_loss(**loss_kwargs) -> LossFn:
    """This package's dense reference, eager."""
    return functools.partial(mk.macl_loss, backend="reference", **loss_kwargs)


def compiled_reference_loss(**loss_kwargs) -> LossFn:
    """The dense reference under ``torch.compile`` (dynamic shapes: one compilation for every N)."""
    return torch.compile(reference_loss(**loss_kwargs), dynamic=True)


def inf_cl_missing_reason() -> Optional[str]:
    """None if the ``inf_cl`` package can be imported, else how to get it."""
    if importlib.util.find_spec("inf_cl") is None:
        return "inf-cl is not installed (pip install inf_cl; needs CUDA and Triton)"
    return None


def inf_cl_head_dim(d: int) -> Optional[int]:
    return next((h for h in INF_CL_HEAD_DIMS if d % h == 0), None)


def inf_cl_loss(d: int, temperature: float = 0.1) -> LossFn:
    """inf-cl's symmetric InfoNCE (CLIP-style, both directions averaged) at a fixed temperature.

    Equals ``macl_loss(..., layout="cross_sym", alpha=0, reweight=False)``: inf-cl takes
    normalized features and a logit scale 1/tau, and averages over each direction's rows.
    """
    cal_inf_loss = importlib.import_module("inf_cl").cal_inf_loss
    head_dim = inf_cl_head_dim(d)

    def loss(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        u0, u1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
        scale = torch.full((), 1.0 / temperature, device=z0.device)
        forward = cal_inf_loss(u0, u1, scale=scale, head_dim=head_dim)
        backward = cal_inf_loss(u1, u0, scale=scale, head_dim=head_dim)
        return 0.5 * (forward + backward)

    return loss
