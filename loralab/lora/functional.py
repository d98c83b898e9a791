"""The fused LoRA linear op in plain NumPy: a forward and its hand-derived backward.

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

__all__ = ["lora_forward", "lora_backward", "lora_backward_dW0", "LoRACache"]


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
