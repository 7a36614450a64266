"""The dense reference against lightly, against scalar hand computation and MATH.md's closed forms."""

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from benchmarks.baselines import load_lightly_macl
from macl_kernels.testing import TOLERANCE, assert_rel_close, loss_and_grads, losses_by_hand, make_views


@pytest.fixture(scope="module")
def lightly_macl():
    return load_lightly_macl().MACLLoss


@pytest.mark.parametrize("n, d", [(2, 2), (3, 5), (17, 8), (64, 32)])
@pytest.mark.parametrize("temperature, alpha, a0", [(0.1, 0.5, 0.0), (0.3, 1.0, 0.2), (0.05, 0.0, 0.0)])
def test_reference_equals_lightly(lightly_macl, n, d, temperature, alpha, a0):
    z0, z1, _ = make_views(n, d, torch.float64, seed=n)
    a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    expected = lightly_macl(temperature=temperature, alpha=alpha, A_0=a0)(a, b)
    expected.backward()
    loss, grads = loss_and_grads(z0, z1, backend="reference", temperature=temperature, alpha=alpha, A_0=a0)
    # lightly forms 1 - P by subtraction, which cancels when P is near 1 (tiny
    # batches): its relative error is about 1e-16 / (1 - P), hence 1e-8, not 1e-15.
    assert_rel_close(loss, expected.detach(), 1e-8, "loss")
    assert_rel_close(grads[0], a.grad, 1e-8, "dz0")
    assert_rel_close(grads[1], b.grad, 1e-8, "dz1")


@pytest.mark.parametrize("layout", ["ntxent", "cross", "cross_sym", "queue"])
@pytest.mark.parametrize("schedule, alpha", [("linear", 0.5), ("exp", 2.0)])
@pytest.mark.parametrize("reweight, eps", [(True, 1e-8), (True, 0.0), (True, 0.3), (False, 1e-8)])
def test_reference_equals_hand_computation_for_two_pairs(layout, schedule, alpha, reweight, eps):
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    z0, z1, bank = t([[1.0, 0.0], [0.6, 0.8]]), t([[0.8, 0.6], [0.0, 2.0]]), t([[-1.0, 1.0], [3.0, -1.0], [0.0, -0.5]])
    bank = bank if layout == "queue" else None
    settings = dict(temperature=0.2, alpha=alpha, A_0=0.1 if schedule == "linear" else 0.0, schedule=schedule)
    settings.update(reweight=reweight, eps=eps, layout=layout)
    hand = losses_by_hand(z0, z1, bank, **settings)
    loss, stats = mk.macl_loss(
        z0, z1, negatives=bank, reduction="none", backend="reference", return_stats=True, **settings
    )
    torch.testing.assert_close(loss, t(hand.losses), rtol=1e-13, atol=0)
    if reweight and eps == 0:
        assert (loss >= 1).all()  # V (-log P) = -log P / (1 - P) >= 1
    assert stats.alignment.item() == pytest.approx(hand.alignment, rel=1e-14)
    assert stats.temperature.item() == pytest.approx(hand.temperature, rel=1e-14)
    assert stats.positive_prob.item() == pytest.approx(sum(hand.positive_probs) / len(hand.positive_probs), rel=1e-14)


def test_gradient_matches_closed_form_of_math_section_4():
    """G = (g V / tau)(P - [c = pos]), dX = (G + G^T) X, then back through the normalization."""
    n, eps = 5, 1e-8
    z0, z1, _ = make_views(n, 4, torch.float64, seed=3)
    loss, grads = loss_and_grads(z0, z1, backend="reference", reduction="none")

    z = torch.cat([z0, z1])
    norms = z.norm(dim=1, keepdim=True)
    x = z / norms
    a = (x[:n] * x[n:]).sum(1).mean()
    tau = 0.1 * (1 + 0.5 * a)
    logits = (x @ x.T / tau).fill_diagonal_(float("-inf"))
    prob = logits.softmax(dim=1)
    pos = (torch.arange(2 * n) + n) % (2 * n)
    p_pos = prob[torch.arange(2 * n), pos]
    v = 1 / (1 - p_pos + eps)
    upstream = 0.5 + torch.rand(2 * n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    onehot = F.one_hot(pos, 2 * n).double()
    g = (upstream * v / tau)[:, None] * (prob - onehot)
    dx = (g + g.T) @ x
    dz = (dx - x * (x * dx).sum(1, keepdim=True)) / norms
    assert_rel_close(torch.cat(grads), dz, 1e-12, "dz")


def test_plain_nt_xent_equals_cross_entropy_form():
    z0, z1, _ = make_views(9, 6, torch.float64, seed=4)
    x = F.normalize(torch.cat([z0, z1]), dim=1)
    logits = (x @ x.T / 0.2).fill_diagonal_(float("-inf"))
    target = (torch.arange(18) + 9) % 18
    expected = F.cross_entropy(logits, target)
    for backend in ("reference", "torch"):
        got = mk.nt_xent_loss(z0, z1, temperature=0.2, backend=backend)
        assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_stats_are_detached_and_consistent():
    z0, z1, _ = make_views(12, 7, torch.float64, seed=5)
    a = z0.clone().requires_grad_(True)
    _, stats = mk.macl_loss(a, z1, backend="reference", return_stats=True)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats)
    u0, u1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    assert stats.alignment.item() == pytest.approx((u0 * u1).sum(1).mean().item(), rel=1e-12)
    assert stats.temperature.item() == pytest.approx(0.1 * (1 + 0.5 * stats.alignment.item()), rel=1e-12)
    # The mean of P over the 24 anchors, from the dense softmax of each anchor's row.
    x = F.normalize(torch.cat([z0, z1]), dim=1)
    prob = (x @ x.T / stats.temperature).fill_diagonal_(float("-inf")).softmax(dim=1)
    positive = (torch.arange(24) + 12) % 24
    assert stats.positive_prob.item() == pytest.approx(prob[torch.arange(24), positive].mean().item(), rel=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions_are_consistent(reduction):
    z0, z1, _ = make_views(6, 3, torch.float64, seed=6)
    per_anchor = mk.macl_loss(z0, z1, backend="reference", reduction="none")
    assert per_anchor.shape == (12,)
    reduced = mk.macl_loss(z0, z1, backend="reference", reduction=reduction)
    expected = per_anchor.sum() if reduction == "sum" else per_anchor.mean()
    assert reduced.item() == pytest.approx(expected.item(), rel=1e-14)


@pytest.mark.parametrize("dtype, d", [(torch.float64, 900.0), (torch.float64, 720.0), (torch.float32, 95.0)], ids=str)
def test_exact_reweighting_where_one_minus_p_underflows(dtype, d):
    """eps = 0 with 1 - P = e^-d below the smallest normal number: each anchor's loss is ~1 (MATH.md section 3),
    and its gradient the fused path's, whose per-anchor math shares no code with the reference."""
    z = torch.eye(2, dtype=dtype)  # two orthogonal pairs: l+ = 1/tau, the one negative 0, so d = 1/tau
    temperature = 1 / (d * 1.5)  # tau = T (1 + 0.5 (A - 0)) with A = 1
    settings = dict(temperature=temperature, eps=0.0, layout="cross", reduction="none")
    loss, grads = loss_and_grads(z, z, backend="reference", **settings)
    assert torch.allclose(loss, torch.ones_like(loss), rtol=4 * torch.finfo(dtype).eps, atol=0), loss
    fused_loss, fused_grads = loss_and_grads(z, z, backend="torch", **settings)
    assert_rel_close(fused_loss, loss, 1e-12 if dtype == torch.float64 else 1e-6, "loss")
    for got, want in zip(fused_grads, grads):
        assert_rel_close(got, want, 1e-12 if dtype == torch.float64 else 1e-6, "gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_exact_reweighting_gradient_is_finite_where_p_is_tiny(dtype):
    """eps = 0 with an anti-aligned positive at a small temperature: P underflows (log P past -88 in float32
    math), and the log-space path must not turn the unused branch's overflow into NaN gradients."""
    g = torch.Generator().manual_seed(4)
    z0, z1 = torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    z1[0] = -z0[0]
    temperature = 0.001 if dtype == torch.float64 else 0.01
    z0, z1 = z0.to(dtype), z1.to(dtype)
    loss, grads = loss_and_grads(z0, z1, backend="reference", temperature=temperature, eps=0.0)
    assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads)
    fused_loss, fused_grads = loss_and_grads(z0, z1, backend="torch", temperature=temperature, eps=0.0)
    assert_rel_close(loss, fused_loss, TOLERANCE[dtype], "loss")
