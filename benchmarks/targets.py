"""What a case runs: a fused backend of macl_kernels or a baseline, and whether it can run here."""

from __future__ import annotations

import functools
from typing import Optional

import torch

import macl_kernels as mk
from macl_kernels.testing import fused_backends

from . import baselines
from .cases import Case, loss_kwargs
from .presets import COMPILED_REFERENCE, DENSE, INF_CL, LIGHTLY, REFERENCE


def unavailable_reason(case: Case, device: str) -> Optional[str]:
    """None if ``case`` can be measured on ``device``, else why not (recorded as "unavailable")."""
    if case.backend == LIGHTLY:
        if case.op != "macl" or case.layout != "ntxent":
            return "lightly's MACLLoss computes only the ntxent MACL loss"
        try:
            baselines.load_lightly_macl()
        except (ImportError, OSError) as exc:
            return str(exc)
        return None
    if case.backend == INF_CL:
        if case.op != "infonce" or case.layout != "cross_sym":
            return "inf-cl computes only the cross_sym InfoNCE loss"
        if torch.device(device).type != "cuda":
            return "inf-cl runs on CUDA only"
        if baselines.inf_cl_head_dim(case.d) is None:
            return f"inf-cl needs D divisible by one of {baselines.INF_CL_HEAD_DIMS}"
        return baselines.inf_cl_missing_reason()
    if case.backend in (REFERENCE, COMPILED_REFERENCE):
        return None
    if case.backend not in mk.known_backends():
        return f"unknown backend {case.backend!r}"
    if case.backend not in fused_backends(device):
        return f"backend {case.backend!r} is not available on {device} (not built, or not for this device)"
    return None


def dense_bytes_lower_bound(case: Case) -> int:
    """The dense baselines hold at least one M x C similarity matrix in the input dtype."""
    if case.backend not in DENSE:
        return 0
    m, c = case.anchors_and_candidates()
    return m * c * torch.empty((), dtype=getattr(torch, case.dtype)).element_size()


def build(case: Case):
    """The callable ``(z0, z1) -> loss`` that ``case`` measures."""
    if case.backend == LIGHTLY:
        return baselines.lightly_loss()
    if case.backend == INF_CL:
        return baselines.inf_cl_loss(case.d)
    if case.backend == REFERENCE:
        return baselines.reference_loss(**loss_kwargs(case))
    if case.backend == COMPILED_REFERENCE:
        return baselines.compiled_reference_loss(**loss_kwargs(case))
    return functools.partial(mk.macl_loss, backend=case.backend, **loss_kwargs(case))


def compiles_per_shape(case: Case) -> bool:
    """Whether its first call at a new shape may compile (then the warm-up uses the case's own shape)."""
    return case.backend == COMPILED_REFERENCE
