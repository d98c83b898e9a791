"""Validators shared by every layer of loralab: one function per rule, one message per mistake.

A wrong type is a TypeError, a wrong value of the right type a ValueError; both name the caller,
the argument and the value.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np

__all__ = ["positive_int", "probability", "boolean"]


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
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(
            f"{where}: {name} must be a positive integer, got {value!r} ({type(value).__name__})"
        )
    if value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def probability(name: str, value: Any, where: str) -> float:
    """``value`` as a ``float``, if it is a real number (not a bool) in [0, 1), such as a dropout p.

    Raises
    ------
    TypeError
        For a bool, a string or anything else that is not a real number.
    ValueError
        For a number outside [0, 1) (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{where}: {name} must be a number in [0, 1), got {value!r} ({type(value).__name__})"
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where}: expected {name} in [0, 1), got {value!r}")
    return float(value)


def boolean(name: str, value: Any, where: str) -> bool:
    """``value`` as a ``bool``, if it is one (a NumPy bool too); ``"false"``, 0 and None are not."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{where}: {name} must be True or False, got {value!r} ({type(value).__name__})"
        )
    return bool(value)
