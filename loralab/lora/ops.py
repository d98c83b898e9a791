"""The LoRA math in plain NumPy: forwards and their hand-derived backwards (imports nothing of loralab).

Three ops, each a ``*_forward`` returning ``(y, cache)`` and a ``*_backward(dy, cache)``:

- `lora_forward` / `lora_backward`: the fused LoRA linear layer (below);
- `branch_forward` / `branch_backward`: the LoRA branch alone, ``s ((x * mask) A^T) B^T``, for a
  base layer that computes its own part (a quantized W0, see `loralab.lora.linear_shared`);
- `dora_forward` / `dora_backward`: DoRA's layer (at the end of this file).

The fused LoRA linear layer.

With x of shape (..., in), frozen W0 (out, in), bias b (out,), A (r, in), B (out, r) and
s = alpha / r, the LoRA layer computes

    y = x W0^T + b + s (x A^T) B^T                 (the paper's h = W0 x + (alpha/r) B A x)

Write u = x A^T (shape (..., r)) and g = dy B (shape (..., r)). The chain rule gives

    dx = dy W0 + s g A          dA = s g^T x          dB = s dy^T u          db = sum dy

(``g^T x`` and ``dy^T u`` sum over every batch position). None of these needs dW0 = dy^T x,
an (out, in) matrix as large as W0 itself: that matmul, its memory and the optimizer state for
W0 are what LoRA saves. With dropout on the LoRA branch (as PEFT does) x is replaced by
x * mask in the branch, and the branch's contribution to dx is multiplied by the same mask.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "lora_forward",
    "lora_backward",
    "lora_backward_dW0",
    "LoRACache",
    "branch_forward",
    "branch_backward",
    "BranchCache",
    "dora_forward",
    "dora_backward",
    "DoRACache",
    "row_norms",
]


class LoRACache(NamedTuple):
    """What `lora_forward` keeps for `lora_backward` (all 2-D, batch folded into rows)."""

    x2: np.ndarray  # (N, in): the input, batch dimensions folded
    xd2: np.ndarray  # (N, in): the LoRA branch's input (x * mask), or x2 itself without dropout
    u: np.ndarray  # (N, r): x_d A^T
    W0: np.ndarray  # (out, in)
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    mask: np.ndarray | None  # (..., in) scaled dropout mask or None
    scaling: float
    has_bias: bool
    batch_shape: tuple[int, ...]


def lora_forward(
    x: np.ndarray,
    W0: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, LoRACache]:
    """Forward of a LoRA linear layer: ``y = x W0^T + b + s ((x * mask) A^T) B^T``.

    Parameters
    ----------
    x : ndarray of shape (..., in)
    W0 : ndarray of shape (out, in)
        The frozen pre-trained weight.
    b : ndarray of shape (out,) or None
    A : ndarray of shape (r, in)
    B : ndarray of shape (out, r)
    scaling : float
        s = alpha / r (alpha / sqrt(r) for rsLoRA).
    dropout_mask : ndarray of shape (..., in), optional
        Dropout on the LoRA branch's input, already divided by (1 - p).

    Returns
    -------
    y : ndarray of shape (..., out)
    cache : LoRACache
        What `lora_backward` needs.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, W0, A, B = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(2, 4)), rng.normal(size=(5, 2))
    >>> y, cache = lora_forward(x, W0, None, A, B, scaling=0.5)
    >>> np.allclose(y, x @ (W0 + 0.5 * B @ A).T)
    True
    """
    batch_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xd2 = x2 if dropout_mask is None else (x * dropout_mask).reshape(x2.shape)
    u = xd2 @ A.T  # (N, r)
    y = x2 @ W0.T
    y += scaling * (u @ B.T)
    if b is not None:
        y += b
    cache = LoRACache(x2, xd2, u, W0, A, B, dropout_mask, scaling, b is not None, batch_shape)
    return y.reshape(batch_shape + (W0.shape[0],)), cache


def lora_backward(
    dy: np.ndarray,
    cache: LoRACache,
    need_dx: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]:
    """Hand-derived backward of `lora_forward`.

    Parameters
    ----------
    dy : ndarray of shape (..., out)
        Gradient of the loss with respect to y.
    cache : LoRACache
        From `lora_forward`.
    need_dx : bool, default True
        Skip dx when the input needs no gradient (e.g. the first layer's data).

    Returns
    -------
    dx : ndarray of shape (..., in) or None
        ``dy W0 + s (dy B) A`` (the branch term times the dropout mask).
    dA : ndarray of shape (r, in)
        ``s (dy B)^T x``.
    dB : ndarray of shape (out, r)
        ``s dy^T (x A^T)``.
    db : ndarray of shape (out,) or None
        ``sum dy`` over the batch; None when the layer has no bias.

    dW0 is not among the outputs: LoRA never needs it. Should W0 be trained too, call
    `lora_backward_dW0`.
    """
    s = cache.scaling
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    g = dy2 @ cache.B  # (N, r)
    dA = s * (g.T @ cache.xd2)  # (r, in)
    dB = s * (dy2.T @ cache.u)  # (out, r)
    db = dy2.sum(axis=0) if cache.has_bias else None
    dx = None
    if need_dx:
        branch = s * (g @ cache.A)  # (N, in)
        if cache.mask is not None:
            branch = branch.reshape(cache.mask.shape) * cache.mask
            branch = branch.reshape(-1, branch.shape[-1])
        dx = dy2 @ cache.W0
        dx += branch
        dx = dx.reshape(cache.batch_shape + (cache.W0.shape[1],))
    return dx, dA, dB, db


def lora_backward_dW0(dy: np.ndarray, cache: LoRACache) -> np.ndarray:
    """dW0 = dy^T x, shape (out, in): needed only if W0 itself is trained (full fine-tuning)."""
    return dy.reshape(-1, dy.shape[-1]).T @ cache.x2


# ----- the LoRA branch alone ----------------------------------------------------------------------
class BranchCache(NamedTuple):
    """What `branch_forward` keeps for `branch_backward` (batch folded into rows)."""

    xd2: np.ndarray  # (N, in): x * mask
    u: np.ndarray  # (N, r): x_d A^T
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    mask: np.ndarray | None  # (..., in)
    scaling: float
    x_shape: tuple[int, ...]


def branch_forward(
    x: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, BranchCache]:
    """The LoRA branch alone: ``z = s ((x * mask) A^T) B^T``, shape (..., out).

    A layer whose base is not a plain Linear (a quantized W0) computes ``base(x) + z``. With
    u = x_d A^T and g = dz B, the backward is

        dx = s (g A) * mask        dA = s g^T x_d        dB = s dz^T u.
    """
    x_shape = x.shape
    xd = x if dropout_mask is None else x * dropout_mask
    xd2 = xd.reshape(-1, x_shape[-1])
    u = xd2 @ A.T
    z = scaling * (u @ B.T)
    cache = BranchCache(xd2, u, A, B, dropout_mask, scaling, x_shape)
    return z.reshape(x_shape[:-1] + (B.shape[0],)), cache


def branch_backward(
    dz: np.ndarray, cache: BranchCache, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Backward of `branch_forward`: (dx or None, dA, dB)."""
    s = cache.scaling
    dz2 = dz.reshape(-1, dz.shape[-1])
    g = dz2 @ cache.B  # (N, r)
    dA = s * (g.T @ cache.xd2)
    dB = s * (dz2.T @ cache.u)
    dx = None
    if need_dx:
        dx = (s * (g @ cache.A)).reshape(cache.x_shape)
        if cache.mask is not None:
            dx = dx * cache.mask
    return dx, dA, dB


# ----- DoRA ---------------------------------------------------------------------------------------
# DoRA (Liu et al., 2024) splits the adapted weight into a magnitude and a direction:
#
#     W' = m * (W0 + s B A) / ||W0 + s B A||_row          (m: one trainable number per output row)
#
# where ``||.||_row`` is the norm of each row (over the input dimension), treated as a constant in
# the backward ("detached", as the DoRA paper recommends and PEFT does). With c = m / ||W0 + s B A||
# and z = x W0^T + s (x A^T) B^T (the plain LoRA output without bias), the layer computes
#
#     y = c * z + b,     so   dm = sum_batch(dy * z) / ||W0 + s B A||,   dz = c * dy
#
# and dz flows into the LoRA backward for dx, dA and dB. With dropout on the adapter's input x_d,
# PEFT computes y = x W0^T + b + (c - 1) * (x_d W0^T) + c s (x_d A^T) B^T; so does `dora_forward`.


def row_norms(W0: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """||W0 + s B A|| of each row: shape (out,). DoRA's magnitude starts here and divides by it."""
    return np.linalg.norm(W0 + scaling * (B @ A), axis=1)


class DoRACache(NamedTuple):
    """What `dora_forward` keeps for `dora_backward` (batch folded into rows)."""

    lora: LoRACache  # of the LoRA part, fed with x_d
    z: np.ndarray  # (N, out): x_d W0^T + s (x_d A^T) B^T
    c: np.ndarray  # (out,): m / ||W0 + s B A||
    norm: np.ndarray  # (out,)
    mask: np.ndarray | None
    x_shape: tuple[int, ...]


def dora_forward(
    x: np.ndarray,
    W0: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    m: np.ndarray,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, DoRACache]:
    """Forward of a DoRA layer: ``y = (m / ||W0 + s B A||_row) * (x W0^T + s (x A^T) B^T) + b``.

    Parameters
    ----------
    x : ndarray of shape (..., in)
    W0 : ndarray of shape (out, in)
    b : ndarray of shape (out,) or None
    A : ndarray of shape (r, in)
    B : ndarray of shape (out, r)
    m : ndarray of shape (out,)
        The magnitude vector.
    scaling : float
    dropout_mask : ndarray of shape (..., in), optional
        Dropout on the adapter's input, already divided by (1 - p) (PEFT's convention, see the
        module docstring).

    Returns
    -------
    y : ndarray of shape (..., out)
    cache : what `dora_backward` needs
    """
    xd = x if dropout_mask is None else x * dropout_mask
    z, lora = lora_forward(xd, W0, None, A, B, scaling)
    z = z.reshape(-1, W0.shape[0])
    norm = row_norms(W0, A, B, scaling)
    c = m / norm
    y = c * z
    if dropout_mask is not None:  # PEFT keeps the undropped x in the frozen path
        y += (x.reshape(-1, x.shape[-1]) - lora.x2) @ W0.T
    if b is not None:
        y += b
    cache = DoRACache(lora, z, c, norm, dropout_mask, x.shape)
    return y.reshape(x.shape[:-1] + (W0.shape[0],)), cache


def dora_backward(
    dy: np.ndarray, cache: DoRACache, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward of `dora_forward`: (dx or None, dA, dB, dm, db), the norm held constant.

    dm = sum(dy * z) / ||W0 + s B A||; dx, dA, dB are LoRA's backward of dz = (m / ||.||) * dy.
    """
    dy2 = dy.reshape(-1, dy.shape[-1])
    dm = (dy2 * cache.z).sum(axis=0) / cache.norm
    dxd, dA, dB, _ = lora_backward(dy2 * cache.c, cache.lora, need_dx=need_dx)
    db = dy2.sum(axis=0)
    dx = None
    if dxd is not None:
        dx = dxd.reshape(-1, dxd.shape[-1])
        if cache.mask is not None:
            frozen = dy2 @ cache.lora.W0
            dx = frozen + (dx - frozen) * cache.mask.reshape(dx.shape)
        dx = dx.reshape(cache.x_shape)
    return dx, dA, dB, dm, db
