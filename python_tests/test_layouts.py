"""The table of layouts against MATH.md sections 1 and 8: negatives per anchor, excluded columns, anchor order,
which anchors the extra negatives reach."""

import itertools

import pytest
import torch

from macl_kernels._layouts import LAYOUTS, U0, U1, exclusion_table, own_anchor_rows

# MATH.md section 1, per layout: anchors M and in-batch negatives per anchor, for n pairs.
MATH_TABLE = {
    "ntxent": (lambda n: 2 * n, lambda n: [2 * n - 2] * (2 * n)),
    "cross": (lambda n: n, lambda n: [n - 1] * n),
    "cross_sym": (lambda n: 2 * n, lambda n: [n - 1] * (2 * n)),
    "queue": (lambda n: n, lambda n: [0] * n),
}
# MATH.md section 1, per direction: the in-batch columns that are not negatives of the anchor at global
# row g of view v, in a global batch of t pairs (the anchor itself and its positive, where they are candidates).
EXCLUDED = {
    "ntxent": [lambda v, g, t: {v * t + g, (1 - v) * t + g}],  # X = [u0; u1]: itself and (r + t) mod 2t
    "cross": [lambda v, g, t: {g}],  # u0 against u1: the positive's column
    "cross_sym": [lambda v, g, t: {g}, lambda v, g, t: {g}],
    "queue": [lambda v, g, t: set()],  # the bank only
}
# MATH.md section 8: the views whose anchors the extra negatives reach (queue: its bank, required, one for all ranks).
EXTRA_NEGATIVES_FOR = {"ntxent": (U0, U1), "cross": (U0,), "cross_sym": (U0,), "queue": (U0,)}


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


@pytest.mark.parametrize("layout, n, world_size", list(itertools.product(MATH_TABLE, (1, 3), (1, 3))))
def test_excluded_columns_are_the_anchor_and_its_positive(layout, n, world_size):
    for rank in range(world_size):
        for direction, expected in zip(LAYOUTS[layout].directions, EXCLUDED[layout], strict=True):
            table = exclusion_table(direction, n, torch.device("cpu"), rank=rank, world_size=world_size).tolist()
            anchors = [(view, rank * n + i) for view in direction.anchors for i in range(n)]
            for (view, g), row in zip(anchors, table, strict=True):
                assert {c for c in row if c >= 0} == expected(view, g, world_size * n), (rank, view, g)


def test_extra_negatives_reach_the_anchors_of_math_section_8():
    for name, layout in LAYOUTS.items():
        reached = tuple(view for d in layout.directions if d.extra_negatives for view in d.anchors)
        assert reached == EXTRA_NEGATIVES_FOR[name], name
        assert layout.needs_negatives == (name == "queue") and layout.gathers_negatives == (name != "queue")


def test_negatives_are_gathered_only_when_they_differ_by_rank():
    for name, layout in LAYOUTS.items():
        assert layout.gathers(negatives_shared=False) == (name != "queue"), name
        assert not layout.gathers(negatives_shared=True), name
