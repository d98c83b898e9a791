"""loralab._validate: one validator per rule; TypeError for a wrong type, ValueError for a value."""

import re

import numpy as np
import pytest

from loralab._validate import boolean, positive_int, probability


def test_positive_int():
    assert positive_int("r", 8, "LoRALinear") == 8
    assert type(positive_int("r", np.int64(3), "X")) is int
    for bad in (True, 2.0, "4", None, np.float64(2.0)):
        with pytest.raises(
            TypeError, match="^" + re.escape(f"X: r must be a positive integer, got {bad!r}")
        ):
            positive_int("r", bad, "X")
    for bad in (0, -1, np.int32(0)):
        with pytest.raises(
            ValueError, match="^" + re.escape(f"X: r must be a positive integer, got {bad!r}") + "$"
        ):
            positive_int("r", bad, "X")


def test_probability():
    assert probability("p", 0, "Dropout") == 0.0 and probability("p", np.float32(0.5), "D") == 0.5
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match=r"^Dropout: p must be a number in \[0, 1\)"):
            probability("p", bad, "Dropout")
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"^Dropout: expected p in \[0, 1\), got"):
            probability("p", bad, "Dropout")


def test_boolean():
    assert (
        boolean("bias", True, "Linear") is True and boolean("bias", np.bool_(False), "L") is False
    )
    for bad in ("false", 0, 1, None):
        with pytest.raises(TypeError, match=r"^Linear: bias must be True or False, got"):
            boolean("bias", bad, "Linear")
