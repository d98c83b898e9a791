"""LoftQ: start the adapter where it cancels the quantization error (Li et al. 2023, arXiv 2310.08659).

QLoRA starts from B = 0, so the adapted model begins as the *quantized* model, off from the
pre-trained one by the quantization error W - Q. LoftQ chooses the 4-bit Q and the rank-r
factors together, alternating (Algorithm 1)::

    Q_t          = quantize(W - B_{t-1} A_{t-1})          (B_0 A_0 = 0: plain quantization)
    B_t A_t      = the best rank-r approximation of W - Q_t (truncated SVD, sqrt(S) on each side)

so that Q + B A approximates W better than Q alone. `loftq` returns the last Q, A and B (for
LoRA's scaling s, B is divided by s, so that s B A is the SVD part) and the relative error
``||W - Q - s B A||_F / ||W||_F`` after each iteration, next to plain quantization's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loralab.quant.blockwise import QuantizedTensor, quantize

__all__ = ["LoftQResult", "loftq"]


@dataclass(frozen=True, eq=False)
class LoftQResult:
    """What `loftq` found.

    Attributes
    ----------
    weight : QuantizedTensor of shape (out, in)
        Q, the new frozen base.
    A : ndarray of shape (r, in), float32
    B : ndarray of shape (out, r), float32
    errors : list of float
        ``||W - Q_t - s B_t A_t||_F / ||W||_F`` after iteration t = 1, 2, ...
    quantization_error : float
        ``||W - quantize(W)||_F / ||W||_F``: where QLoRA's B = 0 start is.
    """

    weight: QuantizedTensor
    A: np.ndarray
    B: np.ndarray
    errors: list[float]
    quantization_error: float


def _rank_r(residual: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    # L (out, r) and R (r, in) with L R the best rank-r approximation, sqrt(S) on each side (PEFT's)
    U, S, Vh = np.linalg.svd(residual, full_matrices=False)
    root = np.sqrt(S[:r])
    return U[:, :r] * root, root[:, None] * Vh[:r]


def loftq(
    W: Any,
    r: int,
    *,
    num_iter: int = 1,
    scaling: float = 1.0,
    dtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
) -> LoftQResult:
    """LoftQ's alternating initialisation of a quantized base and a rank-r adapter.

    Parameters
    ----------
    W : ndarray of shape (out, in), floating point
        The pre-trained weight.
    r : int, 1 <= r <= min(out, in)
    num_iter : int, default 1
        Alternations T (one iteration: quantize W, then the SVD of the residual).
    scaling : float, default 1
        The LoRA scaling s the adapter will run with (B is returned divided by it).
    dtype, block_size, double_quant
        As `quantize`.

    Returns
    -------
    LoftQResult

    Raises
    ------
    ValueError
        W not a matrix or all zeros; r, num_iter or scaling out of range.
    """
    W = np.asarray(getattr(W, "data", W))
    if W.ndim != 2:
        raise ValueError(f"loftq: W must be a matrix (out, in), got shape {W.shape}")
    for name, value, low, high in (("r", r, 1, min(W.shape)), ("num_iter", num_iter, 1, None)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"loftq: {name} must be an int, got {type(value).__name__}")
        if value < low or (high is not None and value > high):
            limit = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"loftq: {name} must be {limit} for W of shape {W.shape}, got {value}")
    if not (np.isfinite(scaling) and scaling > 0):
        raise ValueError(f"loftq: scaling must be a positive number, got {scaling!r}")
    W = W.astype(np.float32)
    norm = float(np.linalg.norm(W.astype(np.float64)))
    if (
        norm == 0
    ):  # quantize(W) would already be exact, and A = B = 0 is an adapter that never trains
        raise ValueError(
            f"loftq: W (shape {W.shape}) is all zeros, so there is no quantization error to "
            "cancel and the errors relative to ||W|| are undefined; quantize it as it is and "
            "start the adapter with the default init (B = 0)"
        )
    target = W
    errors = []
    for _ in range(num_iter):
        q = quantize(target, dtype, block_size, double_quant)
        Q = q.dequantize()
        L, R = _rank_r(W - Q, r)
        approx = Q.astype(np.float64) + L.astype(np.float64) @ R
        errors.append(float(np.linalg.norm(W - approx)) / norm)
        target = W - L @ R
    plain = quantize(W, dtype, block_size, double_quant).dequantize()
    quantization_error = float(np.linalg.norm((W - plain).astype(np.float64))) / norm
    return LoftQResult(
        q, R.astype(np.float32), (L / scaling).astype(np.float32), errors, quantization_error
    )
