"""The grouped LoRA op in torch: the twin of `loralab.lora.grouped` (one batch, many adapters).

Row i of the batch goes through adapter g_i (or none, g_i = -1)::

    y_i = s_{g_i} B_{g_i} A_{g_i} x_i

computed as the NumPy op does: the rows sorted by adapter once per batch (a
`loralab.lora.grouped.RowGroups`), one small product pair per adapter on its contiguous segment
X_k of the sorted batch (U_k = s_k X_k A_k^T, Z_k = U_k B_k^T, written into one sorted buffer),
and the rows put back by one gather; with the same hand backward as the NumPy op::

    G_k = s_k dY_k B_k     dX_k = G_k A_k     dA_k = G_k^T X_k     dB_k = dY_k^T U_k

`GroupedLoRAFunction` is checked against plain torch autograd on the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from loralab.lora.grouped import RowGroups, group_batch

__all__ = ["GroupedLoRAFunction", "grouped_lora", "grouped_lora_autograd"]


class _Sorted(NamedTuple):
    """`loralab.lora.grouped.RowGroups` as torch index tensors on x's device."""

    order: torch.Tensor
    segments: list[tuple[int, int]]
    inverse: torch.Tensor
    identity: bool


def _sorted_rows(index: Any, x: torch.Tensor, n_adapters: int) -> _Sorted:
    """The batch's rows sorted by adapter: from a RowGroups (sorted once per batch, by
    `loralab.lora.mixed_batch`) or, for an index tensor of shape x.shape[:-1], sorted here."""
    if not isinstance(index, RowGroups):
        index = group_batch(index.reshape(-1).cpu().numpy(), n_adapters)
    order = torch.from_numpy(index.order).to(x.device)
    inverse = torch.from_numpy(index.inverse).to(x.device)
    return _Sorted(order, index.segments, inverse, index.identity)


def _permute(a2: torch.Tensor, rows: torch.Tensor, identity: bool) -> torch.Tensor:
    """a2 (N * tokens, f) with its N batch rows taken in the order ``rows``."""
    if identity:
        return a2
    return a2.reshape(rows.numel(), -1).index_select(0, rows).reshape(a2.shape)


def _zero_gaps(z: torch.Tensor, segments: list[tuple[int, int]], tokens: int) -> None:
    at = 0
    for lo, hi in sorted(segments):
        if lo > at:
            z[at * tokens : lo * tokens] = 0
        at = max(at, hi)
    z[at * tokens :] = 0


class GroupedLoRAFunction(torch.autograd.Function):
    """``apply(x, index, scalings, A_1..A_K, B_1..B_K)`` -> the low-rank part, shape (..., out).

    x : (..., in); index : int tensor of shape x.shape[:-1] (-1: no adapter), or the batch's rows
    sorted by adapter over x's first axis (a `loralab.lora.grouped.RowGroups`, one segment per
    adapter); A_k : (r_k, in); B_k : (out, r_k); scalings : K floats.
    """

    @staticmethod
    def forward(ctx, x, index, scalings, *AB):
        k = len(scalings)
        As, Bs = AB[:k], AB[k:]
        x2 = x.reshape(-1, x.shape[-1])
        rows = _sorted_rows(index, x, k)
        tokens = x2.shape[0] // max(rows.order.numel(), 1)
        xs = _permute(x2, rows.order, rows.identity)
        out_features = Bs[0].shape[0]
        zs = x2.new_empty((x2.shape[0], out_features))
        _zero_gaps(zs, rows.segments, tokens)
        us = []
        for (lo, hi), A, B, s in zip(rows.segments, As, Bs, scalings, strict=True):
            lo, hi = lo * tokens, hi * tokens
            u = (xs[lo:hi] @ A.T).mul_(s)
            torch.matmul(u, B.T, out=zs[lo:hi])
            us.append(u)
        ctx.save_for_backward(xs, *As, *Bs, *us)
        ctx.rows, ctx.tokens, ctx.scalings, ctx.x_shape = rows, tokens, scalings, x.shape
        y = _permute(zs, rows.inverse, rows.identity)
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        k = len(ctx.scalings)
        saved = ctx.saved_tensors
        xs, As, Bs, us = saved[0], saved[1 : 1 + k], saved[1 + k : 1 + 2 * k], saved[1 + 2 * k :]
        rows, tokens = ctx.rows, ctx.tokens
        dys = _permute(dy.reshape(-1, dy.shape[-1]), rows.order, rows.identity)
        dxs = None
        if ctx.needs_input_grad[0]:
            dxs = xs.new_empty(xs.shape)
            _zero_gaps(dxs, rows.segments, tokens)
        dAs, dBs = [], []
        for (lo, hi), A, B, u, s in zip(rows.segments, As, Bs, us, ctx.scalings, strict=True):
            lo, hi = lo * tokens, hi * tokens
            dyk = dys[lo:hi]
            g = (dyk @ B).mul_(s)  # (n_k, r_k)
            dAs.append(g.T @ xs[lo:hi])
            dBs.append(dyk.T @ u)
            if dxs is not None:
                torch.matmul(g, A, out=dxs[lo:hi])
        dx = None if dxs is None else _permute(dxs, rows.inverse, rows.identity)
        return (None if dx is None else dx.reshape(ctx.x_shape), None, None, *dAs, *dBs)


def grouped_lora(x: torch.Tensor, index: Any, holders: Sequence[Any]) -> torch.Tensor:
    """`GroupedLoRAFunction` over the adapters ``holders`` (each with lora_A, lora_B, scaling).

    x : (..., in); index : int tensor of shape x.shape[:-1] (-1: no adapter) or a RowGroups (as
    `GroupedLoRAFunction`); holder k's A_k is (r_k, in) and B_k (out, r_k). Returns the low-rank
    part only, shape (..., out).
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
