"""The comparison helpers of macl_kernels.testing: what they catch and what their tolerances are made of."""

import pytest
import torch

from macl_kernels.testing import (
    TOLERANCE,
    assert_rel_close,
    losses_by_hand,
    make_views,
    reference_float64,
    reference_in_dtype,
    relative_error,
    row_errors,
    tolerance,
)


def test_a_wrong_small_row_is_seen_next_to_huge_rows():
    # The "zero rows" edge case: a zero input row has a gradient of ~1e13 (1 / the 1e-12 clamp of
    # the norm). One norm over the whole tensor would not see every other small row zeroed.
    ref = torch.randn(10, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref[[0, 3]] *= 1e13
    out = ref.clone()
    out[[1, 4, 6, 8]] = 0.0
    assert (out - ref).norm() / ref.norm() < 1e-12
    assert relative_error(out, ref) == pytest.approx(1.0)
    assert row_errors(out, ref).gt(0.5).sum().item() == 4
    with pytest.raises(AssertionError, match="in 4 of 10 rows"):
        assert_rel_close(out, ref, 1e-10, "dz0")


def test_rows_near_zero_are_measured_against_the_floor():
    ref = torch.tensor([[1.0, 0.0], [2.0, 1.0], [1e-9, 0.0]], dtype=torch.float64)
    out = ref + torch.tensor([[0.0, 0.0], [0.0, 0.0], [1e-9, 0.0]], dtype=torch.float64)
    # Row 2 is off by 100% of itself, but by 1e-9 / (1e-3 * the median row, 1) against the floor.
    assert relative_error(out, ref) == pytest.approx(1e-6)
    assert relative_error(out, ref, floor=1e-2) == pytest.approx(1e-7)  # an absolute floor above it


def test_vectors_are_compared_element_by_element_and_nan_never_passes():
    ref = torch.tensor([1.0, 0.01, 3.0])
    assert relative_error(torch.tensor([1.0, 0.02, 3.0]), ref) == pytest.approx(1.0)
    assert relative_error(torch.tensor([1.0, float("nan"), 3.0]), ref) == float("inf")
    assert relative_error(torch.tensor(float("inf")), torch.tensor(2.0)) == float("inf")
    assert relative_error(torch.tensor(2.5), torch.tensor(2.0)) == pytest.approx(0.25)


@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)], ids=str)
@pytest.mark.parametrize("layout", ["ntxent", "queue"])
def test_the_dense_run_in_half_precision_rounds_like_its_dtype(dtype, unit_roundoff, layout):
    # Its gradients come back rounded to the dtype, as the kernels' do: each row is off the float64
    # truth by about the dtype's unit roundoff, which sets the tolerance of assert_matches_reference.
    z0, z1, bank = make_views(33, 40, dtype, seed=2, bank_rows=11)
    bank = bank if layout == "queue" else None
    truth = reference_float64(z0, z1, bank, layout=layout)
    rounded = reference_in_dtype(z0, z1, bank, layout=layout)
    assert all(g.dtype == dtype for g in rounded[1])
    for got, expected in zip(rounded[1], truth[1]):
        error = relative_error(got, expected)
        assert unit_roundoff / 4 < error < 2 * unit_roundoff
        assert tolerance(dtype, error) < TOLERANCE[dtype]


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_losses_by_hand_of_one_pair_have_no_negatives(eps):
    """MATH.md section 8: a batch of one pair (cross layout) has no negatives: loss 0 and P = 1, also with eps = 0."""
    z = torch.eye(2, dtype=torch.float64)
    hand = losses_by_hand(z[:1], z[1:], eps=eps, layout="cross")
    assert hand.losses == [0.0] and hand.positive_probs == [1.0]
