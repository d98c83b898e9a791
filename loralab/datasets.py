"""Small real datasets that ship with loralab (no downloads), and the shifted tasks built from them.

The handwritten digits (UCI, 1,797 images of 8x8 pixels, CC BY 4.0) are the "pre-training" task of
the demo and the tutorials; a deterministic transformation of the images (rotation, mirroring,
inverted ink) makes a shifted task on which the pre-trained model is measurably worse.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from loralab._validate import fraction, one_of

__all__ = ["Dataset", "load_digits", "shift_digits", "SHIFTS", "train_test_split"]

SHIFTS = ("none", "rotate90", "mirror", "invert")


@dataclass(frozen=True)
class Dataset:
    """Features and integer labels.

    Attributes
    ----------
    x : ndarray of shape (n, 64)
        Pixels scaled to [0, 1].
    y : ndarray of shape (n,), int64
        Digit labels 0..9.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def load_digits(dtype: Any = np.float32) -> Dataset:
    """The 1,797 handwritten digits, pixels scaled from 0..16 to [0, 1].

    Returns
    -------
    Dataset with x of shape (1797, 64) and y of shape (1797,).
    """
    raw = resources.files("loralab.data").joinpath("digits/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",")
    return Dataset((table[:, :64] / 16.0).astype(dtype), table[:, 64].astype(np.int64))


def shift_digits(data: Dataset, shift: str) -> Dataset:
    """A shifted copy of the digits task.

    Parameters
    ----------
    data : Dataset from `load_digits`
    shift : "none", "rotate90" (images turned a quarter turn), "mirror" (left-right) or
        "invert" (ink and paper swapped)
    """
    one_of("shift", shift, SHIFTS, "shift_digits")
    images = data.x.reshape(-1, 8, 8)
    if shift == "rotate90":
        images = np.rot90(images, k=1, axes=(1, 2))
    elif shift == "mirror":
        images = images[:, :, ::-1]
    elif shift == "invert":
        images = 1.0 - images
    return Dataset(np.ascontiguousarray(images.reshape(-1, 64)).astype(data.x.dtype), data.y.copy())


def train_test_split(
    data: Dataset, test_fraction: float = 0.25, *, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """A seeded random split into (train, test)."""
    test_fraction = fraction("test_fraction", test_fraction, "train_test_split")
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(test_fraction * len(data)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(data.x[train], data.y[train]), Dataset(data.x[test], data.y[test])
