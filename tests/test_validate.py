"""loralab._validate: one validator per rule; TypeError for a wrong type, ValueError for a value."""

import re

import numpy as np
import pytest

from loralab._validate import (
    boolean,
    fraction,
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
    positive_number,
    probability,
)


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


def test_non_negative_int():
    assert (
        non_negative_int("seed", 0, "X") == 0
        and type(non_negative_int("n", np.int8(3), "X")) is int
    )
    for bad in (True, 2.0, "4", None):
        with pytest.raises(TypeError, match=r"^X: n must be an integer >= 0, got"):
            non_negative_int("n", bad, "X")
    with pytest.raises(ValueError, match=r"^X: n must be an integer >= 0, got -1$"):
        non_negative_int("n", -1, "X")


def test_positive_number():
    assert positive_number("alpha", 16, "X") == 16 and positive_number("lr", np.float32(0.5), "X")
    for bad in (True, "1e-3", None, [1.0]):
        with pytest.raises(TypeError, match=r"^X: lr must be a positive number, got lr="):
            positive_number("lr", bad, "X")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^X: lr must be a positive number, got lr="):
            positive_number("lr", bad, "X")


def test_non_negative_number():
    assert non_negative_number("temperature", 0, "X") == 0.0
    assert type(non_negative_number("temperature", np.float32(0.5), "X")) is float
    for bad in (True, "0", None):
        with pytest.raises(TypeError, match=r"^X: t must be a finite number >= 0, got t="):
            non_negative_number("t", bad, "X")
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^X: t must be a finite number >= 0, got t="):
            non_negative_number("t", bad, "X")


def test_fraction():
    assert fraction("test_fraction", 0.25, "X") == 0.25
    for bad in (False, "0.5", None):
        with pytest.raises(TypeError, match=r"^X: f must be a number in \(0, 1\), got f="):
            fraction("f", bad, "X")
    for bad in (0, 1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^X: f must be a number in \(0, 1\), got f="):
            fraction("f", bad, "X")


def test_one_of():
    assert one_of("optimizer", "adam", ("adam", "sgd"), "X") == "adam"
    assert one_of("fault", None, (None, "raise"), "X") is None
    assert one_of("dtype", "fp16", {"fp16": 2, "fp32": 4}, "X") == "fp16"  # a dict: its keys
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape("X: optimizer must be one of ['adam', 'sgd'], got optimizer='lion'")
        + "$",
    ):
        one_of("optimizer", "lion", ("adam", "sgd"), "X")
    for bad in (3, None, ["adam"], b"adam"):  # not a str at all (a list is not even hashable)
        with pytest.raises(TypeError, match=r"^X: optimizer must be one of \['adam', 'sgd'\], got"):
            one_of("optimizer", bad, ("adam", "sgd"), "X")
