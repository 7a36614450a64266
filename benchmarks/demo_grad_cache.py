"""The demo's gradient-caching step: a convolutional encoder on digits, uncached against GradCache.

With the fused loss, a batch of N pairs costs the loss O(N*D) memory; what then bounds
the batch is the encoder's activations for 2N images. :class:`ConvEncoder` keeps
about 10 KiB of activations per 8x8 digit for backward, so at 65536 pairs the
uncached step would hold several GiB of them, the cached step one chunk's worth.
Each training step runs in a fresh process under a memory budget
(:mod:`benchmarks.demo_large_batch`).
"""

from __future__ import annotations

from torch import nn

from .demo_digits import SIDE


class ConvEncoder(nn.Module):
    """Two 3x3 convolutions and a max-pool, then an MLP projection head (SimCLR-style)."""

    def __init__(self, channels: int = 8, features: int = 128, projection: int = 64) -> None:
        super().__init__()
        pooled = 2 * channels * (SIDE // 2) ** 2
        self.backbone = nn.Sequential(
            nn.Unflatten(1, (1, SIDE)),  # (b, 8, 8) digits -> (b, 1, 8, 8)
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(pooled, features),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, projection))

    def forward(self, images):
        return self.head(self.backbone(images))


def parameter_count() -> int:
    return sum(p.numel() for p in ConvEncoder().parameters())
