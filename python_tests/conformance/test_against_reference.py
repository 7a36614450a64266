"""Every fused backend against the float64 dense reference: settings, shapes, dtypes, edge cases (MATH.md section 6)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from macl_kernels._layouts import layout_exclusions
from macl_kernels.backends import resolve
from macl_kernels.testing import (
    DTYPES,
    LAYOUTS,
    TOLERANCE,
    assert_matches_reference,
    assert_rel_close,
    bitwise_equal,
    loss_and_grads,
    losses_by_hand,
    stats_dict,
)
from python_tests.conformance.conftest import DEVICE, views


@pytest.mark.parametrize(
    "layout, schedule, reweight, reduction",
    list(itertools.product(LAYOUTS, ("linear", "exp"), (True, False), ("mean", "sum", "none"))),
)
def test_every_setting_matches_reference(backend, layout, schedule, reweight, reduction):
    z0, z1, bank = views(17, 9, torch.float64, seed=1, layout=layout)
    alpha = 2.0 if schedule == "exp" else 0.5
    assert_matches_reference(
        backend, z0, z1, bank, layout=layout, schedule=schedule, alpha=alpha, reweight=reweight, reduction=reduction
    )


@pytest.mark.parametrize("n, d", list(itertools.product((2, 3, 17, 130), (1, 3, 64, 129))))
@pytest.mark.parametrize("layout", ["ntxent", "cross_sym"])
def test_odd_shapes_match_reference(backend, n, d, layout):
    z0, z1, bank = views(n, d, seed=n + d, layout=layout)
    assert_matches_reference(backend, z0, z1, bank, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_match_reference_within_math_tolerances(backend, dtype, layout):
    z0, z1, bank = views(33, 40, dtype, seed=2, layout=layout)
    assert_matches_reference(backend, z0, z1, bank, layout=layout)


def test_non_contiguous_views(backend):
    z0, z1, _ = views(19, 24, seed=3)
    wide = torch.cat([z0, z1], dim=1)  # z0 and z1 as strided column slices
    assert not wide[:, :24].is_contiguous()
    assert_matches_reference(backend, wide[:, :24], wide[:, 24:])
    assert_matches_reference(backend, z0.T.contiguous().T, z1[::1])


EDGE_CASES = {
    "zero rows": dict(mutate=lambda z0, z1: (z0.index_fill(0, torch.tensor([0, 3]), 0.0), z1)),
    "duplicated rows": dict(mutate=lambda z0, z1: (z0.index_copy(0, torch.tensor([1]), z0[2:3]), z1)),
    "identical views": dict(mutate=lambda z0, z1: (z0, z0.clone())),
    # 0.1 * (1 + (A - 2)) < 0 for every A <= 1: the floor binds (checked through the statistics). A floor
    # far lower would put every anchor's loss, about e^-(s+ - s-) / tau, below float32's range.
    "tau at its floor": dict(kwargs=dict(temperature=0.1, alpha=1.0, A_0=2.0, min_temperature=0.02)),
    "confident positives (1 - P < 1e-30)": dict(kwargs=dict(temperature=0.005), correlation=0.0),
    "exact reweighting eps = 0": dict(kwargs=dict(eps=0.0, temperature=0.005), correlation=0.0),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_finite_and_exact_on_edge_cases(backend, case, dtype):
    spec = EDGE_CASES[case]
    z0, z1, _ = views(10, 6, dtype, seed=4, correlation=spec.get("correlation", 0.5))
    if spec.get("correlation") == 0.0:
        # Nearly identical views: d is huge. Seeded, so the inputs do not depend on test order.
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        z1 = z0 + 1e-3 * noise.to(z0)
    if "mutate" in spec:
        z0, z1 = spec["mutate"](z0, z1)
    kwargs = spec.get("kwargs", {})
    loss, grads = loss_and_grads(z0, z1, backend=backend, reduction="none", **kwargs)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    if "min_temperature" in kwargs:
        _, stats = mk.macl_loss(z0, z1, backend=backend, return_stats=True, **kwargs)
        floor = torch.tensor(kwargs["min_temperature"], dtype=stats.temperature.dtype)
        assert stats.temperature.item() == floor.item(), "the temperature is at its floor"
    # A cosine's rounding error reaches the logits as ulp / tau: the dense run in the same dtype measures it.
    assert_matches_reference(backend, z0, z1, reduction="none", **kwargs)


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_and_statistics_equal_a_hand_computation(backend, layout, eps):
    """MATH.md with Python floats (losses_by_hand), which shares no code with the package: _math.py is checked too."""
    z0, z1, bank = views(3, 4, torch.float64, seed=11, layout=layout)
    settings = dict(layout=layout, eps=eps, temperature=0.2, alpha=0.7, A_0=0.1)
    hand = losses_by_hand(z0, z1, bank, **settings)
    loss, stats = mk.macl_loss(z0, z1, negatives=bank, reduction="none", backend=backend, return_stats=True, **settings)
    assert_rel_close(loss, torch.tensor(hand.losses, dtype=torch.float64), 1e-12, f"{backend} per-anchor losses")
    if eps == 0.0:
        assert (loss >= 1).all(), "eps = 0: each loss is -log P / (1 - P) >= 1"
    assert stats.alignment.item() == pytest.approx(hand.alignment, rel=1e-12)
    assert stats.temperature.item() == pytest.approx(hand.temperature, rel=1e-12)
    assert stats.positive_prob.item() == pytest.approx(sum(hand.positive_probs) / len(hand.positive_probs), rel=1e-12)


def test_two_pairs_every_layout(backend):
    for layout in LAYOUTS:
        z0, z1, bank = views(2, 4, torch.float64, seed=5, layout=layout)
        assert_matches_reference(backend, z0, z1, bank, layout=layout, reduction="none")


def test_statistics_match_reference(backend):
    z0, z1, _ = views(21, 8, torch.float64, seed=6)
    _, stats = mk.macl_loss(z0, z1, backend=backend, return_stats=True)
    _, ref = mk.macl_loss(z0, z1, backend="reference", return_stats=True)
    got, expected = stats_dict(stats), stats_dict(ref)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, layout):
    # alpha = 0 and reweight = False: no detached factor, so finite differences apply.
    z0, z1, bank = views(4, 3, torch.float64, seed=7, layout=layout)
    z0.requires_grad_(True)
    z1.requires_grad_(True)

    def f(a, b):
        return mk.macl_loss(a, b, negatives=bank, layout=layout, alpha=0.0, reweight=False, backend=backend)

    assert torch.autograd.gradcheck(f, (z0, z1))


@pytest.mark.parametrize("with_candidates", [True, False])
def test_negative_lse_op_gradcheck(backend, with_candidates):
    """The backend contract's op on its own, with exclusion tables that no layout makes."""
    impl = resolve(backend, torch.device(DEVICE))
    g = torch.Generator().manual_seed(10)
    unit = lambda rows: F.normalize(torch.randn(rows, 3, generator=g, dtype=torch.float64), dim=1).to(DEVICE)  # noqa: E731
    x = unit(6).requires_grad_(True)
    tau = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    if with_candidates:  # six anchors, five candidates; the last row excludes only its second slot
        y = unit(5).requires_grad_(True)
        excluded = torch.cat([layout_exclusions("cross", 5, DEVICE), torch.tensor([[-1, 2]], device=DEVICE)])
        assert torch.autograd.gradcheck(lambda a, b: impl.negative_lse(a, b, excluded.int(), tau), (x, y))
    else:
        excluded = layout_exclusions("ntxent", 3, DEVICE)
        assert torch.autograd.gradcheck(lambda a: impl.negative_lse(a, None, excluded, tau), (x,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_candidates", [True, False])
def test_negative_lse_op_rows_without_negatives(backend, with_candidates, dtype):
    """An anchor whose every candidate is excluded: lse = -inf and no gradient, never NaN (MATH.md section 8).

    The loss never asks the op for such a row (a batch of one pair is handled around it), but
    the op's contract holds for any exclusion table: finite input never yields NaN.
    """
    impl = resolve(backend, torch.device(DEVICE))
    g = torch.Generator().manual_seed(11)
    unit = lambda rows: F.normalize(torch.randn(rows, 3, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    if with_candidates:  # rows 0 and 1 exclude both candidates; rows 2 and 3 keep one and two
        x64, y64 = unit(4), unit(2)
        excluded = torch.tensor([[0, 1], [1, 0], [0, -1], [-1, -1]], dtype=torch.int32)
    else:  # two anchors that are each other's positive: no negatives at all (the table stays symmetric)
        x64, y64 = unit(2), None
        excluded = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    empty = torch.tensor([True, True, False, False][: x64.shape[0]])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(0.3, dtype=acc, device=DEVICE)
    h = torch.randn(x64.shape[0], generator=g, dtype=torch.float64)  # nonzero on the empty rows too
    leaves = [t.to(device=DEVICE, dtype=dtype).requires_grad_(True) for t in (x64, y64) if t is not None]
    lse = impl.negative_lse(leaves[0], leaves[1] if with_candidates else None, excluded.to(DEVICE), tau)
    grads = torch.autograd.grad(lse, leaves, h.to(device=DEVICE, dtype=lse.dtype))
    lse, grads = lse.cpu(), [grad.cpu() for grad in grads]
    assert (lse[empty] == float("-inf")).all(), f"{backend}: lse of the rows without negatives {lse[empty].tolist()}"
    assert all(torch.isfinite(grad).all() for grad in grads), f"{backend}: non-finite gradient"
    assert (grads[0][empty] == 0).all(), f"{backend}: gradient of the rows without negatives"
    if with_candidates:  # the other rows as the dense float64 op computes them, without the empty rows
        x, y = (t.to(dtype).double().requires_grad_(True) for t in (x64, y64))
        columns = torch.arange(2)
        hidden = (columns == excluded[~empty, :1]) | (columns == excluded[~empty, 1:])
        dense = (x[~empty] @ y.T / 0.3).masked_fill(hidden, float("-inf")).logsumexp(dim=1)
        expected = torch.autograd.grad(dense, (x, y), h[~empty])
        assert_rel_close(lse[~empty], dense.detach(), TOLERANCE[dtype], f"{backend} lse")
        for name, got, want in zip(("dx", "dy"), grads, expected):
            assert_rel_close(got, want, TOLERANCE[dtype], f"{backend} {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(backend, layout):
    z0, z1, bank = views(67, 20, seed=8, layout=layout)
    first = loss_and_grads(z0, z1, bank, backend=backend, layout=layout)
    second = loss_and_grads(z0, z1, bank, backend=backend, layout=layout)
    assert bitwise_equal([first[0], *first[1]], [second[0], *second[1]])


def test_module_form_equals_function(backend):
    z0, z1, _ = views(9, 5, seed=9)
    criterion = mk.MACLLoss(temperature=0.2, alpha=0.3, backend=backend)
    assert torch.equal(criterion(z0, z1), mk.macl_loss(z0, z1, temperature=0.2, alpha=0.3, backend=backend))
    assert torch.equal(mk.NTXentLoss(backend=backend)(z0, z1), mk.nt_xent_loss(z0, z1, backend=backend))
