"""The three-way verdicts of tutorials 09 and 10: "within noise" must stay "within noise"."""

import numpy as np
import pytest

from loralab.models.verdicts import AGREES, DISAGREES, WITHIN_NOISE, above, lower, negate


def test_lower_calls_a_clear_gap_either_way():
    assert lower([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]) == AGREES
    assert lower([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]) == DISAGREES


def test_lower_keeps_a_gap_inside_the_noise_within_noise():
    # tutorial 09's case: 2.438 +- 0.022 against 2.454 +- 0.006 (three seeds each) is not a verdict
    a = 2.438 + 0.022 * np.array([-1.0, 0.0, 1.0])
    b = 2.454 + 0.006 * np.array([-1.0, 0.0, 1.0])
    assert lower(a, b) == WITHIN_NOISE
    assert lower(b, a) == WITHIN_NOISE
    assert negate(lower(a, b)) == WITHIN_NOISE  # "a is not lower than b" is not confirmed either


def test_lower_boundary_is_k_standard_errors():
    a = np.array([0.0, 1.0, 2.0])  # standard error 1 / sqrt(3)
    b0 = np.array([0.0, 0.0, 0.0])
    noise = 2 / np.sqrt(3)
    assert lower(a, b0 + a.mean() + 0.99 * noise) == WITHIN_NOISE
    assert lower(a, b0 + a.mean() + 1.01 * noise) == AGREES
    assert lower(a, b0 + a.mean() + 1.01 * noise, k=3) == WITHIN_NOISE


def test_paired_removes_what_the_seeds_share():
    a, b = [1.0, 1.5, 0.5], [1.1, 1.6, 0.6]  # b - a = 0.1 for every seed
    assert lower(a, b) == WITHIN_NOISE
    assert lower(a, b, paired=True) == AGREES
    assert lower([1.0, 1.5, 0.5], [1.2, 1.4, 0.6], paired=True) == WITHIN_NOISE


def test_above():
    assert above([0.9, 0.8, 0.85], 0.5) == AGREES
    assert above([0.1, 0.2, 0.15], 0.5) == DISAGREES
    assert above([0.3, 0.9, 0.6], 0.5) == WITHIN_NOISE


def test_negate():
    assert [negate(v) for v in (AGREES, WITHIN_NOISE, DISAGREES)] == [
        DISAGREES,
        WITHIN_NOISE,
        AGREES,
    ]
    with pytest.raises(ValueError, match="negate: verdict must be one of"):
        negate("agree")


@pytest.mark.parametrize(
    "call",
    [
        lambda: lower([1.0], [1.0, 2.0]),
        lambda: lower([1.0, 2.0], [1.0, float("nan")]),
        lambda: lower([[1.0, 2.0]], [1.0, 2.0]),
        lambda: lower([1.0, 2.0], [1.0, 2.0, 3.0], paired=True),
        lambda: above([0.5], 0.1),
    ],
)
def test_refuses_what_is_not_one_value_per_seed(call):
    with pytest.raises(ValueError, match="expected at least 2|one value per seed"):
        call()
