"""The engine Functions `LoRALinear` runs, each a thin wrapper over `loralab.lora.ops`.

- `LoRALinearFn`: the fused layer over a plain Linear base, ``y = x W0^T + b + s ((x * mask) A^T) B^T``;
- `DoRALinearFn`: DoRA's layer, W' = m * (W0 + s B A) / ||W0 + s B A||_row;
- `LoRABranchFn`: the LoRA branch alone, ``s ((x * mask) A^T) B^T``, for a base that computes its
  own part (e.g. a quantized W0);
- `GroupedLoRAFn`, `GroupedLoRALinearFn`: a mixed batch, each row through its own adapter (the
  grouped op of `loralab.lora.grouped`), alone or fused with a plain Linear base;
- `lora_linear`: the fused op as a function, with its shapes checked.

Each Function's forward calls the NumPy forward and saves its cache; its backward calls the
hand-derived backward and returns a gradient only where an input asks for one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralab.lora.grouped import (
    grouped_lora_backward,
    grouped_lora_forward,
    grouped_lora_linear_forward,
)
from loralab.lora.ops import (
    branch_backward,
    branch_forward,
    dora_backward,
    dora_forward,
    lora_backward,
    lora_backward_dW0,
    lora_forward,
)
from loralab.tensor import Function, Tensor, as_tensor

__all__ = [
    "LoRALinearFn",
    "DoRALinearFn",
    "LoRABranchFn",
    "GroupedLoRAFn",
    "GroupedLoRALinearFn",
    "lora_linear",
]


class LoRALinearFn(Function):
    """``y = x W0^T + b + s ((x * mask) A^T) B^T`` with the hand-derived backward of
    `loralab.lora.ops.lora_backward`; dW0 is formed only if W0 requires a gradient."""

    @staticmethod
    def forward(ctx, x, W0, b, A, B, scaling, mask):
        y, cache = lora_forward(x, W0, b, A, B, scaling, mask)
        ctx.save_for_backward(cache)
        return y

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved
        need_x, need_W0, need_b = ctx.needs_input_grad[:3]
        dx, dA, dB, db = lora_backward(grad, cache, need_dx=need_x)
        dW0 = lora_backward_dW0(grad, cache) if need_W0 else None
        return dx, dW0, db if need_b else None, dA, dB


class DoRALinearFn(Function):
    """DoRA's layer over (x, W0, b, A, B, m) (`loralab.lora.ops.dora_forward`); W0 gets no gradient."""

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


class LoRABranchFn(Function):
    """The LoRA branch alone over (x, A, B): ``s ((x * mask) A^T) B^T`` (`loralab.lora.ops.branch_forward`)."""

    @staticmethod
    def forward(ctx, x, A, B, scaling, mask):
        z, cache = branch_forward(x, A, B, scaling, mask)
        ctx.save_for_backward(cache)
        return z

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved
        dx, dA, dB = branch_backward(grad, cache, need_dx=ctx.needs_input_grad[0])
        return dx, dA, dB


class GroupedLoRAFn(Function):
    """The low-rank part of a mixed batch over (x, A_1..A_K, B_1..B_K): row i gets
    ``s_k B_k A_k x_i`` for its adapter k = index[i] (nothing for -1), with the hand backward of
    `loralab.lora.grouped.grouped_lora_backward` (so one batch trains several adapters at once).
    ``index`` is an int array of shape x.shape[:-1], or the batch's rows already sorted by
    adapter (a `loralab.lora.grouped.RowGroups`, shared by every layer of a mixed batch).
    ``stack``: the same adapters stacked, (`loralab.lora.stacked.AdapterStack`, slots), or None."""

    @staticmethod
    def forward(ctx, x, *AB, index, scalings, stack=None):
        k = len(scalings)
        y, cache = grouped_lora_forward(x, index, AB[:k], AB[k:], scalings, stack=stack)
        ctx.save_for_backward(cache)
        return y

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved
        dx, dAs, dBs = grouped_lora_backward(grad, cache, need_dx=ctx.needs_input_grad[0])
        return (dx, *dAs, *dBs)


class GroupedLoRALinearFn(Function):
    """A mixed batch through a plain Linear base, fused: ``y = x W0^T + b`` plus, in place, each
    row's ``s_k B_k A_k x_i`` (`GroupedLoRAFn`'s part, the same ``index``), over
    (x, W0, b, A_1..A_K, B_1..B_K), all on the batch sorted by adapter
    (`loralab.lora.grouped.grouped_lora_linear_forward`).

    Backward: dx = dy W0 + the grouped part's dx; db = sum dy; dW0 = dy^T x only if W0 asks.
    """

    @staticmethod
    def forward(ctx, x, W0, b, *AB, index, scalings, stack=None):
        k = len(scalings)
        y, cache = grouped_lora_linear_forward(x, W0, b, index, AB[:k], AB[k:], scalings, stack)
        ctx.save_for_backward(cache, x, W0)
        return y

    @staticmethod
    def backward(ctx, grad):
        cache, x, W0 = ctx.saved
        need = ctx.needs_input_grad
        dx, dAs, dBs = grouped_lora_backward(grad, cache, need_dx=need[0], W0=W0)
        g2 = grad.reshape(-1, grad.shape[-1])
        dW0 = g2.T @ x.reshape(-1, x.shape[-1]) if need[1] else None
        db = g2.sum(axis=0) if need[2] else None
        return (dx, dW0, db, *dAs, *dBs)


def _data(t: Any) -> np.ndarray:
    return t.data if isinstance(t, Tensor) else np.asarray(t)


def lora_linear(
    x: Any,
    W0: Any,
    b: Any,
    A: Any,
    B: Any,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
) -> Tensor:
    """The fused LoRA linear op: ``y = x W0^T + b + s ((x * mask) A^T) B^T``.

    Parameters
    ----------
    x : Tensor of shape (..., in)
    W0 : Tensor of shape (out, in)
        Frozen base weight; its gradient is computed only if it requires one.
    b : Tensor of shape (out,) or None
    A : Tensor of shape (r, in)
    B : Tensor of shape (out, r)
    scaling : float
        s = alpha / r.
    dropout_mask : ndarray of shape (..., in), optional
        Dropout mask for the LoRA branch's input, already divided by (1 - p).

    Returns
    -------
    Tensor of shape (..., out)
    """
    w_shape, a_shape = np.shape(_data(W0)), np.shape(_data(A))
    if len(w_shape) != 2:
        raise ValueError(f"lora_linear: expected W0 of shape (out, in), got {w_shape}")
    out, in_ = w_shape
    if len(a_shape) != 2 or a_shape[1] != in_:
        raise ValueError(
            f"lora_linear(in={in_}, out={out}): expected A of shape (r, {in_}), got {a_shape}"
        )
    r = a_shape[0]
    what = f"lora_linear(in={in_}, out={out}, r={r})"
    x_shape = np.shape(_data(x))
    if len(x_shape) == 0 or x_shape[-1] != in_:
        raise ValueError(f"{what}: expected x of shape (..., {in_}), got {x_shape}")
    if np.shape(_data(B)) != (out, r):
        raise ValueError(f"{what}: expected B of shape ({out}, {r}), got {np.shape(_data(B))}")
    if b is not None and np.shape(_data(b)) != (out,):
        raise ValueError(f"{what}: expected b of shape ({out},), got {np.shape(_data(b))}")
    if dropout_mask is not None and dropout_mask.shape != x_shape:
        raise ValueError(
            f"{what}: expected dropout_mask of shape {x_shape}, got {dropout_mask.shape}"
        )
    return LoRALinearFn.apply(as_tensor(x), W0, b, A, B, scaling=float(scaling), mask=dropout_mask)
