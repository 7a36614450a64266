"""The spawned side of test_grad_cache.py: a DDP group of gloo ranks, and a peak-memory probe.

``run_ddp_group`` runs cached training steps with DDP-wrapped encoders in a fresh gloo
group and saves each rank's gradients and all-reduce counts; the test compares them
with the single-process gradient of the concatenated batch. ``python -m
python_tests.grad_cache_worker memory`` prints the peak resident memory of one
training step per configuration, each measured from its own start in this process.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import macl_kernels as mk

# ---- DDP ----------------------------------------------------------------------------------------

PAIRS_PER_RANK = 7
CHUNK = 3  # does not divide PAIRS_PER_RANK: chunks of 3, 3, 1
IN_FEATURES, EMBEDDING = 6, 5

DDP_CASES = [
    dict(name="shared encoder, gather_distributed", towers=1, gather=True),
    dict(name="two towers, per-rank loss", towers=2, gather=False),
]


def make_towers(towers: int) -> List[nn.Module]:
    """The same fp64 encoders in every process: one shared tower, or two different ones."""
    torch.manual_seed(11)
    first = nn.Sequential(nn.Linear(IN_FEATURES, 12), nn.Tanh(), nn.Linear(12, EMBEDDING))
    second = nn.Sequential(nn.Linear(IN_FEATURES, 9), nn.GELU(), nn.Linear(9, EMBEDDING))
    return [m.double() for m in ([first] if towers == 1 else [first, second])]


def global_inputs(world_size: int):
    g = torch.Generator().manual_seed(5)
    shape = (world_size * PAIRS_PER_RANK, IN_FEATURES)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def loss_fn(case: Dict):
    return functools.partial(mk.macl_loss, gather_distributed=case["gather"], layout="cross_sym")


def _counting_allreduce(counter: List[int], bucket):
    """DDP's default all-reduce (over the default group), counted: the hook's state is the counter."""
    counter[0] += 1
    return allreduce_hook(None, bucket)


def _ddp_step(case: Dict, rank: int, world_size: int, cached: bool) -> Dict:
    modules = [DistributedDataParallel(m) for m in make_towers(case["towers"])]
    calls = [0]
    for m in modules:
        m.register_comm_hook(calls, _counting_allreduce)
    x0, x1 = global_inputs(world_size)
    mine = slice(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
    encoder, encoder1 = modules[0], modules[-1]
    if cached:
        loss = mk.GradCache(encoder, loss_fn(case), CHUNK, encoder1=encoder1)(x0[mine], x1[mine])
    else:
        loss = loss_fn(case)(encoder(x0[mine]), encoder1(x1[mine]))
    loss.backward()
    return dict(grads=[p.grad for m in modules for p in m.parameters()], allreduce_calls=calls[0])


def _group_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = [
            dict(cached=_ddp_step(case, rank, world_size, True), uncached=_ddp_step(case, rank, world_size, False))
            for case in DDP_CASES
        ]
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ddp_group(world_size: int, work_dir: str) -> List[List[Dict]]:
    """Per rank, per case of DDP_CASES: the cached and the uncached step's gradients and all-reduce count."""
    init_file = os.path.join(work_dir, "init")
    mp.spawn(_group_main, args=(world_size, init_file, work_dir), nprocs=world_size, join=True)
    return [torch.load(os.path.join(work_dir, f"{rank}.pt")) for rank in range(world_size)]


# ---- peak memory -----------------------------------------------------------------------------

MEMORY_WIDTH = 512  # hidden width: the encoder's activations dominate the step's memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _step_peak_mib(n: int, chunk: int) -> float:
    """Peak RSS above the start of one fp32 training step of n pairs (chunk 0: uncached)."""
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Linear(16, MEMORY_WIDTH), nn.ReLU(), nn.Linear(MEMORY_WIDTH, MEMORY_WIDTH), nn.ReLU(),
        nn.Linear(MEMORY_WIDTH, MEMORY_WIDTH), nn.ReLU(), nn.Linear(MEMORY_WIDTH, 8),
    )  # fmt: skip
    x0, x1 = torch.randn(n, 16), torch.randn(n, 16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    start = _status_kib("VmRSS")
    loss = mk.GradCache(encoder, mk.macl_loss, chunk)(x0, x1) if chunk else mk.macl_loss(encoder(x0), encoder(x1))
    loss.backward()
    return (_status_kib("VmHWM") - start) / 1024


def memory_main(configs: List[List[int]]) -> None:
    torch.set_num_threads(1)
    _step_peak_mib(64, 16)  # warm-up: the first step's one-time allocations are not the step's
    print(json.dumps([_step_peak_mib(n, chunk) for n, chunk in configs]))


if __name__ == "__main__":
    if sys.argv[1] == "memory":
        memory_main(json.loads(sys.argv[2]))
