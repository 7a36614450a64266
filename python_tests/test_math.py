"""The shared per-anchor math against MATH.md's closed forms, evaluated with 50 digits, at the extremes too.

The expected values come from mpmath (a dependency of sympy, hence of torch), so
they share no rounding with the code under test: float64 results are checked to a
few ulps, float32 results to a few float32 ulps.
"""

import mpmath
import pytest
import torch

from macl_kernels import MACLConfig
from macl_kernels._math import adaptive_temperature, anchor_loss, anchor_loss_slope, anchor_loss_value

mpmath.mp.dps = 50
D_VALUES = torch.tensor([-200.0, -30.0, -5.0, -0.5, 0.0, 0.5, 5.0, 30.0, 80.0, 200.0, 1e4], dtype=torch.float64)
# Relative error allowed: float64 a few ulps (2.2e-16 each); float32 a few float32 ulps (1.2e-7 each).
RTOL = {torch.float64: 1e-14, torch.float32: 1e-6}


def one_minus_p(d):
    """1 - P = sigmoid(-d) with 50 digits (never formed as 1 - P, which would cancel)."""
    return 1 / (1 + mpmath.exp(mpmath.mpf(float(d))))


def exact_loss(d, reweight: bool, eps: float):
    """MATH.md section 3: -V log P with V = 1 / (1 - P + eps), or V = 1."""
    nll = mpmath.log1p(mpmath.exp(-mpmath.mpf(float(d))))  # -log P = log(1 + e^-d)
    return nll / (one_minus_p(d) + eps) if reweight else nll


def exact_slope(d, reweight: bool, eps: float):
    """MATH.md section 4: w = -d loss / d d with V held constant = V (1 - P)."""
    q = one_minus_p(d)
    return q / (q + eps) if reweight else q


def expected(fn, d: torch.Tensor, *args) -> torch.Tensor:
    return torch.tensor([float(fn(x, *args)) for x in d.tolist()], dtype=torch.float64)


def test_linear_and_exp_schedules():
    a = torch.tensor(0.3, dtype=torch.float64)
    mp = mpmath.mpf
    lin = adaptive_temperature(a, MACLConfig(temperature=0.2, alpha=0.5, A_0=0.1))
    assert lin.item() == pytest.approx(float(mp("0.2") * (1 + mp("0.5") * (mp("0.3") - mp("0.1")))), rel=1e-15)
    exp = adaptive_temperature(a, MACLConfig(temperature=0.2, alpha=2.0, schedule="exp"))
    assert exp.item() == pytest.approx(float(mp("0.2") * 2 ** mp("0.3")), rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_temperature_floor_instead_of_nonpositive_tau(dtype):
    cfg = MACLConfig(temperature=0.1, alpha=1.0, A_0=1.0, min_temperature=1e-3)
    tau = adaptive_temperature(torch.tensor(-0.9, dtype=dtype), cfg)  # 0.1 * (1 - 1.9) < 0
    assert tau.dtype == dtype and tau.item() == torch.tensor(1e-3, dtype=dtype).item()
    just_above = adaptive_temperature(torch.tensor(0.02, dtype=torch.float64), cfg)  # 0.1 * 0.02 > 1e-3
    assert just_above.item() == pytest.approx(2e-3, rel=1e-15)


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_loss_value_equals_the_closed_form(reweight, eps, dtype):
    # eps = 0 included: V = 1 + e^d overflows and softplus(-d) underflows, the product tends to 1.
    d = D_VALUES.to(dtype)
    if dtype == torch.float32:
        d = d[d.abs() < 1e3]  # float32 d: |d| < 1/tau_min = 1e4 in practice, but e^-1e4 is 0 either way
    got = anchor_loss_value(d, reweight, eps)
    assert got.dtype == dtype and torch.isfinite(got).all()
    # Below the smallest normal number of the dtype (float32: e^-200 at d = 200) only an absolute bound holds.
    atol = torch.finfo(dtype).tiny
    torch.testing.assert_close(got.double(), expected(exact_loss, d, reweight, eps), rtol=RTOL[dtype], atol=atol)


def test_loss_value_past_the_softplus_threshold_in_float64():
    # softplus(x) is linear past its threshold: the default 20 would give 1e-10 relative error here.
    d = torch.tensor([-20.5, -25.0], dtype=torch.float64)
    exact = expected(exact_loss, d, False, 0.0)
    torch.testing.assert_close(anchor_loss_value(d, False, 0.0), exact, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_reweighting_loss_is_at_least_one(dtype):
    # eps = 0: loss = (1 + e^d) softplus(-d) >= 1, tending to 1 as d -> inf (MATH.md section 3).
    loss = anchor_loss_value(D_VALUES.to(dtype), True, 0.0)
    assert (loss >= 1).all()
    assert loss[-1].item() == 1.0


@pytest.mark.parametrize(
    "dtype, d", [(torch.float32, [87.5, 90.0, 95.0, 100.0, 103.0]), (torch.float64, [709.0, 720.0, 744.0])], ids=str
)
def test_exact_reweighting_loss_where_e_to_the_minus_d_is_subnormal(dtype, d):
    # eps = 0, e^-d below the smallest normal number: the loss is 1 to the dtype's precision (it was ~0
    # when t = e^-d was clamped to that smallest normal number before log1p(t) / t).
    loss = anchor_loss_value(torch.tensor(d, dtype=dtype), True, 0.0)
    assert (loss >= 1).all() and (loss - 1).abs().max() <= torch.finfo(dtype).eps, loss


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
def test_slope_equals_the_closed_form(reweight, eps):
    got = anchor_loss_slope(D_VALUES, reweight, eps)
    torch.testing.assert_close(got, expected(exact_slope, D_VALUES, reweight, eps), rtol=1e-14, atol=0)


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
def test_slope_is_minus_derivative_with_v_held_constant(reweight, eps):
    d = D_VALUES[1:9].clone().requires_grad_(True)
    v = 1 / (torch.sigmoid(-d) + eps) if reweight else torch.ones_like(d)
    # threshold: softplus is linear above 20 by default, its derivative then exactly 1.
    torch.nn.functional.softplus(-d, threshold=100).mul(v.detach()).sum().backward()
    torch.testing.assert_close(anchor_loss_slope(d.detach(), reweight, eps), -d.grad, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_anchor_loss_and_its_gradient_equal_the_closed_forms(reweight, eps, dtype):
    # The differentiable function the loss paths call, with the settings read from the config.
    d = D_VALUES.to(dtype, copy=True).requires_grad_(True)
    upstream = torch.linspace(0.5, 2.0, len(D_VALUES), dtype=dtype)
    loss = anchor_loss(d, MACLConfig(reweight=reweight, eps=eps))
    (loss * upstream).sum().backward()
    assert d.grad.dtype == dtype
    tiny = torch.finfo(dtype).tiny
    exact = expected(exact_loss, D_VALUES, reweight, eps)
    torch.testing.assert_close(loss.detach().double(), exact, rtol=RTOL[dtype], atol=tiny)
    exact_grad = -upstream.double() * expected(exact_slope, D_VALUES, reweight, eps)
    torch.testing.assert_close(d.grad.double(), exact_grad, rtol=RTOL[dtype], atol=tiny)


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


@pytest.mark.parametrize("reweight, eps", [(False, 0.0), (True, 1e-8), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_row_without_negatives_has_no_loss_and_no_slope(reweight, eps, dtype):
    # MATH.md section 8: LSE- = -inf, so d = +inf: loss 0 and gradient 0, eps = 0 included (not its limit 1).
    d = torch.tensor([float("inf"), 3.0], dtype=dtype, requires_grad=True)
    loss = anchor_loss(d, MACLConfig(reweight=reweight, eps=eps))
    loss.sum().backward()
    assert loss[0].item() == 0.0 and d.grad[0].item() == 0.0
    assert loss[1].item() > 0 and d.grad[1].item() < 0  # the row with negatives next to it is untouched
