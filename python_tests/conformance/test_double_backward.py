"""Higher-order gradients: exact on a backend that declares itself twice differentiable, else a clear error.

Never a wrong number (MATH.md section 4 holds V and tau constant at every order). The
exact backends are checked against the dense reference's double backward and, at the
op level, against finite differences of their backward (gradgradcheck).
"""

import re

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from macl_kernels._autograd import HIGHER_ORDER_ERROR
from macl_kernels._layouts import layout_exclusions
from macl_kernels.backends import resolve
from macl_kernels.testing import LAYOUTS, TOLERANCE, assert_rel_close, bitwise_equal, loss_and_grads
from python_tests.conformance.conftest import DEVICE, views

raises_higher_order_error = pytest.raises(RuntimeError, match=re.escape(HIGHER_ORDER_ERROR))


def twice_differentiable(backend: str) -> bool:
    return resolve(backend, torch.device(DEVICE)).twice_differentiable


def gradient_penalty(backend, z0, z1, bank, **kwargs):
    """The input gradients (create_graph=True), their squared norm and the leaves it is to be differentiated for."""
    leaves = tuple(z.detach().clone().requires_grad_(True) for z in (z0, z1))
    loss = mk.macl_loss(*leaves, negatives=bank, backend=backend, **kwargs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    return first, sum((g * g).sum() for g in first), leaves


SETTINGS = {
    "macl": dict(),
    "exact reweighting eps = 0": dict(eps=0.0),  # the slope V * (1 - P) is the constant 1
    "nt-xent": dict(alpha=0.0, reweight=False),
}


@pytest.mark.parametrize(
    "layout, setting", [(layout, "macl") for layout in LAYOUTS] + [("ntxent", s) for s in SETTINGS if s != "macl"]
)
def test_gradient_penalty_is_exact_or_raises(backend, layout, setting):
    kwargs = dict(layout=layout, **SETTINGS[setting])
    z0, z1, bank = views(6, 4, torch.float64, seed=11, layout=layout)
    first, penalty, leaves = gradient_penalty(backend, z0, z1, bank, **kwargs)
    assert bitwise_equal(first, loss_and_grads(z0, z1, bank, backend=backend, **kwargs)[1]), "create_graph changed"
    if not twice_differentiable(backend):
        with raises_higher_order_error:
            torch.autograd.grad(penalty, leaves)
        return
    _, ref_penalty, ref_leaves = gradient_penalty("reference", z0, z1, bank, **kwargs)
    expected = torch.autograd.grad(ref_penalty, ref_leaves)
    for name, got, ref in zip(("dz0", "dz1"), torch.autograd.grad(penalty, leaves), expected):
        assert_rel_close(got, ref, TOLERANCE[torch.float64], f"{backend} second-order {name}")


def test_nested_func_grad_is_exact_or_raises(backend):
    z0, z1, _ = views(5, 3, torch.float64, seed=12)

    def penalty(a, backend):
        g = torch.func.grad(lambda t: mk.macl_loss(t, z1, backend=backend))(a)
        return (g * g).sum()

    if not twice_differentiable(backend):
        with raises_higher_order_error:
            torch.func.grad(penalty)(z0, backend)
        return
    expected = torch.func.grad(penalty)(z0, "reference")
    assert_rel_close(torch.func.grad(penalty)(z0, backend), expected, TOLERANCE[torch.float64], f"{backend} hessian")


@pytest.mark.parametrize("with_candidates", [True, False])
def test_negative_lse_op_second_order(backend, with_candidates):
    """The op alone, under a constant upstream gradient: only the saved tensors link its backward to the inputs."""
    impl = resolve(backend, torch.device(DEVICE))
    g = torch.Generator().manual_seed(13)
    unit = lambda rows: F.normalize(torch.randn(rows, 3, generator=g, dtype=torch.float64), dim=1).to(DEVICE)  # noqa: E731
    tau = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    if with_candidates:
        inputs = (unit(5).requires_grad_(True), unit(4).requires_grad_(True))
        excluded = layout_exclusions("cross", 4, DEVICE)
        excluded = torch.cat([excluded, excluded[:1]]).int()  # a fifth anchor

        def op(x, y):
            return impl.negative_lse(x, y, excluded, tau)
    else:
        inputs = (unit(6).requires_grad_(True),)
        excluded = layout_exclusions("ntxent", 3, DEVICE)

        def op(x):
            return impl.negative_lse(x, None, excluded, tau)

    if twice_differentiable(backend):
        assert torch.autograd.gradgradcheck(op, inputs)
        return
    first = torch.autograd.grad(op(*inputs).sum(), inputs, create_graph=True)
    with raises_higher_order_error:
        torch.autograd.grad(sum((d * d).sum() for d in first), inputs)
