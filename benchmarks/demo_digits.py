"""SimCLR-style training on scikit-learn's bundled ``digits`` (8x8 images, no download).

Two augmented views of each image (random shifts and pixel noise) go through a small
MLP encoder and a projection head; the loss pulls the views together. The learned
representation is judged by k-NN accuracy on held-out digits, clean and perturbed.

MACL and NT-Xent are trained from the same seeds (same initialization, batches and
augmentations), so their final accuracies are compared seed by seed: the mean of the
paired differences and its 95% interval, and whether that interval excludes 0.
Part 1 of ``make demo``; on its own (writes digits.txt, digits.json, training.png):

    python -m benchmarks.demo_digits [--out DIR] [--seeds 10] [--epochs 60] [--backend auto]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import macl_kernels as mk

SIDE = 8  # digits are 8x8


def load_digits_split(
    test_size: int = 500, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images (n, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return images[train], labels[train], images[test], labels[test]


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1, noise: float = 0.1) -> torch.Tensor:
    """A random translation of up to ``max_shift`` pixels (zero fill) plus Gaussian pixel noise."""
    b = images.shape[0]
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    offsets = torch.arange(SIDE)
    rows = (dy[:, None] + offsets)[:, :, None]
    cols = (dx[:, None] + offsets)[:, None, :]
    shifted = padded[torch.arange(b)[:, None, None], rows, cols]
    return shifted + noise * torch.randn(shifted.shape, generator=generator)


class Encoder(nn.Module):
    """MLP backbone (the representation) and projection head (what the loss sees), as in SimCLR."""

    def __init__(self, hidden: int = 256, features: int = 128, projection: int = 64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(SIDE * SIDE, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, projection))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 5
) -> float:
    """Accuracy of a cosine-similarity k-NN classifier (majority vote) on flat features."""
    bank, queries = F.normalize(train_x.flatten(1), dim=1), F.normalize(test_x.flatten(1), dim=1)
    neighbours = (queries @ bank.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[neighbours], num_classes=int(train_y.max()) + 1).sum(dim=1)
    return (votes.argmax(dim=1) == test_y).float().mean().item()


LossFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, mk.MACLStats]]


def losses(backend: str = "auto") -> Dict[str, LossFn]:
    """MACL (lightly's defaults) and NT-Xent at the same base temperature, with their statistics."""
    return {
        "MACL": functools.partial(mk.macl_loss, backend=backend, return_stats=True),
        "NT-Xent": functools.partial(mk.nt_xent_loss, temperature=0.1, backend=backend, return_stats=True),
    }


@dataclass
class History:
    """Per-epoch means over the steps; k-NN accuracies after each epoch (index 0: before training)."""

    loss: List[float] = field(default_factory=list)
    alignment: List[float] = field(default_factory=list)
    temperature: List[float] = field(default_factory=list)
    knn_clean: List[float] = field(default_factory=list)  # held-out digits as they are
    knn_perturbed: List[float] = field(default_factory=list)  # held-out digits shifted and noised once


def evaluate(backbone: nn.Module, data: Tuple[torch.Tensor, ...], history: History) -> None:
    """k-NN of the held-out digits (clean, and perturbed like the training views) against the training set."""
    train_x, train_y, test_x, test_y, perturbed_x = data
    with torch.no_grad():
        bank = backbone(train_x)
        history.knn_clean.append(knn_accuracy(bank, train_y, backbone(test_x), test_y))
        history.knn_perturbed.append(knn_accuracy(bank, train_y, backbone(perturbed_x), test_y))


def evaluation_data(seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels, perturbed test images)."""
    train_x, train_y, test_x, test_y = load_digits_split(seed=seed)
    perturbed = augment(test_x, torch.Generator().manual_seed(seed + 1))
    return train_x, train_y, test_x, test_y, perturbed


def train(
    loss_fn: LossFn,
    data: Tuple[torch.Tensor, ...],
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
) -> History:
    """Train a fresh encoder with ``loss_fn`` on ``evaluation_data()``.

    The seed fixes the initialization, the batches and the augmentations, so two
    losses trained with the same seed see exactly the same data.
    """
    with single_thread():
        return _train(loss_fn, data, epochs, batch_size, lr, seed)


@contextlib.contextmanager
def single_thread():
    """Tiny matrices: one thread is faster than two that wait on each other (and on other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(loss_fn: LossFn, data: Tuple[torch.Tensor, ...], epochs: int, batch_size: int, lr: float, seed: int):
    train_x = data[0]
    torch.manual_seed(seed)
    model = Encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    evaluate(model.backbone, data, history)
    for _ in range(epochs):
        totals = torch.zeros(3)
        batches = torch.randperm(len(train_x), generator=generator).split(batch_size)
        batches = [b for b in batches if len(b) == batch_size]  # equal batches: one tau per step means the same
        for batch in batches:
            images = train_x[batch]
            loss, stats = loss_fn(model(augment(images, generator)), model(augment(images, generator)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals += torch.stack([loss.detach(), stats.alignment, stats.temperature])
        loss_mean, alignment, temperature = (totals / len(batches)).tolist()
        history.loss.append(loss_mean)
        history.alignment.append(alignment)
        history.temperature.append(temperature)
        evaluate(model.backbone, data, history)
    return history


# ---- MACL against NT-Xent, seed by seed -------------------------------------------------------


@dataclass
class PairedDifference:
    """Mean over seeds of a[seed] - b[seed], with its 95% interval (Student's t, seeds - 1 degrees of freedom)."""

    mean: float
    low: float  # NaN with a single seed
    high: float
    seeds: int

    @property
    def significant(self) -> bool:
        return self.seeds >= 2 and (self.low > 0 or self.high < 0)

    def describe(self) -> str:
        if self.seeds < 2:
            return f"{self.mean:+.3f} (one seed: no interval, nothing can be concluded)"
        verdict = (
            "significant (the interval excludes 0)"
            if self.significant
            else "NOT significant: the interval includes 0, these seeds cannot tell the two losses apart"
        )
        return f"{self.mean:+.3f}, 95% interval [{self.low:+.3f}, {self.high:+.3f}] over {self.seeds} seeds: {verdict}"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(mean, math.nan, math.nan, len(diffs))
    from scipy.stats import t  # scipy comes with scikit-learn, which provides the data

    half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs))


def mean_curves(histories: List[History]) -> Dict[str, List[float]]:
    fields = ("loss", "alignment", "temperature", "knn_clean", "knn_perturbed")
    return {f: [statistics.fmean(v) for v in zip(*(getattr(h, f) for h in histories))] for f in fields}


def learning_part(epochs: int, seeds: int, backend: str, log) -> Dict[str, Dict[str, List[float]]]:
    """Both losses over ``seeds`` seeds: their mean curves, and each seed's final k-NN accuracies (``*_by_seed``)."""
    data = evaluation_data()
    train_x, train_y, test_x, test_y, perturbed = data
    log(f"digits: {len(train_x)} training and {len(test_x)} held-out images (8x8); {epochs} epochs, {seeds} seeds")
    log(f"  k-NN on raw pixels: {knn_accuracy(train_x, train_y, test_x, test_y):.3f} clean, "
        f"{knn_accuracy(train_x, train_y, perturbed, test_y):.3f} perturbed")  # fmt: skip
    curves = {}
    for name, loss_fn in losses(backend).items():
        start = time.perf_counter()
        histories = [train(loss_fn, data, epochs=epochs, seed=s) for s in range(seeds)]
        curves[name] = c = mean_curves(histories)
        for what in ("knn_clean", "knn_perturbed"):
            c[f"{what}_by_seed"] = [getattr(h, what)[-1] for h in histories]
        seconds = time.perf_counter() - start
        log(f"  {name:8s} loss {c['loss'][0]:.3f} -> {c['loss'][-1]:.3f}; A {c['alignment'][0]:.3f} -> "
            f"{c['alignment'][-1]:.3f}; tau {c['temperature'][0]:.4f} -> {c['temperature'][-1]:.4f}; "
            f"mean k-NN clean {c['knn_clean'][0]:.3f} -> {c['knn_clean'][-1]:.3f}, perturbed "
            f"{c['knn_perturbed'][0]:.3f} -> {c['knn_perturbed'][-1]:.3f} [{seconds:.0f} s]")  # fmt: skip
    log(f"  MACL - NT-Xent, k-NN accuracy after {epochs} epochs, paired by seed (same initialization, batches, "
        "augmentations):")  # fmt: skip
    for what in ("knn_clean", "knn_perturbed"):
        difference = paired_difference(curves["MACL"][f"{what}_by_seed"], curves["NT-Xent"][f"{what}_by_seed"])
        curves["MACL"][f"{what}_minus_ntxent"] = asdict(difference)
        log(f"    {what.removeprefix('knn_'):9s} {difference.describe()}")
    return curves


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import machine
    from .demo import plot_training  # demo imports this module: import it when running

    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "demo"))
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--backend", default="auto")
    given = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(given)
    os.makedirs(args.out, exist_ok=True)
    lines: List[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.perf_counter()
    host = machine.describe("cpu")
    log(f"python -m benchmarks.demo_digits {' '.join(given)}; {host['date']}; {host['host']}; torch {host['torch']}")
    curves = learning_part(args.epochs, args.seeds, args.backend, log)
    plot_training(curves, os.path.join(args.out, "training.png"))
    elapsed = time.perf_counter() - started
    log(f"finished in {elapsed:.0f} s of wall-clock time; outputs in {args.out}")
    with open(os.path.join(args.out, "digits.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "digits.json"), "w") as f:
        json.dump({"machine": host, "args": vars(args), "elapsed_s": round(elapsed, 1), "curves": curves}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
