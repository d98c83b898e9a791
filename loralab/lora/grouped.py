"""The grouped LoRA op: one batch, many adapters, each row through its own (A_k, B_k).

Serving many fine-tuned tasks from one frozen base means a batch whose rows belong to different
adapters. Row i of the batch uses adapter g_i (or none, g_i = -1):

$$h_i = W_0 x_i + b + s_{g_i} B_{g_i} A_{g_i} x_i$$

The base product ``x W0^T`` is shared by every row and computed once for the whole batch: it is
by far the largest matmul (out x in per row). Only the low-rank part differs. This op groups the
rows by adapter (one stable ``argsort`` of g), and for each adapter k does one small product pair
on its rows X_k (n_k, in):

    U_k = X_k A_k^T   (n_k, r_k)        Y_k = s_k U_k B_k^T   (n_k, out)

then scatters Y_k back to the rows it came from. That is the idea behind Punica's SGMV and
S-LoRA's batched kernels: the cost of the adapters is sum_k n_k r_k (in + out), the same as if
every row had its own adapter applied alone, and the base product is never repeated.

Backward, with dY_k the rows of dy that adapter k produced and G_k = dY_k B_k (n_k, r_k):

    dX_k = s_k G_k A_k        dA_k = s_k G_k^T X_k        dB_k = s_k dY_k^T U_k

(the frozen base's share of dx, dy W0, is added by the caller once for the whole batch). Rows of
an adapter that no row uses get zero gradients. Pure NumPy; imports nothing of loralab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["GroupedCache", "group_rows", "grouped_lora_forward", "grouped_lora_backward"]


class GroupedCache(NamedTuple):
    """What `grouped_lora_backward` needs: the rows of each group and their products."""

    groups: list[np.ndarray]  # groups[k]: indices (into the flattened batch) of adapter k's rows
    xs: list[np.ndarray]  # xs[k]: X_k, shape (n_k, in)
    us: list[np.ndarray]  # us[k]: U_k = X_k A_k^T, shape (n_k, r_k)
    As: Sequence[np.ndarray]
    Bs: Sequence[np.ndarray]
    scalings: Sequence[float]
    x_shape: tuple[int, ...]


def group_rows(adapter_index: np.ndarray, n_adapters: int) -> list[np.ndarray]:
    """Indices of the rows of each adapter, from one stable sort of ``adapter_index``.

    Parameters
    ----------
    adapter_index : ndarray of int, shape (N,)
        g_i in {-1, 0, ..., K-1}; -1 means "base only".
    n_adapters : int
        K.

    Returns
    -------
    list of K int arrays; entry k holds the rows whose g_i == k, in increasing order.
    """
    order = np.argsort(adapter_index, kind="stable")
    bounds = np.searchsorted(adapter_index[order], np.arange(n_adapters + 1))
    return [order[bounds[k] : bounds[k + 1]] for k in range(n_adapters)]


def grouped_lora_forward(
    x: np.ndarray,
    adapter_index: np.ndarray,
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    scalings: Sequence[float],
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, GroupedCache]:
    """The low-rank part of a mixed batch: row i gets s_{g_i} B_{g_i} A_{g_i} x_i (or 0).

    Parameters
    ----------
    x : ndarray of shape (..., in)
    adapter_index : int ndarray of shape x.shape[:-1]
        Which adapter each row uses; -1 for none.
    As : K arrays, A_k of shape (r_k, in)
    Bs : K arrays, B_k of shape (out, r_k)
    scalings : K floats, s_k
    out : ndarray of shape (..., out), optional
        Add the low-rank part into it in place (e.g. the base's x W0^T + b, so the batch's
        output is not allocated and summed twice) and return it.

    Returns
    -------
    y : ndarray of shape (..., out), zero on base-only rows (``out`` plus the part, if given)
    cache : GroupedCache for the backward
    """
    in_features = x.shape[-1]
    out_features = Bs[0].shape[0] if len(Bs) else 0
    x2 = x.reshape(-1, in_features)
    g = np.asarray(adapter_index).reshape(-1)
    groups = group_rows(g, len(As))
    if out is None:
        y = np.zeros((x2.shape[0], out_features), dtype=x.dtype)
    else:
        y = out.reshape(-1, out_features)
    xs, us = [], []
    for rows, A, B, s in zip(groups, As, Bs, scalings, strict=True):
        xk = x2[rows]
        uk = xk @ A.T
        y[rows] += s * (uk @ B.T)
        xs.append(xk)
        us.append(uk)
    cache = GroupedCache(groups, xs, us, As, Bs, scalings, x.shape)
    return y.reshape(x.shape[:-1] + (out_features,)), cache


def grouped_lora_backward(
    dy: np.ndarray, cache: GroupedCache, need_dx: bool = True
) -> tuple[np.ndarray | None, list[np.ndarray], list[np.ndarray]]:
    """Backward of `grouped_lora_forward`: (dx of the low-rank part or None, [dA_k], [dB_k]).

    Parameters
    ----------
    dy : ndarray of shape (..., out)
    cache : from `grouped_lora_forward`
    need_dx : bool
        Skip dx when the input needs no gradient.

    Returns
    -------
    dx : ndarray of shape (..., in) or None (the frozen path's dy W0 is not included)
    dAs : K arrays of shape (r_k, in)
    dBs : K arrays of shape (out, r_k)
    """
    dy2 = dy.reshape(-1, dy.shape[-1])
    in_features = cache.x_shape[-1]
    dx = np.zeros((dy2.shape[0], in_features), dtype=dy.dtype) if need_dx else None
    dAs, dBs = [], []
    for rows, xk, uk, A, B, s in zip(
        cache.groups, cache.xs, cache.us, cache.As, cache.Bs, cache.scalings, strict=True
    ):
        dyk = dy2[rows]
        gk = dyk @ B  # (n_k, r_k)
        dAs.append(s * (gk.T @ xk))
        dBs.append(s * (dyk.T @ uk))
        if dx is not None:
            dx[rows] = s * (gk @ A)
    return (None if dx is None else dx.reshape(cache.x_shape)), dAs, dBs
