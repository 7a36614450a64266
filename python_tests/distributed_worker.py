"""The spawned side of test_distributed.py: one process group runs every case and saves what it saw.

Starting a process costs seconds here (importing torch), so a group is spawned once
per world size and runs the whole list of cases; the test process then compares each
rank's results with the single-process loss of the concatenated batch.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import macl_kernels as mk
from macl_kernels.testing import make_views, upstream_for

PAIRS_PER_RANK = 3
DIM = 5
BANK_ROWS = 7
NEGATIVES_PER_RANK = 2  # extra negatives (case["negatives"]): per rank, gathered like z1 (queue: one shared bank)


def global_batch(case: Dict, world_size: int):
    """The concatenated batch (z0, z1, bank or extra negatives of all ranks) of a case, the same in every process."""
    rows = world_size * NEGATIVES_PER_RANK if case.get("negatives") else BANK_ROWS
    z0, z1, bank = make_views(world_size * PAIRS_PER_RANK, DIM, case["dtype"], seed=case["seed"], bank_rows=rows)
    shared_bank = case["layout"] == "queue" or case["api"] == "bank"
    return z0, z1, (bank if shared_bank or case.get("negatives") else None)


def own_negatives(case: Dict, negatives, rank: int):
    """What a rank passes as negatives=: the queue's (or a gathering memory bank's) shared bank, or its own slice
    of the extra negatives."""
    if negatives is None or case["layout"] == "queue" or case["api"] == "bank":
        return negatives
    return negatives[rank * NEGATIVES_PER_RANK : (rank + 1) * NEGATIVES_PER_RANK]


def own_rows(layout: str, n: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of the single-process per-anchor loss that belong to this rank's anchors."""
    rows = torch.arange(rank * n, (rank + 1) * n)
    if layout in ("ntxent", "cross_sym"):  # all z0 anchors first, then all z1 anchors
        return torch.cat([rows, rows + world_size * n])
    return rows


def loss_options(case: Dict) -> Dict:
    options = dict(layout=case["layout"], reduction=case["reduction"], backend=case["backend"])
    if case["api"] == "ntxent":  # nt_xent_loss / NTXentLoss fix alpha and reweight
        return options
    alpha = 2.0 if case["schedule"] == "exp" else 0.5
    return dict(options, schedule=case["schedule"], alpha=alpha, reweight=case["reweight"])


def upstream(case: Dict, loss: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """This rank's share of the fixed upstream gradient the single-process run uses."""
    if loss.dim() == 0:
        return torch.ones_like(loss)
    per_anchor = 2 if case["layout"] in ("ntxent", "cross_sym") else 1
    whole = upstream_for(loss.new_zeros(per_anchor * world_size * PAIRS_PER_RANK))
    return whole[own_rows(case["layout"], PAIRS_PER_RANK, rank, world_size)]


def run_case(case: Dict, rank: int, world_size: int) -> Dict:
    z0, z1, bank = global_batch(case, world_size)
    mine = slice(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
    a = z0[mine].clone().requires_grad_(True)
    b = z1[mine].clone().requires_grad_(True)
    options = loss_options(case)
    bank = own_negatives(case, bank, rank)
    if case.get("negatives") == "grad":
        bank = bank.clone().requires_grad_(True)
    temperature = torch.tensor(0.1, dtype=case["dtype"], requires_grad=True) if case.get("learn_tau") else None
    if temperature is not None:
        options["temperature"] = temperature
    stats = None
    if case["api"] == "module":
        criterion = mk.MACLLoss(gather_distributed=True, return_stats=case["stats"], **options)
        out = criterion(a, b, bank)
    elif case["api"] == "bank":  # a MemoryBank that gathers: the same rows on every rank, never gathered again
        criterion = mk.MACLLoss(memory_bank=tuple(bank.shape), gather_distributed=True, **options).to(case["dtype"])
        criterion.memory_bank.bank.copy_(bank)
        out = criterion(a, b)
    elif case["api"] == "ntxent":
        out = mk.NTXentLoss(gather_distributed=True, return_stats=case["stats"], **options)(a, b, bank)
    else:
        out = mk.macl_loss(a, b, negatives=bank, gather_distributed=True, return_stats=case["stats"], **options)
    loss, stats = out if case["stats"] else (out, None)
    (loss * upstream(case, loss, world_size, rank)).sum().backward()
    return dict(
        loss=loss.detach(),
        grads=[a.grad, b.grad],
        temperature_grad=None if temperature is None else temperature.grad,
        negatives_grad=bank.grad if case.get("negatives") == "grad" else None,
        stats=None if stats is None else {k: float(v) for k, v in stats._asdict().items()},
    )


def mismatch_messages(rank: int) -> Dict[str, Optional[str]]:
    """Each rank's error for inputs that disagree across ranks (None: no error)."""
    problems = {
        "rows": (torch.randn(2 + rank, 4), torch.float32),
        "width": (torch.randn(4, 3 + rank), torch.float32),
        "dtype": (torch.randn(4, 3), torch.float64 if rank == 0 else torch.float32),
    }
    messages = {}
    for name, (z, dtype) in problems.items():
        messages[name] = _error_of(z.to(dtype), "ntxent")
    # ntxent and cross_sym run the same collectives: without the check a silently wrong loss, not a hang.
    messages["layout"] = _error_of(torch.randn(4, 3), "ntxent" if rank == 0 else "cross_sym")
    return messages


def _error_of(z: torch.Tensor, layout: str) -> Optional[str]:
    try:
        mk.macl_loss(z, z, layout=layout, gather_distributed=True)
    except ValueError as error:
        return str(error)
    return None


def _group_main(rank: int, world_size: int, init_file: str, out_dir: str, cases: List[Dict]) -> None:
    torch.set_num_threads(1)  # the ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = [run_case(case, rank, world_size) for case in cases]
        mismatches = mismatch_messages(rank)
        # After the errors the group must still work: one more collective call.
        z0, z1, _ = make_views(2, 4, seed=rank)
        after = mk.macl_loss(z0, z1, gather_distributed=True).item()
        torch.save(dict(results=results, mismatches=mismatches, after=after), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_group(world_size: int, cases: List[Dict], work_dir: str) -> List[Dict]:
    """Run ``cases`` in a fresh gloo group of ``world_size`` processes; one result dict per rank."""
    init_file = os.path.join(work_dir, "init")
    mp.spawn(_group_main, args=(world_size, init_file, work_dir, cases), nprocs=world_size, join=True)
    return [torch.load(os.path.join(work_dir, f"{rank}.pt")) for rank in range(world_size)]
