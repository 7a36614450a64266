"""``torch.library.opcheck`` of every compiled backend's custom ops, the backward ops included.

opcheck runs an op through the checks ``torch.compile`` relies on: its schema, its
fake (meta) kernel against the real one, its autograd registration, and AOT
dispatch with dynamic shapes. Each compiled backend lists its ops and sample
arguments in ``OP_CASES``; the pure-PyTorch ``torch`` backend has no custom op. A
new compiled backend must add its entry: ``test_every_backend_is_opchecked``
fails until it does.
"""

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from macl_kernels._layouts import layout_exclusions, no_exclusions
from macl_kernels._math import accumulation_dtype
from python_tests.conformance.conftest import BACKENDS, DEVICE

OpCases = Dict[str, Tuple[Callable, tuple]]
PURE_PYTORCH = ("torch",)


def _unit_rows(rows: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(DEVICE, dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _shared_inputs(dtype: torch.dtype):
    """Eight anchors against six candidates (two anchors without an excluded column), and four ntxent pairs."""
    acc = accumulation_dtype(dtype)
    x, y = _unit_rows(8, 5, 1, dtype), _unit_rows(6, 5, 2, dtype)
    cross = torch.cat([layout_exclusions("cross", 6, DEVICE), no_exclusions(2, DEVICE)])
    ntxent = layout_exclusions("ntxent", 4, DEVICE)
    tau = torch.tensor(0.2, dtype=acc, device=DEVICE)
    upstream = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE, acc)
    return x, y, cross, ntxent, tau, upstream


def extension_cases(dtype: torch.dtype) -> OpCases:
    """The C++/CUDA extension's ops (csrc/ops.cpp): ``cpp`` and ``cuda`` differ by the inputs' device."""
    x, y, cross, ntxent, tau, upstream = _shared_inputs(dtype)
    forward = torch.ops.macl_kernels.negative_lse.default
    product = torch.ops.macl_kernels.negative_lse_product.default
    backward = torch.ops.macl_kernels.negative_lse_backward.default
    lse_cross, lse_ntxent = forward(x, y, cross, tau), forward(x, None, ntxent, tau)
    return {
        "negative_lse with candidates": (forward, (_leaf(x), _leaf(y), cross, tau)),
        "negative_lse ntxent": (forward, (_leaf(x), None, ntxent, tau)),
        "negative_lse_product": (product, (_leaf(x), _leaf(y), cross, tau)),
        "negative_lse_backward with candidates": (backward, (upstream, x, y, cross, tau, lse_cross, True)),
        "negative_lse_backward without dy": (backward, (upstream, x, y, cross, tau, lse_cross, False)),
        "negative_lse_backward without dx": (backward, (upstream, x, y, cross, tau, lse_cross, True, False)),
        "negative_lse_backward ntxent": (backward, (upstream, x, None, ntxent, tau, lse_ntxent, False)),
    }


def triton_cases(dtype: torch.dtype) -> OpCases:
    """The Triton backend's ops (``macl_kernels::triton_*``): opaque custom ops under the interpreter."""
    from macl_kernels.backends.triton import operators

    x, y, cross, ntxent, tau, upstream = _shared_inputs(dtype)
    lse_cross = operators.negative_lse(x, y, cross, tau, False)
    lse_ntxent = operators.negative_lse(x, None, ntxent, tau, False)
    _, product = operators.negative_lse_product(x, y, cross, tau, False)  # P y, kept for the cross backward
    z0, z1 = (_unit_rows(5, 7, seed, dtype) * 3 for seed in (10, 11))
    norm0, norm1 = (z.to(accumulation_dtype(dtype)).norm(dim=1) for z in (z0, z1))
    return {
        "negative_lse with candidates": (operators.negative_lse, (_leaf(x), _leaf(y), cross, tau, False)),
        "negative_lse ntxent": (operators.negative_lse, (_leaf(x), None, ntxent, tau, False)),
        "negative_lse_product": (operators.negative_lse_product, (_leaf(x), _leaf(y), cross, tau, False)),
        "rows from the product": (operators.negative_lse_product_rows, (x, lse_cross, product, tau, upstream)),
        "rows": (operators.negative_lse_rows, (x, y, cross, tau, lse_cross, upstream, False)),
        "rows symmetric": (operators.negative_lse_rows, (x, None, ntxent, tau, lse_ntxent, upstream, False)),
        "columns": (operators.negative_lse_columns, (x, y, cross, tau, lse_cross, upstream, False)),
        "normalize": (operators.normalize, (_leaf(z0), _leaf(z1))),
        "normalize_backward": (operators.normalize_backward, (z0, z1, norm0, norm1, None, z1, upstream[:5])),
    }


OP_CASES: Dict[str, Callable[[torch.dtype], OpCases]] = {
    "cpp": extension_cases,
    "cuda": extension_cases,
    "triton": triton_cases,
}


def test_every_backend_is_opchecked():
    unlisted = [b for b in BACKENDS if b not in OP_CASES and b not in PURE_PYTORCH]
    assert not unlisted, f"compiled backends without opcheck cases in OP_CASES: {unlisted}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype):
    if backend in PURE_PYTORCH:
        pytest.skip("pure PyTorch: no custom op to check")
    for name, (op, args) in OP_CASES[backend](dtype).items():
        try:
            torch.library.opcheck(op, args)
        except Exception as error:
            raise AssertionError(f"opcheck of {backend}'s {name}: {error}") from error
