"""Validators shared by every layer of loralab: one function per rule, one message per mistake.

A wrong type is a TypeError, a wrong value of the right type a ValueError; both name the caller,
the argument and the value. Integers are ``int`` or NumPy integers, never ``bool`` or a float
such as ``3.0``; numbers are real numbers (ints or floats, NumPy's too), never ``bool``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "positive_int",
    "non_negative_int",
    "positive_number",
    "non_negative_number",
    "fraction",
    "probability",
    "boolean",
    "one_of",
]

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _type_error(where: str, name: str, expected: str, got: str, value: Any) -> TypeError:
    return TypeError(f"{where}: {name} must be {expected}, got {got} ({type(value).__name__})")


def positive_int(name: str, value: Any, where: str) -> int:
    """``value`` as an ``int``, if it is an integer (not a bool, not a float) greater than 0.

    Parameters
    ----------
    name : str
        The argument's name, as the caller spells it (``"in_features"``).
    value : object
        What the caller was given; NumPy integers are accepted.
    where : str
        Who asks, e.g. ``"Linear"``: the message starts with it.

    Raises
    ------
    TypeError
        For a bool, a float (even ``3.0``), a string or anything else that is not an integer.
    ValueError
        For an integer <= 0.

    Examples
    --------
    >>> positive_int("r", 8, "LoRALinear")
    8
    >>> positive_int("r", 0, "LoRALinear")
    Traceback (most recent call last):
    ...
    ValueError: LoRALinear: r must be a positive integer, got 0
    """
    if not _is_int(value):
        raise _type_error(where, name, "a positive integer", repr(value), value)
    if value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: Any, where: str) -> int:
    """``value`` as an ``int``, if it is an integer (not a bool, not a float) >= 0, such as a count
    that may be zero. Same parameters and errors as `positive_int`."""
    if not _is_int(value):
        raise _type_error(where, name, "an integer >= 0", repr(value), value)
    if value < 0:
        raise ValueError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def positive_number(name: str, value: Any, where: str) -> float:
    """``value`` if it is a finite real number (not a bool) greater than 0, such as alpha or lr.

    Returned as given (an int stays an int). TypeError for a bool, a string or anything else
    that is not a real number; ValueError for 0, a negative number, NaN or infinity.
    """
    if not _is_number(value):
        raise _type_error(where, name, "a positive number", f"{name}={value!r}", value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {name} must be a positive number, got {name}={value!r}")
    return value  # a Real, kept as given (an int stays an int)


def non_negative_number(name: str, value: Any, where: str) -> float:
    """``value`` as a ``float``, if it is a finite real number (not a bool) >= 0, such as a
    temperature or a weight decay. TypeError for a wrong type, ValueError for a negative,
    infinite or NaN value."""
    if not _is_number(value):
        raise _type_error(where, name, "a finite number >= 0", f"{name}={value!r}", value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {name}={value!r}")
    return float(value)


def fraction(name: str, value: Any, where: str) -> float:
    """``value`` as a ``float``, if it is a real number (not a bool) strictly between 0 and 1,
    such as the share of a dataset held out. TypeError for a wrong type, ValueError for a
    number outside (0, 1) (NaN included)."""
    if not _is_number(value):
        raise _type_error(where, name, "a number in (0, 1)", f"{name}={value!r}", value)
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{where}: {name} must be a number in (0, 1), got {name}={value!r}")
    return float(value)


def probability(name: str, value: Any, where: str) -> float:
    """``value`` as a ``float``, if it is a real number (not a bool) in [0, 1), such as a dropout p.

    Raises
    ------
    TypeError
        For a bool, a string or anything else that is not a real number.
    ValueError
        For a number outside [0, 1) (NaN included).
    """
    if not _is_number(value):
        raise _type_error(where, name, "a number in [0, 1)", repr(value), value)
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where}: expected {name} in [0, 1), got {value!r}")
    return float(value)


def boolean(name: str, value: Any, where: str) -> bool:
    """``value`` as a ``bool``, if it is one (a NumPy bool too); ``"false"``, 0 and None are not."""
    if not isinstance(value, (bool, np.bool_)):
        raise _type_error(where, name, "True or False", repr(value), value)
    return bool(value)


def one_of(name: str, value: T, choices: Collection[Any], where: str) -> T:
    """``value`` if it is one of ``choices`` (for a dict, one of its keys), such as a name.

    Raises
    ------
    TypeError
        For a value of none of the choices' types (``3`` where names are strings).
    ValueError
        For a value of the right type that is not a choice (``"lion"`` among optimizers).

    Examples
    --------
    >>> one_of("optimizer", "sgd", ("adam", "sgd"), "fit")
    'sgd'
    >>> one_of("optimizer", "lion", ("adam", "sgd"), "fit")
    Traceback (most recent call last):
    ...
    ValueError: fit: optimizer must be one of ['adam', 'sgd'], got optimizer='lion'
    """
    expected = f"one of {list(choices)}"
    if isinstance(value, bool) or not isinstance(value, tuple({type(c) for c in choices})):
        raise _type_error(where, name, expected, f"{name}={value!r}", value)
    if value not in choices:
        raise ValueError(f"{where}: {name} must be {expected}, got {name}={value!r}")
    return value
