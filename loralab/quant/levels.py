"""The code books: which real number each 4-bit (or 8-bit) code stands for, derived in code.

A blockwise quantizer stores, for every weight, the index of the nearest level in a small table
of numbers in [-1, 1]; the block's absolute maximum (absmax) scales the table back. These tables
are that idea's only free choice, and QLoRA's contribution (Dettmers et al. 2023, Section 3) is
to pick them from the normal distribution that trained weights follow.

Every table is float32 and indexed by the code: ``LEVELS[code]`` is the value a code decodes to.
The derivations reproduce bitsandbytes' tables bit for bit (the tests compare them), which needs
one detail: bitsandbytes computed its quantile points in float32 with ``torch.linspace``, so
`linspace_float32` reproduces that rounding.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

__all__ = [
    "NF4_VALUES",
    "FP4_VALUES",
    "INT4_VALUES",
    "INT8_VALUES",
    "DYNAMIC8_VALUES",
    "NF4_OFFSET",
    "linspace_float32",
    "normal_float_levels",
]

NF4_OFFSET = 0.9677083
"""The outermost quantile probability of NF4 (bitsandbytes' ``create_normal_map`` default)."""


def linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """``num`` evenly spaced float32 points from ``start`` to ``stop``, rounded as ``torch.linspace``.

    With ``step = (stop - start) / (num - 1)`` in float32, point ``i`` is ``start + i step`` for
    the first half and ``stop - (num - 1 - i) step`` for the second, each rounded once (a fused
    multiply-add). `numpy.linspace` rounds differently in the last bit, and one NF4 level
    inherits that bit.

    Returns
    -------
    ndarray of shape (num,), float32
    """
    f32 = np.float32
    start32, stop32 = f32(start), f32(stop)
    step = np.float64((stop32 - start32) / f32(num - 1))
    i = np.arange(num, dtype=np.float64)
    first = (np.float64(start32) + step * i).astype(f32)
    second = (np.float64(stop32) - step * (num - 1 - i)).astype(f32)
    return np.where(i < num // 2, first, second)


def normal_float_levels(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NormalFloat-4 levels in [-1, 1], sorted (QLoRA, Section 3, "4-bit NormalFloat").

    The ideal k-bit data type for N(0, 1) weights gives every code the same probability mass, so
    its levels are quantiles of the normal distribution. QLoRA wants an exact zero (padding and
    zero weights stay exact) and all 2^4 = 16 codes used, so the two halves are built apart and
    the type is asymmetric:

    - 8 positive levels: ``Phi^-1(p)`` at the 9 probabilities from ``offset`` down to 0.5, the
      last (0.5, which gives 0) dropped;
    - 7 negative levels: ``-Phi^-1(p)`` at 8 probabilities from ``offset`` to 0.5, 0.5 dropped;
    - one exact 0;

    then everything divided by the largest, so the table ends at -1 and at 1. ``offset`` = 0.9677
    puts the outermost level at Phi^-1(0.9677) = 1.848 standard deviations (bitsandbytes'
    ``create_normal_map``; ``Phi^-1`` is `statistics.NormalDist.inv_cdf`).

    Returns
    -------
    ndarray of shape (16,), float32, increasing
    """
    inv_cdf = NormalDist().inv_cdf
    positive = [inv_cdf(float(p)) for p in linspace_float32(offset, 0.5, 9)[:-1]]
    negative = [-inv_cdf(float(p)) for p in linspace_float32(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative, dtype=np.float32))
    return levels / levels.max()


def _fp4_levels() -> np.ndarray:
    # bitsandbytes' FP4: 1 sign bit (code bit 3), 2 exponent bits (bits 2-1), 1 mantissa bit
    # (bit 0), with its own exponent order: exponent field e > 0 means 2^(4 - e) (1 + m / 2);
    # e = 0 is subnormal, m / 16. The largest magnitude, 12 (e = 1, m = 1), is scaled to 1.
    magnitudes = []
    for code in range(8):
        e, m = code >> 1, code & 1
        magnitudes.append(2.0 ** (4 - e) * (1 + m / 2) if e else m / 16)
    mags = np.array(magnitudes, dtype=np.float32)
    # code 8 is "-0": stored as +0.0, as bitsandbytes' table stores it.
    levels = np.concatenate([mags, np.where(mags == 0, np.float32(0), -mags)])
    return levels / np.abs(levels).max()


def _dynamic_levels() -> np.ndarray:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for
    # decade i = 0..6, 2^i linearly spaced fractions in [0.1, 1] (midpoints of 2^i + 1 points)
    # times 10^(i - 6), with both signs; plus 0 and 1. 2 x 127 + 2 = 256 levels.
    values: list[np.ndarray] = []
    for i in range(7):
        edges = linspace_float32(0.1, 1.0, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += [scaled, -scaled]
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    return np.sort(np.concatenate(values))


NF4_VALUES = normal_float_levels()
"""NormalFloat-4: 16 levels, 7 negative, an exact 0, 8 positive, from -1 to 1. ``NF4_VALUES[code]``."""

FP4_VALUES = _fp4_levels()
"""bitsandbytes' FP4 (E2M1) in code order: codes 0-7 non-negative, 8-15 their negatives."""

INT4_VALUES = np.arange(-7, 8, dtype=np.float32) / np.float32(7)
"""Symmetric absmax int4: the 15 levels k / 7, k = -7..7 (one 4-bit code unused)."""

INT8_VALUES = np.arange(-127, 128, dtype=np.float32) / np.float32(127)
"""Symmetric absmax int8: the 255 levels k / 127, k = -127..127."""

DYNAMIC8_VALUES = _dynamic_levels()
"""bitsandbytes' 8-bit dynamic map, sorted: the code book of double quantization's constants."""

for _table in (NF4_VALUES, FP4_VALUES, INT4_VALUES, INT8_VALUES, DYNAMIC8_VALUES):
    _table.flags.writeable = False
