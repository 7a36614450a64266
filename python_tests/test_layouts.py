"""The table of layouts against MATH.md section 1: negatives per anchor, excluded columns, anchor order."""

import itertools

import pytest
import torch

from macl_kernels._layouts import LAYOUTS, exclusion_table, own_anchor_rows

# MATH.md section 1, per layout: anchors M and in-batch negatives per anchor, for n pairs.
MATH_TABLE = {
    "ntxent": (lambda n: 2 * n, lambda n: [2 * n - 2] * (2 * n)),
    "cross": (lambda n: n, lambda n: [n - 1] * n),
    "cross_sym": (lambda n: 2 * n, lambda n: [n - 1] * (2 * n)),
    "queue": (lambda n: n, lambda n: [0] * n),
}


def test_every_layout_is_in_the_table():
    assert sorted(LAYOUTS) == sorted(MATH_TABLE)


@pytest.mark.parametrize("layout, n, world_size", list(itertools.product(MATH_TABLE, (1, 2, 5), (1, 3))))
def test_negatives_per_anchor_match_math(layout, n, world_size):
    total = world_size * n
    anchors, negatives = MATH_TABLE[layout]  # per anchor, the same for every anchor of a layout
    counted = []
    for rank in range(world_size):
        for direction in LAYOUTS[layout].directions:
            table = exclusion_table(direction, n, torch.device("cpu"), rank=rank, world_size=world_size)
            width = len(direction.candidates) * total
            assert table.dtype == torch.int32 and table.shape == (n * len(direction.anchors), 2)
            assert ((table == -1) | ((table >= 0) & (table < width))).all()
            for row in table.tolist():
                real = [c for c in row if c >= 0]
                assert len(set(real)) == len(real), "a column is excluded once"
                counted.append(width - len(real))
                assert width - len(real) == direction.in_batch_negatives(total)
    assert len(counted) == anchors(total) and counted == negatives(total)


@pytest.mark.parametrize("layout", list(MATH_TABLE))
def test_own_anchor_rows_partition_the_global_anchors(layout):
    n, world_size = 3, 4
    anchors = MATH_TABLE[layout][0](world_size * n)
    rows = torch.cat([own_anchor_rows(layout, n, rank, world_size, torch.device("cpu")) for rank in range(world_size)])
    assert sorted(rows.tolist()) == list(range(anchors))
