"""The training demo (``make demo``): ``python -m benchmarks.demo [--out DIR]``.

1. Learning on real data: SimCLR-style training on scikit-learn's digits with MACL
   and with NT-Xent at the same settings (same seeds, data and augmentations);
   per-epoch loss, alignment A, temperature tau and k-NN accuracy on held-out digits.
2. Large batch: full training steps at batch sizes doubling up to 32768 under a
   memory budget, the dense loss against the fused one, each size in a fresh process.
3. Gradient caching: the same with a convolutional encoder and the fused loss, up to
   65536 pairs under a smaller budget, without and with :class:`macl_kernels.GradCache`.

Writes summary.txt (dated, with the machine), demo.json, training.png, large_batch.png
and grad_cache.png under benchmarks/out/demo/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from . import demo_digits, demo_grad_cache, demo_large_batch, machine  # noqa: E402
from .isolate import run_isolated  # noqa: E402
from .report import format_mib, format_seconds  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "demo")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seeds", type=int, default=10, help="training runs per loss, compared seed by seed")
    p.add_argument("--min-batch", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=32768)
    p.add_argument("--budget-gib", type=float, default=4.0, help="memory budget of one large-batch training process")
    p.add_argument("--step-timeout-s", type=float, default=600.0, help="time cap of one large-batch process")
    p.add_argument("--cache-min-batch", type=int, default=2048)
    p.add_argument("--cache-max-batch", type=int, default=65536)
    p.add_argument("--cache-chunk", type=int, default=4096, help="GradCache's chunk size (pairs)")
    p.add_argument("--cache-budget-gib", type=float, default=0.5, help="memory budget of one gradient-caching process")
    p.add_argument("--backend", default="auto", help="the fused backend of every part (default: auto)")
    return p.parse_args(argv)


# ---- part 1: learning on digits -------------------------------------------------------------


def learning_part(epochs: int, seeds: int, backend: str, log) -> Dict[str, Dict[str, List[float]]]:
    return demo_digits.learning_part(epochs, seeds, backend, log)


def plot_training(curves: Dict[str, Dict[str, List[float]]], path: str) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [
        ("temperature", "tau (adaptive for MACL)"),
        ("alignment", "alignment A (mean positive cosine)"),
        ("loss", "training loss"),
        ("knn_perturbed", "k-NN accuracy, held-out perturbed digits"),
    ]
    for ax, (field, title) in zip(axes, panels):
        for name, c in curves.items():
            values = c[field]
            start = 0 if field.startswith("knn") else 1  # k-NN has an entry before training
            ax.plot(range(start, start + len(values)), values, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- parts 2 and 3: training steps at growing batch sizes under a memory budget ------------------


@dataclass
class Variant:
    """One line of a sweep: a way to train, run at each batch size in a fresh, memory-capped process."""

    key: str  # its entry in each result row
    label: str  # its name in the table and the plot
    payload: Dict  # demo_large_batch's arguments besides batch, budget_gib and steps
    skip: Callable[[int], Optional[str]] = lambda batch: None  # why not to run at this batch, if anything
    legend: str = ""  # its name in the plot (default: label)


STEPS_SMALL, STEPS_LARGE, LARGE_FROM = 2, 1, 8192  # the largest steps take a minute on a 2-core CPU


def steps_for(batch: int) -> int:
    return STEPS_LARGE if batch >= LARGE_FROM else STEPS_SMALL


STEPS_NOTE = (
    f"  time/step: median of {STEPS_SMALL} steps below batch {LARGE_FROM}, "
    f"{STEPS_LARGE} step from {LARGE_FROM} on (marked *)"
)


def sweep(variants: List[Variant], batches: List[int], budget_gib: float, timeout_s: float, log) -> List[Dict]:
    """Each variant at each batch size; after a failure (OOM, timeout) a variant is skipped at larger ones."""
    widths = [max(17, len(v.label) + 11) for v in variants]
    log(
        f"  {'batch':>6} | "
        + " | ".join(f"{v.label + ': time/step':>{w}} {'peak':>10}" for v, w in zip(variants, widths))
    )
    log(STEPS_NOTE)
    failed_at: Dict[str, int] = {}
    results: List[Dict] = []
    for batch in batches:
        row: Dict = {"batch": batch}
        for v in variants:
            reason = v.skip(batch)
            if v.key in failed_at:
                row[v.key] = {"status": "skipped", "note": f"over budget at batch {failed_at[v.key]} already"}
            elif reason:
                row[v.key] = {"status": "skipped", "note": reason}
            else:
                payload = json.dumps({**v.payload, "batch": batch, "budget_gib": budget_gib, "steps": steps_for(batch)})
                outcome = run_isolated("benchmarks.demo_large_batch", [payload], timeout_s=timeout_s)
                row[v.key] = {"status": outcome.status, "note": outcome.note, "steps": steps_for(batch),
                              **outcome.result}  # fmt: skip
                if outcome.status != "ok":
                    failed_at[v.key] = batch
        results.append(row)
        log(f"  {batch:>6} | " + " | ".join(_cells(row[v.key], w) for v, w in zip(variants, widths)))
    return results


def _cells(r: Dict, width: int) -> str:
    if r["status"] != "ok":
        return f"{r['status']:>{width}} {'':>10}"
    single = "*" if r.get("steps") == 1 else ""  # one step: no median, no spread
    return f"{format_seconds(r['step_s']) + single:>{width}} {format_mib(r['peak_bytes'] / 2**20):>10}"


def largest_batches(results: List[Dict], variants: List[Variant]) -> Dict[str, Optional[int]]:
    """Per variant, the largest batch whose step ran within the budget (None: none did)."""
    return {v.key: max((r["batch"] for r in results if r[v.key]["status"] == "ok"), default=None) for v in variants}


def plot_sweep(results: List[Dict], variants: List[Variant], budget_gib: float, path: str) -> None:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, v in enumerate(variants):
        color, marker = f"C{i}", "os^D"[i % 4] + "-"
        ok = [(r["batch"], r[v.key]) for r in results if r[v.key]["status"] == "ok"]
        name, sizes = v.legend or v.label, [b for b, _ in ok]
        ax_t.plot(sizes, [m["step_s"] for _, m in ok], marker, color=color, label=name)
        ax_m.plot(sizes, [max(m["peak_bytes"], 1) / 2**20 for _, m in ok], marker, color=color, label=name)
        failed = [r for r in results if r[v.key]["status"] not in ("ok", "skipped")]
        if failed:  # where the variant hit the budget
            batch, status = failed[0]["batch"], failed[0][v.key]["status"]
            ax_m.plot([batch], [budget_gib * 1024], "x", color=color, markersize=12, markeredgewidth=2)
            ax_m.annotate(f"{name}: {status}", (batch, budget_gib * 1024), textcoords="offset points",
                          xytext=(0, 8), ha="right", color=color, fontsize=8)  # fmt: skip
    ax_m.axhline(budget_gib * 1024, color="red", linestyle="--", label=f"budget {budget_gib:g} GiB")
    batches = [r["batch"] for r in results]
    for ax, label in ((ax_t, "time per training step (s)"), (ax_m, "peak memory above baseline (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def doublings(low: int, high: int) -> List[int]:
    return [low * 2**k for k in range(64) if low * 2**k <= high]


def large_batch_part(args: argparse.Namespace, log) -> Tuple[List[Dict], List[Variant]]:
    """Part 2: the fused loss against lightly's dense one, MLP encoder."""

    def dense_matrix_too_big(batch: int) -> Optional[str]:
        matrix_gib = (2 * batch) ** 2 * 4 / 2**30  # the dense loss's M x M float32 similarities, at least
        return f"its {matrix_gib:.0f} GiB matrix alone is over budget" if matrix_gib > args.budget_gib else None

    fused_name, dense_name = demo_large_batch.fused_name(args.backend), demo_large_batch.dense_name()
    variants = [
        Variant("fused", "fused", {"loss": "fused", "backend": args.backend}, legend=fused_name),
        Variant("dense", "dense", {"loss": "dense"}, dense_matrix_too_big, legend=dense_name),
    ]
    log(f"large batch: full training steps (augment, encoder, loss, backward, Adam), "
        f"memory budget {args.budget_gib:g} GiB per process")  # fmt: skip
    log(f"  fused: {fused_name}; dense: {dense_name}")
    results = sweep(variants, doublings(args.min_batch, args.max_batch), args.budget_gib, args.step_timeout_s, log)
    return results, variants


def grad_cache_part(args: argparse.Namespace, log) -> Tuple[List[Dict], List[Variant]]:
    """Part 3: a convolutional encoder, the fused loss, with and without GradCache."""
    fused = {"loss": "fused", "backend": args.backend, "encoder": "conv"}
    variants = [
        Variant("uncached", "uncached", fused),
        Variant("cached", f"GradCache, chunk {args.cache_chunk}", {**fused, "chunk": args.cache_chunk}),
    ]
    log(f"gradient caching: full training steps of a convolutional encoder "
        f"({demo_grad_cache.parameter_count()} parameters) with {demo_large_batch.fused_name(args.backend)}, "
        f"memory budget {args.cache_budget_gib:g} GiB per process")  # fmt: skip
    batches = doublings(args.cache_min_batch, args.cache_max_batch)
    results = sweep(variants, batches, args.cache_budget_gib, args.step_timeout_s, log)
    largest = largest_batches(results, variants)
    log("  largest batch within the budget: " + ", ".join(f"{v.label} {largest[v.key]}" for v in variants))
    return results, variants


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    lines: List[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    host = machine.describe("cpu")
    log(
        f"make demo, {host['date']}: {host['host']}; torch {host['torch']}, {host['torch_threads']} threads; "
        f"load average {host['load_average']} at the start"
    )
    curves = learning_part(args.epochs, args.seeds, args.backend, log)
    plot_training(curves, os.path.join(args.out, "training.png"))
    large_batch, variants = large_batch_part(args, log)
    plot_sweep(large_batch, variants, args.budget_gib, os.path.join(args.out, "large_batch.png"))
    grad_cache, variants = grad_cache_part(args, log)
    plot_sweep(grad_cache, variants, args.cache_budget_gib, os.path.join(args.out, "grad_cache.png"))
    log(
        f"demo finished in {time.perf_counter() - started:.0f} s, load average {machine.load_average()} at the end; "
        f"outputs in {args.out}"
    )
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(
            {"machine": host, "curves": curves, "large_batch": large_batch, "grad_cache": grad_cache}, f, indent=1
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
