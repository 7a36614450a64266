"""SimCLR-style training on scikit-learn's bundled ``digits`` (8x8 images, no download).

Two augmented views of each image (random shifts and pixel noise) go through a small
MLP encoder and a projection head; the loss pulls the views together. The learned
representation is judged by k-NN accuracy on held-out digits.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

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
