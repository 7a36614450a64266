"""What a fused backend implements: the negatives' log-sum-exp, forward and backward.

All of the O(M*C) work of the loss is one operation (MATH.md sections 3-4):

    lse[r] = log sum_{c not excluded for r} exp(x[r] . y[c] / tau)

- ``x``: (M, D) L2-normalized anchors; ``y``: (C, D) L2-normalized candidates of
  the same dtype and device, or ``None`` when the candidates are the anchors
  themselves (the ``ntxent`` layout), in which case the gradient returned for
  ``x`` holds both roles: ``dx = (E + E^T) x``.
- ``excluded``: (M, 2) int32, per anchor up to two candidate columns that are not
  negatives (itself, its positive); -1 for none. The positive logit is a row-wise
  dot computed outside the op, so the op only ever sees negatives.
- ``tau``: 0-dim tensor in the accumulation dtype on the inputs' device, read by
  the kernel (no host synchronization).
- returns ``lse`` (M,) in the accumulation dtype (float32, float64 for float64);
  a row whose every candidate is excluded has ``lse = -inf`` and a zero gradient
  (never NaN), whatever the exclusion table.

Its gradient, for an upstream ``h = dL/dlse``: ``E[r, c] = (h[r] / tau) *
exp(x[r].y[c] / tau - lse[r])`` on negative columns, 0 elsewhere; ``dx = E y``,
``dy = E^T x``, returned in the input dtype. For fp16/bf16 inputs the fused
kernels multiply E with the other side's rows on tensor cores, in the input type,
so they round scaled weights, never E itself (whose entries fall below fp16's
subnormals at large M): ``p = exp(...) <= 1`` for ``dx``, with ``h[r] / tau``
applied after the product; ``p * coef[r] / scale`` for ``dy``, where in fp16 each
tile of anchors has its own ``scale`` (its largest ``|h / tau|``, applied after the
tile's product), so that one large ``h[r]`` cannot push the other anchors' weights
to 0 (csrc/lse_math.h, issue 11). Without ``y`` (the anchors are their own
candidates) the CUDA and Triton kernels write ``dx = (E + E^T) x`` in one pass,
each operand ``(E[r, c] + E[c, r]) / scale`` from one score (lse_math.h's
symmetric view; in fp16 a scale per output row and tile of anchors). The tiles are
recomputed in the backward, never saved: the saved state is ``lse`` (O(M)), and for
the candidates path (``y`` given) of the Triton and compiled (``cpp``, ``cuda``)
backends also ``P y`` (M x D, accumulation dtype, ``P[r, c] = exp(x[r].y[c] / tau -
lse[r])`` on the negatives) when ``dx`` will be needed: the forward computes it with
the lse, and ``dx = (h / tau) P y`` (:func:`macl_kernels._math.rows_from_product`)
costs no pass over S, the backward's only pass being the one for ``dy``
(backends/triton/operators.py, macl_kernels/_extension_ops.py). Everything per anchor
(tau, d, V, the reduction) is shared Python in :mod:`macl_kernels._math` and
:mod:`macl_kernels._fused`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._math import accumulation_dtype


class Backend:
    """A named implementation of :func:`negative_lse` for some devices."""

    name: str = ""
    devices: str = ""  # human-readable, for error messages and the README table
    # Whether autograd can differentiate the backward again (create_graph=True, nested torch.func.grad).
    # If not, a higher-order gradient raises macl_kernels._autograd.HIGHER_ORDER_ERROR, never a wrong number.
    twice_differentiable: bool = False

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on ``device``, else why not and how to fix it."""
        raise NotImplementedError

    def normalize(self, z0: torch.Tensor, z1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prologue: ``(u0, u1, s+)``, differentiable.

        ``u0``, ``u1`` are the L2-normalized rows in the input dtype (what
        :meth:`negative_lse` reads) and ``s+`` the N positive cosines ``u0[i].u1[i]``
        in the accumulation dtype. Backends may override it with a fused kernel.
        """
        u0_acc, u0 = normalize_rows(z0)
        u1_acc, u1 = normalize_rows(z1)
        return u0, u1, (u0_acc * u1_acc).sum(dim=1)

    def negative_lse(
        self, x: torch.Tensor, y: Optional[torch.Tensor], excluded: torch.Tensor, tau: torch.Tensor
    ) -> torch.Tensor:
        """The differentiable negatives' log-sum-exp described in this module's docstring."""
        raise NotImplementedError


def normalize_rows(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``z / max(||z||, 1e-12)`` computed in the accumulation dtype: (that, that cast back to z's dtype)."""
    u_acc = F.normalize(z.to(accumulation_dtype(z.dtype)), dim=1, eps=1e-12)
    return u_acc, u_acc.to(z.dtype)
