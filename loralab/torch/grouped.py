"""The grouped LoRA op in torch: the twin of `loralab.lora.grouped` (one batch, many adapters).

Row i of the batch goes through adapter g_i (or none, g_i = -1)::

    y_i = s_{g_i} B_{g_i} A_{g_i} x_i

computed as one small product pair per adapter on its rows X_k (U_k = X_k A_k^T,
Y_k = s_k U_k B_k^T, scattered back), with the same hand backward as the NumPy op::

    G_k = dY_k B_k     dX_k = s_k G_k A_k     dA_k = s_k G_k^T X_k     dB_k = s_k dY_k^T U_k

`GroupedLoRAFunction` is checked against plain torch autograd on the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["GroupedLoRAFunction", "grouped_lora", "grouped_lora_autograd"]


def _groups(index: torch.Tensor, n_adapters: int) -> list[torch.Tensor]:
    """Row indices (into the flattened batch) of each adapter, from one stable sort."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    bounds = torch.searchsorted(flat[order], torch.arange(n_adapters + 1, device=flat.device))
    return [order[bounds[k] : bounds[k + 1]] for k in range(n_adapters)]


class GroupedLoRAFunction(torch.autograd.Function):
    """``apply(x, index, scalings, A_1..A_K, B_1..B_K)`` -> the low-rank part, shape (..., out).

    x : (..., in); index : int tensor of shape x.shape[:-1] (-1: no adapter); A_k : (r_k, in);
    B_k : (out, r_k); scalings : K floats.
    """

    @staticmethod
    def forward(ctx, x, index, scalings, *AB):
        k = len(scalings)
        As, Bs = AB[:k], AB[k:]
        x2 = x.reshape(-1, x.shape[-1])
        groups = _groups(index, k)
        out_features = Bs[0].shape[0]
        y = x2.new_zeros((x2.shape[0], out_features))
        us = []
        for rows, A, B, s in zip(groups, As, Bs, scalings, strict=True):
            u = x2[rows] @ A.T
            y[rows] = s * (u @ B.T)
            us.append(u)
        ctx.save_for_backward(x2, *As, *Bs, *us)
        ctx.groups, ctx.scalings, ctx.x_shape = groups, scalings, x.shape
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        k = len(ctx.scalings)
        saved = ctx.saved_tensors
        x2, As, Bs, us = saved[0], saved[1 : 1 + k], saved[1 + k : 1 + 2 * k], saved[1 + 2 * k :]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = torch.zeros_like(x2) if ctx.needs_input_grad[0] else None
        dAs, dBs = [], []
        for rows, A, B, u, s in zip(ctx.groups, As, Bs, us, ctx.scalings, strict=True):
            dyk = dy2[rows]
            g = dyk @ B  # (n_k, r_k)
            dAs.append(s * (g.T @ x2[rows]))
            dBs.append(s * (dyk.T @ u))
            if dx is not None:
                dx[rows] = s * (g @ A)
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        return (dx, None, None, *dAs, *dBs)


def grouped_lora(x: torch.Tensor, index: torch.Tensor, holders: Sequence[Any]) -> torch.Tensor:
    """`GroupedLoRAFunction` over the adapters ``holders`` (each with lora_A, lora_B, scaling).

    x : (..., in); index : int tensor of shape x.shape[:-1] (-1: no adapter); holder k's A_k is
    (r_k, in) and B_k (out, r_k). Returns the low-rank part only, shape (..., out).
    """
    As = [h.lora_A for h in holders]
    Bs = [h.lora_B for h in holders]
    return GroupedLoRAFunction.apply(x, index, [h.scaling for h in holders], *As, *Bs)


def grouped_lora_autograd(
    x: torch.Tensor,
    index: torch.Tensor,
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> torch.Tensor:
    """The same as `GroupedLoRAFunction` through plain autograd (a masked sum; the reference).

    x : (..., in); index : shape x.shape[:-1]; As[k] : (r_k, in); Bs[k] : (out, r_k); scalings :
    K floats. Returns shape (..., out).
    """
    y = x.new_zeros((*x.shape[:-1], Bs[0].shape[0]))
    for k, (A, B, s) in enumerate(zip(As, Bs, scalings, strict=True)):
        rows = (index == k).unsqueeze(-1).to(x.dtype)
        y = y + rows * (s * ((x @ A.T) @ B.T))
    return y
