"""gather_distributed=True under higher-order autograd and torch.func, in a gloo group of two processes.

The gather and its backward are each other's adjoint (macl_kernels.distributed), so
a gradient penalty differentiated on every rank must give each rank its slice of the
single-process result, under the same convention as the first gradient: the ranks'
penalties are summed. Backends that are once differentiable raise on every rank.
"""

import functools
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import macl_kernels as mk
from macl_kernels._autograd import HIGHER_ORDER_ERROR
from macl_kernels.backends import resolve
from macl_kernels.testing import TOLERANCE, assert_rel_close, fused_backends, make_views

WORLD_SIZE = 2
PAIRS_PER_RANK = 3
OPTIONS = dict(layout="cross", alpha=0.5, reweight=True)


def global_batch():
    return make_views(WORLD_SIZE * PAIRS_PER_RANK, 4, torch.float64, seed=21)[:2]


def penalty_and_its_gradient(z0, z1, **kwargs):
    """Loss, input gradients (create_graph), and the gradients of their squared norm (or the error it raised)."""
    leaves = tuple(z.detach().clone().requires_grad_(True) for z in (z0, z1))
    loss = mk.macl_loss(*leaves, **OPTIONS, **kwargs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    try:
        second = torch.autograd.grad(sum((g * g).sum() for g in first), leaves)
    except RuntimeError as error:
        return [g.detach() for g in first], str(error)
    return [g.detach() for g in first], list(second)


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        z0, z1 = (z[rank * PAIRS_PER_RANK : (rank + 1) * PAIRS_PER_RANK] for z in global_batch())
        results = {}
        for backend in [*fused_backends("cpu"), "reference"]:
            first, second = penalty_and_its_gradient(z0, z1, backend=backend, gather_distributed=True)
            loss = functools.partial(mk.macl_loss, **OPTIONS, backend=backend, gather_distributed=True)
            func_grad = torch.func.grad(loss, argnums=(0, 1))(z0, z1)
            results[backend] = dict(first=first, second=second, func_grad=list(func_grad))
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("higher_order")
    mp.spawn(_rank_main, args=(str(work_dir / "init"), str(work_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(work_dir / f"{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", [*fused_backends("cpu"), "reference"])
def test_gradient_penalty_across_ranks(ranks, backend):
    z0, z1 = global_batch()
    first, second = penalty_and_its_gradient(z0, z1, backend="reference")
    tol = TOLERANCE[torch.float64]
    twice = backend == "reference" or resolve(backend, torch.device("cpu")).twice_differentiable
    for k, result in enumerate(ranks):
        mine = slice(k * PAIRS_PER_RANK, (k + 1) * PAIRS_PER_RANK)
        # The ranks' mean losses sum to WORLD_SIZE x the global mean: gradients scale by WORLD_SIZE,
        # the sum of the ranks' penalties by WORLD_SIZE ** 2.
        mine_result = result[backend]
        for name, got, via_func, full in zip(("dz0", "dz1"), mine_result["first"], mine_result["func_grad"], first):
            assert_rel_close(got, WORLD_SIZE * full[mine], tol, f"rank {k} {name}")
            assert torch.equal(via_func, got), f"rank {k} torch.func.grad {name}"
        if not twice:
            assert re.fullmatch(re.escape(HIGHER_ORDER_ERROR), mine_result["second"]), mine_result["second"]
            continue
        for name, got, full in zip(("dz0", "dz1"), mine_result["second"], second):
            assert_rel_close(got, WORLD_SIZE**2 * full[mine], tol, f"rank {k} second-order {name}")
