"""Full training steps at one large batch size, in this (fresh) process, under a memory budget.

``python -m benchmarks.demo_large_batch '{"loss": "fused"|"dense", "batch": B, "budget_gib": G, "steps": S,
"backend": "auto", "encoder": "mlp"|"conv", "chunk": C}'`` (``backend``: the fused loss's; ``chunk`` > 0:
the step goes through :class:`macl_kernels.GradCache` with chunks of C pairs; the last three are optional)

A step is what a training loop does: two augmented views of B digits (sampled with
replacement), the encoder forward, the loss, backward and an optimizer step. The
process's address space is capped at its size after set-up plus the budget, so a
step that needs more fails with an allocation error (reported as OOM).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from typing import Callable, Dict

import torch

import macl_kernels as mk

from .baselines import load_lightly_macl, reference_loss
from .demo_digits import Encoder, augment, load_digits_split
from .demo_grad_cache import ConvEncoder
from .isolate import emit
from .memory import PeakMemory, cap_address_space, is_out_of_memory

WARMUP_BATCH = 64
ENCODERS = {"mlp": Encoder, "conv": ConvEncoder}


def dense_loss() -> Callable:
    """What a user would otherwise train with: lightly's MACLLoss (the dense reference if lightly is missing)."""
    try:
        return load_lightly_macl().MACLLoss()
    except ImportError:
        return reference_loss()


def dense_name() -> str:
    try:
        load_lightly_macl()
        return "lightly MACLLoss"
    except ImportError:
        return "dense reference"


def fused_name(backend: str = "auto") -> str:
    return f"macl_kernels backend={backend!r} ({mk.backends.resolve(backend, torch.device('cpu')).name})"


def run(
    loss: str, batch: int, budget_gib: float, steps: int, backend: str = "auto", encoder: str = "mlp", chunk: int = 0
) -> Dict:
    torch.manual_seed(0)
    train_x = load_digits_split()[0]
    model = ENCODERS[encoder]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = functools.partial(mk.macl_loss, backend=backend) if loss == "fused" else dense_loss()
    if chunk:
        embed_and_loss = mk.GradCache(model, loss_fn, chunk)
    else:
        embed_and_loss = lambda v0, v1: loss_fn(model(v0), model(v1))
    generator = torch.Generator().manual_seed(0)
    losses = []

    def step(size: int) -> None:
        images = train_x[torch.randint(0, len(train_x), (size,), generator=generator)]
        value = embed_and_loss(augment(images, generator), augment(images, generator))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())

    cap_address_space(int(budget_gib * 2**30))
    step(WARMUP_BATCH)
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return {"status": "ok", "step_s": statistics.median(times), "peak_bytes": memory.peak(), "loss": losses[-1]}


def main(argv) -> int:
    args = json.loads(argv[0])
    try:
        options = {k: args[k] for k in ("backend", "encoder", "chunk") if k in args}
        emit(run(args["loss"], args["batch"], args["budget_gib"], args["steps"], **options))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        emit({"status": "OOM", "note": (str(exc).strip().splitlines() or [""])[0][:200]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
