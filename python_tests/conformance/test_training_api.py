"""The training API of MATH.md section 8 for every backend: a learnable temperature, extra negatives in
every layout, one pair, mixed precision; gradients for T and for the negatives against the float64 reference."""

import pytest
import torch

import macl_kernels as mk
from macl_kernels.testing import LAYOUTS, TOLERANCE, assert_rel_close, upstream_for
from python_tests.conformance.conftest import DEVICE, views

# (layout, with extra negatives): queue always has its bank.
LAYOUT_NEGATIVES = [(layout, extra) for layout in LAYOUTS for extra in (False, True) if layout != "queue" or extra]
LAYOUT_IDS = [f"{layout}-{'negatives' if extra else 'in-batch'}" for layout, extra in LAYOUT_NEGATIVES]


def _inputs(n, d, dtype, seed, with_negatives):
    z0, z1, bank = views(n, d, dtype, seed=seed, layout="queue")  # the queue's bank: 11 rows
    return z0, z1, (bank if with_negatives else None)


def _all_grads(backend, z0, z1, negatives, temperature, **kwargs):
    """Loss and the gradients of <loss, upstream> for fresh leaves z0, z1, negatives (None: none) and T."""
    a, b = (z.detach().clone().requires_grad_(True) for z in (z0, z1))
    q = None if negatives is None else negatives.detach().clone().requires_grad_(True)
    t_dtype = torch.float64 if z0.dtype == torch.float64 else torch.float32
    t = torch.tensor(temperature, dtype=t_dtype, device=z0.device, requires_grad=True)
    loss = mk.macl_loss(a, b, negatives=q, temperature=t, backend=backend, **kwargs)
    (loss * upstream_for(loss)).sum().backward()
    return loss.detach(), {"dz0": a.grad, "dz1": b.grad, "dQ": None if q is None else q.grad, "dT": t.grad}


def _assert_all_match_reference(backend, z0, z1, negatives, temperature, tol, **kwargs):
    loss, grads = _all_grads(backend, z0, z1, negatives, temperature, **kwargs)
    bank = None if negatives is None else negatives.double()
    ref_loss, ref_grads = _all_grads("reference", z0.double(), z1.double(), bank, temperature, **kwargs)
    assert_rel_close(loss, ref_loss, tol, f"{backend} loss")
    for name, got in grads.items():
        if ref_grads[name] is not None:
            assert got is not None and (name == "dT" or got.dtype == z0.dtype), (
                f"{name}: missing or not in the input dtype"
            )
            assert_rel_close(got, ref_grads[name], tol, f"{backend} {name}")


@pytest.mark.parametrize("layout, with_negatives", LAYOUT_NEGATIVES, ids=LAYOUT_IDS)
@pytest.mark.parametrize("schedule, alpha", [("linear", 0.5), ("exp", 2.0)])
def test_learnable_temperature_and_negatives_match_reference(backend, layout, with_negatives, schedule, alpha):
    z0, z1, q = _inputs(9, 6, torch.float64, 11, with_negatives)
    kwargs = dict(layout=layout, schedule=schedule, alpha=alpha, reduction="none")
    _assert_all_match_reference(backend, z0, z1, q, 0.15, TOLERANCE[torch.float64], **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_learnable_temperature_and_negatives_in_float32(backend, layout):
    z0, z1, q = _inputs(13, 8, torch.float32, 12, True)
    _assert_all_match_reference(backend, z0, z1, q, 0.1, TOLERANCE[torch.float32], layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_with_learnable_temperature_and_negatives(backend, layout):
    # alpha = 0 and reweight = False: no detached factor, so finite differences apply to T and Q too.
    z0, z1, q = _inputs(3, 3, torch.float64, 13, True)
    leaves = [z0, z1, q[:2], torch.tensor(0.3, dtype=torch.float64, device=DEVICE)]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]

    def f(a, b, negatives, t):
        return mk.macl_loss(
            a, b, negatives=negatives, temperature=t, layout=layout, alpha=0.0, reweight=False, backend=backend
        )

    assert torch.autograd.gradcheck(f, leaves)


def test_temperature_at_its_floor_gets_no_gradient(backend):
    z0, z1, _ = _inputs(6, 4, torch.float64, 14, False)
    loss, grads = _all_grads(backend, z0, z1, None, 1e-5, min_temperature=1e-4)  # tau = T (1 + A/2) < 1e-4
    _, stats = mk.macl_loss(z0, z1, temperature=1e-5, min_temperature=1e-4, backend=backend, return_stats=True)
    assert stats.temperature.item() == 1e-4
    assert torch.isfinite(loss) and grads["dT"].item() == 0.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_negatives_get_a_gradient_only_when_they_require_one(backend, layout):
    z0, z1, q = _inputs(7, 5, torch.float32, 15, True)
    a, b = (z.clone().requires_grad_(True) for z in (z0, z1))
    mk.macl_loss(a, b, negatives=q, layout=layout, backend=backend).backward()
    assert q.grad is None
    _, grads = _all_grads(backend, z0, z1, q, 0.1, layout=layout)  # the same loss with Q requiring grad
    assert torch.equal(a.grad, grads["dz0"]) and torch.equal(b.grad, grads["dz1"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reweight, eps", [(True, 1e-8), (True, 0.0), (False, 1e-8)], ids=["V", "V-eps0", "noV"])
def test_one_pair(backend, layout, reweight, eps):
    """N = 1: without negatives the loss and its gradient are 0, never NaN; with them, as the reference."""
    z0, z1, q = _inputs(1, 4, torch.float64, 16, True)
    kwargs = dict(layout=layout, reweight=reweight, eps=eps, reduction="none")
    if layout != "queue":
        loss, grads = _all_grads(backend, z0, z1, None, 0.1, **kwargs)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values() if g is not None)
    _assert_all_match_reference(backend, z0, z1, q, 0.1, TOLERANCE[torch.float64], **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_precision_computes_in_the_wider_dtype(backend, layout):
    z0, z1, q = _inputs(10, 8, torch.float32, 17, True)
    low = z0.to(torch.bfloat16)
    a, b = low.clone().requires_grad_(True), z1.clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = mk.macl_loss(a, b, negatives=q.half(), layout=layout, backend=backend)
    loss.backward()
    wide_a = low.float().requires_grad_(True)
    wide_b = z1.clone().requires_grad_(True)
    expected = mk.macl_loss(wide_a, wide_b, negatives=q.half().float(), layout=layout, backend=backend)
    expected.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, expected.detach())
    assert a.grad.dtype == torch.bfloat16 and torch.equal(a.grad, wide_a.grad.to(torch.bfloat16))
    assert torch.equal(b.grad, wide_b.grad)


def test_autocast_does_not_lower_the_precision_of_float32(backend):
    z0, z1, _ = _inputs(12, 16, torch.float32, 18, False)
    plain = mk.macl_loss(z0, z1, backend=backend)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under_autocast = mk.macl_loss(z0, z1, backend=backend)
    assert torch.equal(plain, under_autocast)


def test_module_form_keeps_a_learnable_temperature(backend):
    z0, z1, _ = _inputs(8, 5, torch.float32, 19, False)
    criterion = mk.MACLLoss(temperature=torch.nn.Parameter(torch.tensor(0.2)), layout="cross_sym", backend=backend)
    assert [name for name, _ in criterion.named_parameters()] == ["temperature"]
    loss = criterion(z0, z1)
    loss.backward()
    expected, grads = _all_grads(backend, z0, z1, None, 0.2, layout="cross_sym")
    assert torch.equal(loss.detach(), expected) and torch.equal(criterion.temperature.grad, grads["dT"])
    assert torch.equal(mk.MACLLoss(temperature=0.2, layout="cross_sym", backend=backend)(z0, z1), expected)


def test_compiled_step_with_learnable_temperature_and_hard_negatives(backend):
    """torch.compile(fullgraph=True) of a forward with an encoder, a learnable T and hard negatives from the
    same encoder: the same loss and gradients as eager (inductor for torch, aot_eager for compiled ops)."""
    z0, z1, q = _inputs(12, 8, torch.float32, 20, True)
    encoder = torch.nn.Linear(8, 8).to(DEVICE)
    log_scale = torch.nn.Parameter(torch.tensor(2.0, device=DEVICE))

    def forward(a, b, negatives):
        temperature = 1 / log_scale.exp()
        return mk.macl_loss(
            encoder(a), encoder(b), negatives=encoder(negatives), temperature=temperature, layout="cross_sym",
            alpha=0.0, reweight=False, backend=backend,
        )  # fmt: skip

    results = []
    for fn in (
        forward,
        torch.compile(forward, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager"),
    ):
        encoder.zero_grad()
        log_scale.grad = None
        loss = fn(z0, z1, q)
        loss.backward()
        results.append((loss.detach(), encoder.weight.grad.clone(), log_scale.grad.clone()))
    for name, compiled, eager in zip(("loss", "encoder gradient", "log-scale gradient"), results[1], results[0]):
        assert_rel_close(compiled, eager, 1e-5, f"{backend} compiled {name}")
