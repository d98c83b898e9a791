"""Tests for loralab.datasets: the shipped digits, their shifted copies and the seeded split."""

import numpy as np
import pytest

from loralab.datasets import SHIFTS, Dataset, load_digits, shift_digits, train_test_split


def small(n=10):
    rng = np.random.default_rng(0)
    return Dataset(rng.uniform(size=(n, 64)).astype(np.float32), rng.integers(0, 10, n))


def test_shifts_move_pixels_as_named():
    data = small()
    images = data.x.reshape(-1, 8, 8)
    np.testing.assert_array_equal(shift_digits(data, "none").x, data.x)
    np.testing.assert_array_equal(
        shift_digits(data, "rotate90").x.reshape(-1, 8, 8), np.rot90(images, 1, axes=(1, 2))
    )
    np.testing.assert_array_equal(
        shift_digits(data, "mirror").x.reshape(-1, 8, 8), images[..., ::-1]
    )
    np.testing.assert_allclose(shift_digits(data, "invert").x, 1.0 - data.x)
    for shift in SHIFTS:
        out = shift_digits(data, shift)
        assert out.x.dtype == data.x.dtype and out.y is not data.y
        np.testing.assert_array_equal(out.y, data.y)


def test_split_is_seeded_and_partitions_the_rows():
    data = Dataset(np.arange(20.0)[:, None], np.arange(20))
    train, test = train_test_split(data, 0.25, seed=1)
    assert len(test) == 5 and len(train) == 15
    assert sorted(np.concatenate([train.y, test.y]).tolist()) == list(range(20))
    again, _ = train_test_split(data, 0.25, seed=1)
    np.testing.assert_array_equal(again.y, train.y)


def test_load_digits_shape_and_range():
    data = load_digits()
    assert data.x.shape == (1797, 64) and data.y.shape == (1797,)
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0 and set(data.y.tolist()) == set(range(10))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: shift_digits(small(), "flip"),
            ValueError,
            "shift must be one of .*got shift='flip'",
        ),
        (lambda: shift_digits(small(), 90), TypeError, "shift must be one of .*got shift=90"),
        (lambda: train_test_split(small(), 0.0), ValueError, "test_fraction must be a number in"),
        (lambda: train_test_split(small(), 1.5), ValueError, "test_fraction must be a number in"),
        (lambda: train_test_split(small(), "0.25"), TypeError, "test_fraction must be a number in"),
    ],
)
def test_bad_arguments_name_what_is_wrong(call, error, match):
    """A wrong type is a TypeError, a wrong value a ValueError; the message names both."""
    with pytest.raises(error, match=match):
        call()
