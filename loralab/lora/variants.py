"""LoRA variants in plain NumPy: DoRA's fused op, PiSSA and OLoRA initialisation, LoRA+ groups.

rsLoRA needs nothing here: it only changes the scaling s = alpha / r to alpha / sqrt(r)
(``LoRALinear(use_rslora=True)``). Everything below is named as in HF PEFT, whose options
``use_dora``, ``init_lora_weights="pissa" | "olora"`` and ``loraplus_lr_ratio`` these implement.

DoRA (Liu et al., 2024) splits the adapted weight into a magnitude and a direction:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row          (m: one trainable number per output row)

where ``||.||_row`` is the norm of each row (over the input dimension), treated as a constant in
the backward ("detached", as the DoRA paper recommends and PEFT does). With c = m / ||W0 + s B A||
and z = x W0^T + s (x A^T) B^T (the plain LoRA output without bias), the layer computes

    y = c * z + b,     so   dm = sum_batch(dy * z) / ||W0 + s B A||,   dz = c * dy

and dz flows into the LoRA backward for dx, dA and dB. With dropout on the adapter's input x_d,
PEFT computes y = x W0^T + b + (c - 1) * (x_d W0^T) + c s (x_d A^T) B^T; so does `dora_forward`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from loralab.lora.functional import LoRACache, lora_backward, lora_forward
from loralab.tensor import Function

__all__ = [
    "dora_forward",
    "dora_backward",
    "DoRALinear",
    "row_norms",
    "pissa_init",
    "olora_init",
    "loraplus_param_groups",
]


def row_norms(W0: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """||W0 + s B A|| of each row: shape (out,). DoRA's magnitude starts here and divides by it."""
    return np.linalg.norm(W0 + scaling * (B @ A), axis=1)


class DoRACache(NamedTuple):
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
    if need_dx:
        dx = dxd.reshape(-1, dxd.shape[-1])
        if cache.mask is not None:
            frozen = dy2 @ cache.lora.W0
            dx = frozen + (dx - frozen) * cache.mask.reshape(dx.shape)
        dx = dx.reshape(cache.x_shape)
    return dx, dA, dB, dm, db


class DoRALinear(Function):
    """The fused DoRA op over (x, W0, b, A, B, m); W0 gets no gradient (it is frozen under DoRA)."""

    @staticmethod
    def forward(ctx, x, W0, b, A, B, m, scaling, mask):
        y, cache = dora_forward(x, W0, b, A, B, m, scaling, mask)
        ctx.save_for_backward(cache, b is not None)
        return y

    @staticmethod
    def backward(ctx, grad):
        cache, has_bias = ctx.saved
        need = ctx.needs_input_grad
        dx, dA, dB, dm, db = dora_backward(grad, cache, need_dx=need[0])
        return dx, None, db if has_bias and need[2] else None, dA, dB, dm


# ----- initialisations that move the principal part of W0 into the adapter ------------------------
def pissa_init(W0: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PiSSA (Meng et al., 2024): the top-r singular triplets of W0 become the adapter.

    With W0 = U S V^T (singular values in decreasing order),

        A = diag(sqrt(S_r / s)) V_r^T,    B = U_r diag(sqrt(S_r / s)),    W_res = W0 - s B A,

    so s B A = U_r S_r V_r^T and the layer's output is unchanged at initialisation, while training
    starts on the principal directions of W0 instead of a random A and B = 0.

    Parameters
    ----------
    W0 : ndarray of shape (out, in)
    r : int
    scaling : float

    Returns
    -------
    A : ndarray of shape (r, in)
    B : ndarray of shape (out, r)
    W_res : ndarray of shape (out, in)
        The residual, kept frozen in place of W0. All three in W0's dtype; computed in float64.
    """
    W = W0.astype(np.float64)
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(S[:r] / scaling)
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root
    return A.astype(W0.dtype), B.astype(W0.dtype), (W - scaling * (B @ A)).astype(W0.dtype)


def olora_init(W0: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLoRA (Büyükakyüz, 2024): the first r columns of W0's QR decomposition become the adapter.

    With W0 = Q R (Q orthonormal columns, R upper triangular),

        A = R[:r, :],    B = Q[:, :r],    W_res = W0 - s B A,

    so B starts orthonormal. Returns (A (r, in), B (out, r), W_res (out, in)) in W0's dtype,
    computed in float64.
    """
    W = W0.astype(np.float64)
    Q, R = np.linalg.qr(W)
    A, B = R[:r], Q[:, :r]
    return A.astype(W0.dtype), B.astype(W0.dtype), (W - scaling * (B @ A)).astype(W0.dtype)


# ----- LoRA+ --------------------------------------------------------------------------------------
def loraplus_param_groups(
    model: Any, *, lr: float, loraplus_lr_ratio: float = 16.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024): B learns ``ratio`` times faster.

    lr_B = loraplus_lr_ratio * lr_A. The paper's argument: with B = 0 at the start and A random,
    equal learning rates leave the update of B too slow as the width grows.

    Parameters
    ----------
    model : loralab.nn.Module or torch.nn.Module
        Anything with ``named_parameters()``; only parameters that require a gradient are grouped.
    lr : float
        Learning rate of A (and of every other trainable parameter, e.g. DoRA's magnitude).
    loraplus_lr_ratio : float, default 16
        PEFT's name for lr_B / lr_A.

    Returns
    -------
    list of dicts ``{"params": [...], "lr": ...}``, accepted by ``loralab.optim`` and ``torch.optim``.

    Examples
    --------
    >>> from loralab.nn import MLP
    >>> from loralab.lora import inject_lora
    >>> model = inject_lora(MLP([4, 8, 2], seed=0), ["0"], r=2, seed=0)
    >>> [(len(g["params"]), g["lr"]) for g in loraplus_param_groups(model, lr=1e-3)]
    [(1, 0.001), (1, 0.016)]
    """
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio!r}")
    group_b, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (group_b if "lora_B" in name.split(".") else others).append(p)
    if not group_b:
        raise ValueError("loraplus_param_groups: the model has no trainable lora_B parameter")
    groups = [{"params": others, "lr": lr}] if others else []
    return groups + [{"params": group_b, "lr": lr * loraplus_lr_ratio}]
