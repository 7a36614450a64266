"""The shared per-anchor math against MATH.md's closed forms, at the extremes too."""

import pytest
import torch

from macl_kernels import MACLConfig
from macl_kernels._math import adaptive_temperature, anchor_loss, anchor_loss_slope, anchor_loss_value

D_VALUES = torch.tensor([-200.0, -30.0, -5.0, -0.5, 0.0, 0.5, 5.0, 30.0, 80.0, 200.0, 1e4], dtype=torch.float64)


def test_linear_and_exp_schedules():
    a = torch.tensor(0.3, dtype=torch.float64)
    lin = adaptive_temperature(a, MACLConfig(temperature=0.2, alpha=0.5, A_0=0.1))
    assert lin.item() == pytest.approx(0.2 * (1 + 0.5 * (0.3 - 0.1)))
    exp = adaptive_temperature(a, MACLConfig(temperature=0.2, alpha=2.0, schedule="exp"))
    assert exp.item() == pytest.approx(0.2 * 2.0**0.3)


def test_temperature_floor_instead_of_nonpositive_tau():
    cfg = MACLConfig(temperature=0.1, alpha=1.0, A_0=1.0, min_temperature=1e-3)
    tau = adaptive_temperature(torch.tensor(-0.9), cfg)  # 0.1 * (1 - 1.9) < 0
    assert tau.item() == pytest.approx(1e-3)


def test_no_reweight_is_negative_log_likelihood():
    d = D_VALUES
    expected = torch.log1p(torch.exp(-d))  # -log sigmoid(d)
    torch.testing.assert_close(anchor_loss_value(d, False, 0.0), expected, rtol=1e-12, atol=0)


def test_reweight_with_eps_matches_lightly_form():
    d = D_VALUES[2:7]  # where 1 - P by subtraction is still accurate
    p = torch.sigmoid(d)
    expected = -torch.log(p) / (1 - p + 1e-8)
    torch.testing.assert_close(anchor_loss_value(d, True, 1e-8), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_reweight_is_finite_and_at_least_one(dtype):
    # eps = 0: loss = (1 + e^d) softplus(-d), which is >= 1 and tends to 1 as d -> inf.
    d = D_VALUES.to(dtype)
    loss = anchor_loss_value(d, True, 0.0)
    assert torch.isfinite(loss).all()
    assert (loss >= 1 - 1e-6).all()
    assert loss[-1].item() == pytest.approx(1.0)
    mid = d.abs() < 20
    expected = (1 + torch.exp(d[mid].double())) * torch.log1p(torch.exp(-d[mid].double()))
    torch.testing.assert_close(loss[mid].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
def test_slope_is_minus_derivative_with_v_held_constant(reweight, eps):
    d = D_VALUES[1:9].clone().requires_grad_(True)
    v = 1 / (torch.sigmoid(-d) + eps) if reweight else torch.ones_like(d)
    torch.nn.functional.softplus(-d).mul(v.detach()).sum().backward()
    torch.testing.assert_close(anchor_loss_slope(d.detach(), reweight, eps), -d.grad, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0)])
def test_anchor_loss_gradient_is_finite_at_the_extremes(reweight, eps):
    d = D_VALUES.to(torch.float32).requires_grad_(True)
    cfg = MACLConfig(reweight=reweight, eps=eps)
    loss = anchor_loss(d, cfg)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(d.grad).all()
    assert (d.grad <= 0).all() and (d.grad >= -1).all()


def test_anchor_loss_gradcheck_without_reweighting():
    # gradcheck perturbs d, and a detached V would move with it: only V = 1 is checkable.
    d = torch.linspace(-6, 6, 9, dtype=torch.float64, requires_grad=True)
    cfg = MACLConfig(reweight=False)
    assert torch.autograd.gradcheck(lambda t: anchor_loss(t, cfg), (d,))


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
def test_anchor_loss_second_derivative_holds_v_constant(reweight, eps):
    """Double backward through the per-anchor loss equals autograd of the closed form with V detached."""
    weights = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)

    def second_derivative(loss_of_d, d_values):
        d = d_values.clone().requires_grad_(True)
        (first,) = torch.autograd.grad(loss_of_d(d).sum(), d, create_graph=True)
        return torch.autograd.grad((first * weights).sum(), d)[0]

    def closed_form(d):
        v = 1 / (torch.sigmoid(-d) + eps) if reweight else torch.ones_like(d)
        return torch.nn.functional.softplus(-d) * v.detach()

    d = D_VALUES[2:9]  # -5 <= d <= 80: torch's softplus is linear, hence inexact here, beyond 20
    got = second_derivative(lambda t: anchor_loss(t, MACLConfig(reweight=reweight, eps=eps)), d)
    torch.testing.assert_close(got, second_derivative(closed_form, d), rtol=1e-10, atol=1e-300)
    extreme = second_derivative(lambda t: anchor_loss(t, MACLConfig(reweight=reweight, eps=eps)), D_VALUES[-7:])
    assert torch.isfinite(extreme).all()
