"""gather_distributed=True: ranks of a gloo group together give the single-process loss of their batch.

For every layout, schedule, reweighting and CPU backend, processes spawned on this
CPU must reproduce the single-process run over the concatenated batch: the mean of
the ranks' losses is its loss and each rank's input gradients are world_size x the
matching slices of its gradients (the convention of macl_kernels.distributed). One
group per world size runs every case (python_tests/distributed_worker.py).
"""

import itertools

import pytest
import torch
import torch.distributed as dist

import macl_kernels as mk
from macl_kernels import distributed
from macl_kernels._config import MACLConfig
from macl_kernels._fused import fused_macl_loss
from macl_kernels.backends import resolve
from macl_kernels.testing import (
    LAYOUTS,
    TOLERANCE_FLOOR,
    assert_rel_close,
    fused_backends,
    loss_and_grads,
    make_views,
)
from python_tests.distributed_worker import PAIRS_PER_RANK, global_batch, loss_options, own_rows, spawn_group

WORLD_SIZES = (2, 3)


def _case(backend, layout, schedule="linear", reweight=True, dtype=torch.float64, reduction="mean", **extra):
    case = dict(backend=backend, layout=layout, schedule=schedule, reweight=reweight, dtype=dtype)
    case.update(reduction=reduction, api="function", stats=False, seed=len(layout) + 7 * reweight)
    case.update(extra)
    return case


# Backends that run in an interpreter on this CPU (Triton): every setting once in
# float32 and a float64 sample, so that the file stays within its time budget.
INTERPRETED = ("triton",)


def _cases():
    cases = []
    for backend in [*fused_backends("cpu"), "reference"]:
        dtypes = (torch.float64, torch.float32)
        for layout, schedule, reweight, dtype in itertools.product(LAYOUTS, ("linear", "exp"), (True, False), dtypes):
            if backend in INTERPRETED and dtype == torch.float64 and (schedule, reweight) != ("linear", True):
                continue
            cases.append(_case(backend, layout, schedule, reweight, dtype))
        for layout, reduction in itertools.product(LAYOUTS, ("sum", "none")):
            if backend in INTERPRETED and layout != "ntxent":
                continue
            cases.append(_case(backend, layout, reduction=reduction))
        cases.append(_case(backend, "ntxent", stats=True))
        cases.append(_case(backend, "queue", stats=True, schedule="exp"))
    cases.append(_case("auto", "cross_sym", api="module", stats=True))
    cases.append(_case("auto", "ntxent", api="ntxent", reweight=False))
    cases += [_case("auto", layout, api="bank") for layout in LAYOUTS]  # MACLLoss(memory_bank=..., gather...)
    cases += _learnable_temperature_and_negatives_cases()
    return cases


def _learnable_temperature_and_negatives_cases():
    """A tensor temperature and extra negatives that require grad, every backend and layout (issue 12)."""
    return [
        _case(backend, layout, learn_tau=True, negatives="grad")
        for backend in [*fused_backends("cpu"), "reference"]
        for layout in LAYOUTS
    ]


CASES = _cases()


def _case_id(case):
    parts = [case["backend"], case["layout"], case["schedule"], "V" if case["reweight"] else "noV"]
    parts += [str(case["dtype"]).removeprefix("torch."), case["reduction"], case["api"]]
    parts += ["tensorT"] if case.get("learn_tau") else []
    parts += ["negatives"] if case.get("negatives") else []
    return "-".join(parts + (["stats"] if case["stats"] else []))


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group(request, tmp_path_factory):
    world_size = request.param
    return world_size, spawn_group(world_size, CASES, str(tmp_path_factory.mktemp(f"world{world_size}")))


def _single_process(case, world_size):
    z0, z1, bank = global_batch(case, world_size)
    options = loss_options(case)
    if case["api"] == "ntxent":
        options.update(alpha=0.0, reweight=False, temperature=0.5)  # NTXentLoss: lightly's default T
    loss, grads = loss_and_grads(z0, z1, bank, **options)
    stats = mk.macl_loss(z0, z1, negatives=bank, return_stats=True, **options)[1] if case["stats"] else None
    return loss, grads, stats


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_ranks_reproduce_the_single_process_loss(group, index):
    world_size, ranks = group
    case = CASES[index]
    # The same computation split across ranks: only the order of the sums differs, so the dtype's floor.
    tol = TOLERANCE_FLOOR[case["dtype"]]
    loss, grads, stats = _single_process(case, world_size)
    results = [r["results"][index] for r in ranks]

    losses = torch.stack([r["loss"] for r in results])
    if case["reduction"] == "mean":
        assert_rel_close(losses.mean(), loss, tol, "mean of the ranks' losses")
    elif case["reduction"] == "sum":
        assert_rel_close(losses.sum(), loss, tol, "sum of the ranks' losses")
    else:
        expected = torch.stack(
            [loss[own_rows(case["layout"], PAIRS_PER_RANK, k, world_size)] for k in range(world_size)]
        )
        assert_rel_close(losses, expected, tol, "per-anchor losses of each rank")

    scale = world_size if case["reduction"] == "mean" else 1
    for k, result in enumerate(results):
        mine = slice(k * PAIRS_PER_RANK, (k + 1) * PAIRS_PER_RANK)
        for name, got, full in zip(("dz0", "dz1"), result["grads"], grads):
            assert got.dtype == case["dtype"]
            assert_rel_close(got, scale * full[mine], tol, f"rank {k} {name}")
        if case["stats"]:  # the statistics are those of the global batch, on every rank
            for key, value in result["stats"].items():
                assert value == pytest.approx(float(getattr(stats, key)), rel=tol), key


def test_inputs_that_differ_across_ranks_fail_on_every_rank(group):
    world_size, ranks = group
    for problem in ("rows", "width", "dtype"):
        for k, rank in enumerate(ranks):
            message = rank["mismatches"][problem]
            assert message is not None, f"rank {k} accepted differing {problem}"
            assert "same shape and dtype" in message and f"rank {world_size - 1}:" in message
    assert all(rank["after"] > 0 for rank in ranks), "the group works after the errors"


def test_a_layout_that_differs_across_ranks_fails_on_every_rank(group):
    world_size, ranks = group
    for k, rank in enumerate(ranks):
        message = rank["mismatches"]["layout"]
        assert message is not None, f"rank {k} accepted a layout that differs across ranks"
        assert "same layout" in message and "layout='ntxent'" in message and "layout='cross_sym'" in message
        assert f"rank {world_size - 1}:" in message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_a_process_group_nothing_changes(layout):
    assert not dist.is_initialized()
    _expect_single_process_bits(layout)


def _expect_single_process_bits(layout):
    z0, z1, bank = make_views(5, 4, seed=3, bank_rows=6)
    bank = bank if layout == "queue" else None
    plain = loss_and_grads(z0, z1, bank, layout=layout)
    gathered = loss_and_grads(z0, z1, bank, layout=layout, gather_distributed=True)
    assert torch.equal(plain[0], gathered[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], gathered[1]))


def check_one_rank_group(device, process_group_backend, tmp_path):
    """World size 1: the public path is the single-process one, bit for bit, and the
    across-ranks path (collectives with one rank) agrees with it up to float32's floor."""
    dist.init_process_group(process_group_backend, init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for layout in LAYOUTS:
            _expect_single_process_bits(layout)
        for backend, layout in itertools.product(fused_backends(device), LAYOUTS):
            z0, z1, bank = make_views(6, 8, seed=4, device=device, bank_rows=5)
            bank = bank if layout == "queue" else None
            cfg = MACLConfig(layout=layout, gather_distributed=True)
            loss, grads = loss_and_grads(z0, z1, bank, layout=layout, backend=backend)
            a, b = (z.detach().clone().requires_grad_(True) for z in (z0, z1))
            distributed.check_same_problem(a, layout)
            across, _ = fused_macl_loss(a, b, bank, cfg, resolve(backend, a.device), across_ranks=True)
            across.backward()
            assert_rel_close(across, loss, TOLERANCE_FLOOR[torch.float32], f"{backend} {layout} loss")
            for name, got, expected in zip(("dz0", "dz1"), (a.grad, b.grad), grads):
                assert_rel_close(got, expected, TOLERANCE_FLOOR[torch.float32], f"{backend} {layout} {name}")
    finally:
        dist.destroy_process_group()


def test_one_rank_group_is_the_single_process_loss(tmp_path):
    check_one_rank_group("cpu", "gloo", tmp_path)


@pytest.mark.gpu
def test_one_rank_nccl_group_on_the_gpu(tmp_path):
    torch.cuda.set_device(0)
    check_one_rank_group("cuda", "nccl", tmp_path)


def test_gather_distributed_must_be_a_bool():
    with pytest.raises(TypeError, match="gather_distributed must be a bool"):
        mk.macl_loss(torch.randn(4, 3), torch.randn(4, 3), gather_distributed=1)
    with pytest.raises(TypeError, match="gather_distributed must be a bool"):
        mk.MACLLoss(gather_distributed="yes")


def test_ranks_give_the_temperature_and_the_negatives_their_gradients(group):
    """T is not gathered: the mean over ranks of T's gradient (DDP's average) is the global mean's. Extra
    negatives are gathered like z1 (each rank gets world_size x its slice); the queue's shared bank gets
    on each rank the gradient of that rank's loss, so their mean is the global mean's gradient."""
    world_size, ranks = group
    checked = 0
    for index, case in enumerate(CASES):
        if not case.get("learn_tau"):
            continue
        z0, z1, negatives = global_batch(case, world_size)
        temperature = torch.tensor(0.1, dtype=case["dtype"], requires_grad=True)
        q = negatives.clone().requires_grad_(True)
        options = {**loss_options(case), "backend": "reference"}  # the float64 oracle
        loss = mk.macl_loss(z0, z1, negatives=q, temperature=temperature, **options)
        loss.backward()
        results = [r["results"][index] for r in ranks]
        tol, name = TOLERANCE_FLOOR[case["dtype"]], _case_id(case)
        mean_tau_grad = torch.stack([r["temperature_grad"] for r in results]).mean()
        assert_rel_close(mean_tau_grad, temperature.grad, tol, f"{name}: mean over ranks of dT")
        got = [r["negatives_grad"] for r in results]
        if case["layout"] == "queue":
            assert_rel_close(torch.stack(got).mean(0), q.grad, tol, f"{name}: mean over ranks of dQ")
        else:
            assert_rel_close(torch.cat(got), world_size * q.grad, tol, f"{name}: each rank's dQ")
        checked += 1
    assert checked == len(LAYOUTS) * (len(fused_backends("cpu")) + 1)
