"""The training demo (``make demo``): ``python -m benchmarks.demo [--out DIR]``.

1. Learning on real data: SimCLR-style training on scikit-learn's digits with MACL
   and with NT-Xent at the same settings (same seeds, data and augmentations);
   per-epoch loss, alignment A, temperature tau and k-NN accuracy on held-out digits.
2. Large batch: full training steps at batch sizes doubling up to 32768 under a
   memory budget, the dense loss against the fused one, each size in a fresh process.

Writes summary.txt, training.png and large_batch.png under benchmarks/out/demo/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from . import demo_digits, demo_large_batch  # noqa: E402
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
    p.add_argument("--backend", default="auto", help="the fused backend of both parts (default: auto)")
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


# ---- part 2: large batch under a memory budget -------------------------------------------------


def steps_for(batch: int) -> int:
    return 2 if batch <= 4096 else 1  # the largest steps take a minute on a 2-core CPU


def large_batch_part(args: argparse.Namespace, log) -> List[Dict]:
    names = {"fused": demo_large_batch.fused_name(args.backend), "dense": demo_large_batch.dense_name()}
    log(f"large batch: full training steps (augment, encoder, loss, backward, Adam), "
        f"memory budget {args.budget_gib:g} GiB per process")  # fmt: skip
    log(f"  fused: {names['fused']}; dense: {names['dense']}")
    log(f"  {'batch':>6} | {'fused: time/step':>17} {'peak':>10} | {'dense: time/step':>17} {'peak':>10}")
    results: List[Dict] = []
    over_budget = None  # batch at which the dense loss failed
    batch = args.min_batch
    while batch <= args.max_batch:
        row = {"batch": batch}
        for loss in ("fused", "dense"):
            matrix_gib = (2 * batch) ** 2 * 4 / 2**30  # the dense loss's M x M float32 similarities, at least
            if loss == "dense" and over_budget is not None:
                row[loss] = {"status": "skipped", "note": f"over budget at batch {over_budget} already"}
            elif loss == "dense" and matrix_gib > args.budget_gib:
                row[loss] = {"status": "skipped", "note": f"its {matrix_gib:.0f} GiB matrix alone is over budget"}
            else:
                payload = json.dumps({"loss": loss, "batch": batch, "budget_gib": args.budget_gib,
                                      "steps": steps_for(batch), "backend": args.backend})  # fmt: skip
                outcome = run_isolated("benchmarks.demo_large_batch", [payload], timeout_s=args.step_timeout_s)
                row[loss] = {"status": outcome.status, "note": outcome.note, **outcome.result}
            if loss == "dense" and row[loss]["status"] != "ok" and over_budget is None:
                over_budget = batch
        results.append(row)
        log(f"  {batch:>6} | {_cells(row['fused'])} | {_cells(row['dense'])}")
        batch *= 2
    return results


def _cells(r: Dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']:>17} {'':>10}"
    return f"{format_seconds(r['step_s']):>17} {format_mib(r['peak_bytes'] / 2**20):>10}"


def plot_large_batch(results: List[Dict], names: Dict[str, str], budget_gib: float, path: str) -> None:
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.2))
    for loss, marker in (("fused", "o-"), ("dense", "s-")):
        ok = [(r["batch"], r[loss]) for r in results if r[loss]["status"] == "ok"]
        ax_t.plot([b for b, _ in ok], [m["step_s"] for _, m in ok], marker, label=names[loss])
        ax_m.plot([b for b, _ in ok], [max(m["peak_bytes"], 1) / 2**20 for _, m in ok], marker, label=names[loss])
    ax_m.axhline(budget_gib * 1024, color="red", linestyle="--", label=f"budget {budget_gib:g} GiB")
    failed = [r for r in results if r["dense"]["status"] not in ("ok", "skipped")]
    if failed:  # where the dense loss hit the budget
        batch, status = failed[0]["batch"], failed[0]["dense"]["status"]
        ax_m.plot([batch], [budget_gib * 1024], "x", color="C1", markersize=12, markeredgewidth=2)
        ax_m.annotate(f"{names['dense']}: {status}", (batch, budget_gib * 1024), textcoords="offset points",
                      xytext=(0, 8), ha="right", color="C1", fontsize=8)  # fmt: skip
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    lines: List[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    curves = learning_part(args.epochs, args.seeds, args.backend, log)
    plot_training(curves, os.path.join(args.out, "training.png"))
    names = {"fused": demo_large_batch.fused_name(args.backend), "dense": demo_large_batch.dense_name()}
    results = large_batch_part(args, log)
    plot_large_batch(results, names, args.budget_gib, os.path.join(args.out, "large_batch.png"))
    log(f"demo finished in {time.perf_counter() - started:.0f} s; outputs in {args.out}")
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"curves": curves, "large_batch": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
