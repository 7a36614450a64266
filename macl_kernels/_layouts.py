"""Each layout of MATH.md sections 1 and 8, described once.

The fused path (:mod:`macl_kernels._fused`), the distributed path and the tests
read this table, so a new layout is one entry here. The dense reference does not:
it builds its matrices from MATH.md on its own, which is what makes it an oracle.

A layout is a sequence of *directions*; each direction is one call of a backend's
op (:mod:`macl_kernels.backends.base`) over the in-batch candidates, plus one over
the extra negatives ``negatives=`` when the direction takes them:

- ``anchors``: the views (``U0``, ``U1``) whose rows are the anchors, in order; the
  per-anchor losses of a layout are those of its directions' anchors in order.
- ``candidates``: the views whose rows are the in-batch candidates (every rank's
  rows when gathered across ranks).
- ``extra_negatives``: whether ``negatives=`` extend these anchors' candidates.

The positive of anchor row i of either view is row i of the other view, a row-wise
dot computed outside the op. So the op excludes, per anchor, the anchor itself and
its positive wherever the candidates contain them; everything else is a negative.
When the anchors are the candidates (``symmetric``) a single-process call passes
``y=None`` and the backend may compute each symmetric tile once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

U0, U1 = 0, 1  # the two views, by index
NO_COLUMN = -1  # an unused slot of an exclusion table


@dataclass(frozen=True)
class Direction:
    """One op call's worth of anchors and their candidates (see the module docstring)."""

    anchors: Tuple[int, ...]
    candidates: Tuple[int, ...]
    extra_negatives: bool

    @property
    def symmetric(self) -> bool:
        """The anchors are the candidates: in one process the op gets ``y=None``."""
        return self.anchors == self.candidates

    def excluded_views(self, anchor_view: int) -> Tuple[int, ...]:
        """The candidate views holding an anchor of ``anchor_view`` itself, then its positive."""
        return tuple(v for v in (anchor_view, 1 - anchor_view) if v in self.candidates)

    def in_batch_negatives(self, rows: int) -> int:
        """Negatives per anchor among the in-batch candidates when each view has ``rows`` rows."""
        return len(self.candidates) * rows - len(self.excluded_views(self.anchors[0]))


@dataclass(frozen=True)
class Layout:
    """One ``layout=`` of MATH.md section 1, as the directions the fused path runs."""

    name: str
    directions: Tuple[Direction, ...]
    needs_negatives: bool = False  # negatives= is required (queue: the bank is the only negatives)
    gathers_negatives: bool = True  # across ranks: per-rank negatives, gathered like z1 (else one shared bank)

    def gathers(self, negatives_shared: bool) -> bool:
        """Whether a multi-process call gathers the extra negatives: per-rank rows are gathered
        like z1, unless the layout reads one shared bank or the caller's rows are already the
        same on every rank (``negatives_shared``: a memory bank that gathers)."""
        return self.gathers_negatives and not negatives_shared

    @property
    def anchor_views(self) -> Tuple[int, ...]:
        """The views of every anchor block, in the order of the per-anchor losses."""
        return tuple(view for direction in self.directions for view in direction.anchors)

    @property
    def candidate_views(self) -> Tuple[int, ...]:
        """Every view some direction reads as candidates (what gets gathered across ranks)."""
        return tuple(sorted({view for direction in self.directions for view in direction.candidates}))


LAYOUTS: Dict[str, Layout] = {
    # SimCLR / lightly: X = [u0; u1] against [X; Q].
    "ntxent": Layout("ntxent", (Direction((U0, U1), (U0, U1), extra_negatives=True),)),
    # One direction: u0 against [u1; Q].
    "cross": Layout("cross", (Direction((U0,), (U1,), extra_negatives=True),)),
    # CLIP: u0 against [u1; Q], then u1 against u0.
    "cross_sym": Layout(
        "cross_sym", (Direction((U0,), (U1,), extra_negatives=True), Direction((U1,), (U0,), extra_negatives=False))
    ),
    # MoCo: u0 against the bank Q only (its positive u1[r] is the row-wise dot); one bank shared by the ranks.
    "queue": Layout(
        "queue", (Direction((U0,), (), extra_negatives=True),), needs_negatives=True, gathers_negatives=False
    ),
}


def exclusion_table(
    direction: Direction, n: int, device: torch.device, *, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """The (M, 2) int32 excluded columns of a direction's in-batch call (see backends.base).

    ``n`` pairs on this rank, in a global batch of ``world_size * n`` pairs whose
    candidates are the direction's views of all ranks, each in rank order; this
    rank's rows start at ``rank * n``.
    """
    rows = torch.arange(n, device=device) + rank * n
    total = world_size * n
    blocks = []
    for view in direction.anchors:
        columns = [direction.candidates.index(v) * total + rows for v in direction.excluded_views(view)]
        columns += [torch.full_like(rows, NO_COLUMN)] * (2 - len(columns))
        blocks.append(torch.stack(columns, dim=1))
    return torch.cat(blocks).to(torch.int32)


def no_exclusions(anchors: int, device: torch.device) -> torch.Tensor:
    """The exclusion table of a call whose candidates are all negatives (the extra negatives)."""
    return torch.full((anchors, 2), NO_COLUMN, dtype=torch.int32, device=device)


def layout_exclusions(layout: str, n: int, device: torch.device, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The exclusion table of the first direction of ``layout`` (what tests of the op build on)."""
    return exclusion_table(LAYOUTS[layout].directions[0], n, device, rank=rank, world_size=world_size)


def own_anchor_rows(layout: str, n: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """Indices of this rank's anchors in the anchor order of the global batch."""
    rows = torch.arange(n, device=device) + rank * n
    views = LAYOUTS[layout].anchor_views
    return torch.cat([rows + block * world_size * n for block in range(len(views))])
