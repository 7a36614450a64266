"""The README's migration table, checked: lightly's NTXentLoss / MACLLoss test cases against our classes,
OpenCLIP's ClipLoss and sentence-transformers' MultipleNegatives(Symmetric)RankingLoss as tiny dense
reimplementations against the macl_kernels call the table gives for each."""

import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from benchmarks.baselines import load_lightly_macl
from macl_kernels.testing import assert_rel_close, fused_backends, make_views

BACKENDS = ["reference", *fused_backends()]


# --- lightly: the cases of lightly's tests/loss/test_NTXentLoss.py and test_MACLLoss.py ---------------------------


def _ntxent_by_hand(out0, out1, temperature):
    """SimCLR's Algorithm 1 in numpy, as lightly's test computes it (z[k], z[k + N]: two views of sample k)."""
    z = np.concatenate([out0, out1])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / temperature
    n = len(out0)

    def term(i, j):
        return -np.log(np.exp(s[i, j]) / (np.exp(s[i]).sum() - np.exp(s[i, i])))

    return sum(term(k, k + n) + term(k + n, k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("d", [1, 2, 16, 64])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_ntxent_values_and_symmetry(n, d, temperature):
    rng = np.random.default_rng(n * 100 + d)
    out0, out1 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    loss = mk.NTXentLoss(temperature=temperature)
    l1 = float(loss(torch.FloatTensor(out0), torch.FloatTensor(out1)))
    l2 = float(loss(torch.FloatTensor(out1), torch.FloatTensor(out0)))
    assert l1 == pytest.approx(l2, abs=1e-5)
    assert l1 == pytest.approx(_ntxent_by_hand(out0, out1, temperature), abs=1e-5)
    assert l2 == pytest.approx(_ntxent_by_hand(out1, out0, temperature), abs=1e-5)


def _identical_directions(n, seed):
    """lightly's 'correlated embedding': every row is a multiple of (1, 2), so every cosine is 1."""
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.rand(n, 1, generator=g) + 0.1, torch.rand(n, 1, generator=g) + 0.1
    return torch.cat([x0, 2 * x0], dim=1).requires_grad_(True), torch.cat([x1, 2 * x1], dim=1)


@pytest.mark.parametrize("n", [1, 2, 8, 16])
@pytest.mark.parametrize("bank_size", [0, 1, 2, 8, 15, 16, 17])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 7.0])
def test_ntxent_closed_form_for_identical_directions(n, bank_size, temperature):
    out0, out1 = _identical_directions(n, seed=n + bank_size)
    criterion = mk.NTXentLoss(temperature=temperature, memory_bank_size=bank_size)
    if bank_size > 0:
        for _ in range(bank_size // n + 2):  # fill the bank with copies of out1 over several rounds
            loss = criterion(out0, out1).item()
        expected = -math.log(1 / (bank_size + 1))  # the positive and K negatives, all at cosine 1
    else:
        loss = criterion(out0, out1).item()
        expected = -math.log(1 / (2 * n - 1))  # one pair: 0, no negatives
    assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("bank_size", [0, 5, 16])
def test_macl_closed_form_for_identical_directions(n, bank_size):
    """A = 1, so tau = T (1 + alpha (1 - A_0)); P = 1 / (candidates); loss = -V log P with V = 1 / (1 - P + eps)."""
    out0, out1 = _identical_directions(n, seed=3 * n + bank_size)
    layout = "queue" if bank_size else "ntxent"
    criterion = mk.MACLLoss(0.2, 0.5, 0.3, memory_bank=bank_size, layout=layout, return_stats=True)
    for _ in range(bank_size // n + 2 if bank_size else 1):  # fill the bank with copies of out1
        loss, stats = criterion(out0, out1)
    p = 1 / (bank_size + 1) if bank_size else 1 / (2 * n - 1)
    assert stats.temperature.item() == pytest.approx(0.2 * (1 + 0.5 * 0.7), rel=1e-6)
    assert loss.item() == pytest.approx(-math.log(p) / (1 - p + 1e-8), abs=1e-5)


def test_ntxent_symmetry_for_every_batch_size():
    loss = mk.NTXentLoss(memory_bank_size=0)
    g = torch.Generator().manual_seed(0)
    for d in (32, 1):
        for bsz in range(1, 100, 7):
            b1, b2 = torch.randn(bsz, d, generator=g), torch.randn(bsz, d, generator=g)
            assert (loss(b1, b2) - loss(b2, b1)).pow(2).item() == pytest.approx(0.0, abs=1e-7)


def test_ntxent_memory_bank_runs_for_every_batch_size():
    loss = mk.NTXentLoss(memory_bank_size=(64, 32))
    g = torch.Generator().manual_seed(1)
    for bsz in range(1, 100, 7):
        out = loss(torch.randn(bsz, 32, generator=g).requires_grad_(True), torch.randn(bsz, 32, generator=g))
        assert torch.isfinite(out)


def _load_lightly_ntxent(monkeypatch):
    """lightly's NTXentLoss from its installed files, without ``import lightly`` (which needs torchvision).

    Its memory bank and distributed helpers need only torch; ``lightly.models.utils`` (whose
    ``concat_all_gather`` is used only across ranks) is an empty stand-in. Everything put in
    ``sys.modules`` is removed after the test.
    """
    root = os.path.dirname(importlib.util.find_spec("lightly").origin)
    for package in ("lightly", "lightly.utils", "lightly.models", "lightly.models.modules", "lightly.loss"):
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    monkeypatch.setitem(sys.modules, "lightly.models.utils", types.ModuleType("lightly.models.utils"))
    sys.modules["lightly.models"].utils = sys.modules["lightly.models.utils"]
    loaded = None
    for name, path in [
        ("lightly.utils.dist", "utils/dist.py"),
        ("lightly.models.modules.memory_bank", "models/modules/memory_bank.py"),
        ("lightly.loss.ntx_ent_loss", "loss/ntx_ent_loss.py"),
    ]:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, path))
        loaded = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, loaded)
        spec.loader.exec_module(loaded)
        package, _, leaf = name.rpartition(".")
        setattr(sys.modules[package], leaf, loaded)
    return loaded.NTXentLoss


@pytest.mark.parametrize("bank_size", [0, (7, 8)])
def test_ntxent_equals_lightlys_over_training_steps(monkeypatch, bank_size):
    """Step by step with lightly's own NTXentLoss, its memory bank included (the same random start)."""
    LightlyNTXent = _load_lightly_ntxent(monkeypatch)
    torch.manual_seed(5)
    theirs = LightlyNTXent(temperature=0.3, memory_bank_size=bank_size)
    torch.manual_seed(5)
    ours = mk.NTXentLoss(temperature=0.3, memory_bank_size=bank_size)
    g = torch.Generator().manual_seed(6)
    for step in range(5):
        z0, z1 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
        results = []
        for criterion in (theirs, ours):
            a, b = z0.clone().requires_grad_(True), z1.clone().requires_grad_(True)
            loss = criterion(a, b)
            loss.backward()
            results.append((loss.detach(), a.grad, b.grad))
        for name, got, expected in zip(("loss", "dz0", "dz1"), results[1], results[0]):
            assert_rel_close(got, expected, 1e-5, f"step {step} {name}")


def test_bank_is_updated_only_when_the_first_view_requires_grad():
    criterion = mk.NTXentLoss(memory_bank_size=(6, 4))
    start = criterion.memory_bank.bank.clone()
    z0, z1 = torch.randn(4, 4), torch.randn(4, 4)
    criterion(z0, z1)  # evaluation: the bank stays as it is
    assert torch.equal(criterion.memory_bank.bank, start)
    criterion(z0.requires_grad_(True), z1)  # training: z1's unit rows enter the bank, after the loss
    assert (
        torch.allclose(criterion.memory_bank.bank[:4], F.normalize(z1, dim=1))
        and int(criterion.memory_bank.pointer) == 4
    )


def test_settings_assigned_after_construction_are_used_and_checked():
    """lightly's losses read temperature (and MACL's alpha, A_0) at every call: a schedule that sets them works."""
    z0, z1, _ = make_views(6, 5, torch.float64, seed=3)
    for make, attribute, value, fresh in [
        (mk.MACLLoss, "temperature", 0.5, lambda: mk.MACLLoss(temperature=0.5)),
        (mk.MACLLoss, "alpha", 0.0, lambda: mk.MACLLoss(alpha=0.0)),
        (mk.MACLLoss, "A_0", 0.3, lambda: mk.MACLLoss(A_0=0.3)),
        (mk.NTXentLoss, "temperature", 0.2, lambda: mk.NTXentLoss(temperature=0.2)),
    ]:
        criterion = make()
        setattr(criterion, attribute, value)
        assert torch.equal(criterion(z0, z1), fresh()(z0, z1)), attribute
    criterion = mk.MACLLoss()
    criterion.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        criterion(z0, z1)
    with pytest.raises(TypeError, match="alpha"):
        criterion.alpha = "0.5"


def test_ntxent_loss_takes_its_bank_as_memory_bank_size():
    with pytest.raises(TypeError, match="memory_bank_size="):
        mk.NTXentLoss(memory_bank=mk.MemoryBank(4))
    assert isinstance(mk.NTXentLoss(memory_bank_size=mk.MemoryBank(4)).memory_bank, mk.MemoryBank)


def test_macl_one_pair_equals_lightlys():
    a, b = torch.randn(1, 6, requires_grad=True), torch.randn(1, 6)
    expected = load_lightly_macl().MACLLoss()(a, b)
    assert expected.item() == 0.0 and mk.MACLLoss()(a, b).item() == 0.0


# --- OpenCLIP: ClipLoss with a learnable logit scale -------------------------------------------------------------


def _open_clip_loss(image_features, text_features, logit_scale):
    """open_clip.loss.ClipLoss on one process: features normalized by the model, logit_scale = exp(parameter)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(image_features.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_with_a_learnable_scale(backend):
    image, text, _ = make_views(9, 6, torch.float64, seed=7)
    grads = []
    for use_ours in (False, True):
        a, b = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        u0, u1 = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        if use_ours:
            loss = mk.nt_xent_loss(u0, u1, temperature=1 / log_scale.exp(), layout="cross_sym", backend=backend)
        else:
            loss = _open_clip_loss(u0, u1, log_scale.exp())
        loss.backward()
        grads.append((loss.detach(), a.grad, b.grad, log_scale.grad))
    for name, ours, theirs in zip(("loss", "d image", "d text", "d log-scale"), grads[1], grads[0]):
        assert_rel_close(ours, theirs, 1e-10, f"{backend} {name}")


# --- sentence-transformers: MultipleNegativesRankingLoss with hard negatives --------------------------------------


def _mnrl(anchors, positives, hard_negatives, scale, symmetric):
    """MultipleNegatives(Symmetric)RankingLoss: cosine scores * scale against [positives; hard negatives]."""
    a, p, n = (F.normalize(t, dim=-1) for t in (anchors, positives, hard_negatives))
    labels = torch.arange(a.shape[0])
    forward = F.cross_entropy(scale * a @ torch.cat([p, n]).T, labels)
    if not symmetric:
        return forward
    return (forward + F.cross_entropy(scale * p @ a.T, labels)) / 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["MNRL", "symmetric MNRL"])
def test_sentence_transformers_ranking_losses_with_hard_negatives(backend, symmetric):
    anchors, positives, hard = make_views(7, 5, torch.float64, seed=8, bank_rows=7)
    grads = []
    for use_ours in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (anchors, positives, hard)]
        if use_ours:
            layout = "cross_sym" if symmetric else "cross"
            loss = mk.nt_xent_loss(
                *leaves[:2], negatives=leaves[2], temperature=1 / 20.0, layout=layout, backend=backend
            )
        else:
            loss = _mnrl(*leaves, scale=20.0, symmetric=symmetric)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    for name, ours, theirs in zip(("loss", "d anchors", "d positives", "d hard negatives"), grads[1], grads[0]):
        assert_rel_close(ours, theirs, 1e-10, f"{backend} {name}")
