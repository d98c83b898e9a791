"""The grouped op on stacked adapters: every adapter's small products in one batched call.

`loralab.lora.grouped` runs one pair of small products per adapter, each its own BLAS call
from Python. With many adapters and few rows each (a serving batch: K = 256 adapters, one row
each), those calls cost more than their arithmetic: each pays Python's and BLAS's overhead to
read A_k (r, in) and B_k (out, r) and do one row of work. Punica's SGMV kernel and S-LoRA's
batched kernels do all adapters in one launch instead. NumPy's version of one launch is a
batched ``np.matmul`` over a stack:

    X (K, c, in) @ A^T (K, in, r) -> U (K, c, r)        U @ B^T (K, r, out) -> Z (K, c, out)

one C loop over the K adapters, no Python between them. It needs two things:

- the adapters' weights side by side in one array: A (K, r, in), and B stored transposed,
  B^T (K, r, out), so that each row of Z is a sum of r contiguous rows of B^T (with B (out, r)
  row by row, each of the out outputs is a dot product of length r: about twice as slow on
  this machine, measured in the benchmarks). Copying K adapters into a stack for every batch
  would cost as much as the products themselves, so the layer keeps them stacked
  (`AdapterStack`, built by `stack_parameters`): each adapter's parameter holds a *view* of its
  slice (``B_k`` the transposed view ``Bt[k].T``, of shape (out, r) in column-major order), so
  an optimizer's in-place step, or any in-place edit, changes the stack too. A parameter given
  a new array (``p.data = ...``) is seen (the views are checked by identity, K cheap
  comparisons) and the stack is rebuilt on the next batch;
- each adapter's rows in a (K, c, in) block: when every adapter has the same number of rows c
  and the rows come sorted (`loralab.lora.grouped.group_batch`), the sorted batch *is* that
  block (a reshape, no copy). Otherwise (`stack_layout`) each adapter's rows are copied into a
  zero-padded block of c = max n_k rows, when the padding at most doubles the rows; an
  adapter of the stack that has no rows in this batch is a slot of zeros. Zero rows add
  nothing to the outputs or to dA, dB, so the padding is exact.

Backward, on the same blocks (dY the rows of dy, G = s dY B):

    dX = G A        dA = G^T X        dB^T = U^T dY

each one batched call. Pure NumPy; imports nothing of loralab.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, is_, sub
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "AdapterStack",
    "StackLayout",
    "stack_parameters",
    "stack_layout",
    "stacked_shrink",
    "stacked_expand_add",
    "stacked_backward",
    "MAX_ROWS_PER_SLOT",
    "MAX_PADDING",
]

MAX_ROWS_PER_SLOT = 64
"""Above this many rows per adapter, the per-adapter products of `loralab.lora.grouped` are
as fast (each BLAS call has enough rows to pay for itself), and they add each product into the
output while it is still in the CPU's cache; the stacked path is for short segments."""

CHUNK_ROWS = 64
"""Rows of U B^T made and added at a time (`stacked_expand_add`): 256 KiB at out = 1024, float32."""

MAX_PADDING = 2.0
"""The stacked path pads every adapter to the longest one's rows; it runs only while the padded
block holds at most this many times the batch's real rows."""


class AdapterStack(NamedTuple):
    """A layer's adapters side by side, as one array each (`stack_parameters`).

    A : ndarray of shape (K, r, in)
    Bt : ndarray of shape (K, r, out): B_k transposed, ``Bt[k] = B_k^T``
    scalings : ndarray of shape (K, 1, 1), s_k
    views : tuple of the 2K arrays the adapters' parameters hold (A_0..A_{K-1}, B_0..B_{K-1}),
        ``A[k]`` and ``Bt[k].T``: checked by identity to tell that the stack is still theirs.
    scaling_key : tuple of K floats, the s_k the stack was built with
    """

    A: np.ndarray
    Bt: np.ndarray
    scalings: np.ndarray
    views: tuple[np.ndarray, ...]
    scaling_key: tuple[float, ...]


def stack_parameters(
    A_params: Sequence[Any],
    B_params: Sequence[Any],
    scalings: Sequence[float],
    previous: AdapterStack | None = None,
) -> AdapterStack | None:
    """The adapters' A and B stacked, their parameters pointed at the stack's slices.

    Parameters
    ----------
    A_params, B_params : K objects with a ``.data`` ndarray each (the engine's Parameters):
        A_k of shape (r, in), B_k of shape (out, r)
    scalings : K floats, s_k
    previous : the stack this returned last time, if any

    Returns
    -------
    ``previous`` when every parameter still holds its view of it (nothing copied); else a new
    stack (the parameters' arrays copied in once, and each parameter's ``.data`` replaced by its
    slice, ``Bt[k].T`` for B_k: the same values, now stored in the stack); None when the
    adapters cannot be stacked (their ranks, shapes or dtypes differ).
    """
    data = attrgetter("data")
    datas = (*map(data, A_params), *map(data, B_params))
    key = tuple(scalings)
    if (
        previous is not None
        and len(previous.views) == len(datas)
        and previous.scaling_key == key
        and all(map(is_, datas, previous.views))  # (map: a serving batch checks 2K per layer)
    ):
        return previous
    k = len(A_params)
    if k == 0:
        return None
    for part in (datas[:k], datas[k:]):
        first = part[0]
        if any(
            not isinstance(d, np.ndarray) or d.shape != first.shape or d.dtype != first.dtype
            for d in part
        ):
            return None
    # filled slice by slice: np.stack would keep the inputs' memory order (B^T's columns)
    A = np.empty((k, *datas[0].shape), dtype=datas[0].dtype)
    Bt = np.empty((k, *datas[k].T.shape), dtype=datas[k].dtype)
    for i in range(k):
        A[i], Bt[i] = datas[i], datas[k + i].T
    views = []
    for i, p in enumerate(A_params):
        p.data = A[i]
        views.append(p.data)
    for i, p in enumerate(B_params):
        p.data = Bt[i].T
        views.append(p.data)
    s = np.asarray(key, dtype=np.float64).reshape(k, 1, 1)
    return AdapterStack(A, Bt, s, tuple(views), key)


class StackLayout(NamedTuple):
    """Where the batch's rows sit in the (K, c, ...) blocks of the stacked products.

    c : rows per adapter slot
    lo, hi : when the rows already are the block: rows ``lo:hi`` of the batch reshape to
        (K, c, ...), nothing is copied
    rows : None then; else int ndarray, the batch's rows that go into the block, in block order
    slots : None when ``rows`` fill the block exactly; else int ndarray, where each of ``rows``
        goes in the flattened (K * c) block (the other slots are zero padding)
    """

    c: int
    lo: int
    hi: int
    rows: np.ndarray | None
    slots: np.ndarray | None


def stack_layout(
    spans: Sequence[tuple[int, int]],
    slots: Sequence[int],
    n_slots: int,
    order: np.ndarray | None = None,
    tokens: int = 1,
) -> StackLayout | None:
    """The block layout for adapters of stack slots ``slots`` with rows ``spans`` of the sorted
    batch (flattened), or None when the stacked path would not pay (`MAX_ROWS_PER_SLOT`,
    `MAX_PADDING`).

    ``order`` (the sort, `loralab.lora.grouped.RowGroups.order`, over batch rows of ``tokens``
    flattened rows each): the layout then indexes the batch as it arrived, so its rows are
    gathered straight into the block and the products added straight back, with no sorted copy
    of the batch in between.

    Examples
    --------
    >>> stack_layout([(0, 2), (2, 4)], [0, 1], 2)  # two adapters, two rows each: a reshape
    StackLayout(c=2, lo=0, hi=4, rows=None, slots=None)
    >>> lay = stack_layout([(0, 1), (1, 3)], [0, 1], 2)  # 1 and 2 rows: padded to 2 each
    >>> lay.c, lay.rows.tolist(), lay.slots.tolist()
    (2, [0, 1, 2], [0, 2, 3])
    >>> stack_layout([(0, 1), (1, 2)], [0, 1], 2, order=np.array([1, 0])).rows.tolist()
    [1, 0]
    """
    if len(spans) != len(slots):
        raise ValueError(f"stack_layout: {len(spans)} spans for {len(slots)} slots")
    if slots == range(n_slots) or list(slots) == list(range(n_slots)):  # every slot, in order
        starts, ends = map(list, zip(*spans)) if spans else ([], [])
        counts = list(map(sub, ends, starts))
    else:
        counts, starts = [0] * n_slots, [0] * n_slots
        for (lo, hi), k in zip(spans, slots, strict=True):
            counts[k], starts[k] = hi - lo, lo
    c = max(counts, default=0)
    total = sum(counts)
    if c == 0 or c > MAX_ROWS_PER_SLOT or n_slots * c > MAX_PADDING * total:
        return None
    lo = starts[0]
    if counts.count(c) == n_slots and starts == list(range(lo, lo + n_slots * c, c)):
        layout = StackLayout(c, lo, lo + n_slots * c, None, None)
        if order is None:
            return layout
        positions = np.arange(lo, lo + n_slots * c)
    else:
        n, start = np.array(counts), np.array(starts)
        j = np.arange(c)
        valid = j < n[:, None]  # (K, c)
        positions = (start[:, None] + j)[valid]
        layout = StackLayout(c, 0, 0, positions, np.flatnonzero(valid.reshape(-1)))
    if order is None:
        return layout
    if tokens == 1:
        rows = order[positions]
    else:  # sorted flattened row p is token p % tokens of batch row order[p // tokens]
        rows = order[positions // tokens] * tokens + positions % tokens
    return layout._replace(lo=0, hi=0, rows=rows)


def _block(a2: np.ndarray, layout: StackLayout, k: int) -> np.ndarray:
    """a2's rows (the batch, flattened) as the (K, c, f) block of ``layout``."""
    shape = (k, layout.c, a2.shape[1])
    if layout.rows is None:
        return a2[layout.lo : layout.hi].reshape(shape)
    if layout.slots is None:
        return a2[layout.rows].reshape(shape)
    block = np.zeros((k * layout.c, a2.shape[1]), dtype=a2.dtype)
    block[layout.slots] = a2[layout.rows]
    return block.reshape(shape)


def _add_block(a2: np.ndarray, block: np.ndarray, layout: StackLayout) -> None:
    """a2[rows] += the block's rows, in place (the inverse of `_block`)."""
    flat = block.reshape(-1, block.shape[-1])
    if layout.rows is None:
        part = a2[layout.lo : layout.hi]
        part += flat
    elif layout.slots is None:
        a2[layout.rows] += flat  # the rows are distinct: a plain += is exact
    else:
        a2[layout.rows] += flat[layout.slots]


def stacked_shrink(
    xs: np.ndarray, layout: StackLayout, stack: AdapterStack
) -> tuple[np.ndarray, np.ndarray]:
    """X (K, c, in), the block of the batch's rows ``xs`` (N, in; as ``layout`` indexes them),
    and U = s X A^T (K, c, r)."""
    k = stack.A.shape[0]
    X = _block(xs, layout, k)
    # U^T = A X^T, (K, r, c): with r = 8 outputs per row, BLAS does better with A on the left
    Ut = np.matmul(stack.A, X.transpose(0, 2, 1))
    Ut *= stack.scalings.astype(Ut.dtype, copy=False)
    return X, Ut.transpose(0, 2, 1)


def stacked_expand_add(
    ys: np.ndarray, U: np.ndarray, layout: StackLayout, stack: AdapterStack
) -> None:
    """ys[rows] += U B^T, in place: ys (N, out), U (K, c, r).

    Unless padded, Z = U B^T is made CHUNK_ROWS rows at a time into one small buffer and added
    while it is still in the CPU's cache (no (N, out) temporary).
    """
    if layout.slots is not None:  # padded: one product, its real rows added
        _add_block(ys, np.matmul(U, stack.Bt), layout)
        return
    k, c = U.shape[0], layout.c
    step = max(1, CHUNK_ROWS // c)  # adapters per chunk
    buf = np.empty((min(step, k), c, ys.shape[1]), dtype=np.result_type(U, stack.Bt))
    for k0 in range(0, k, step):
        k1 = min(k0 + step, k)
        z = np.matmul(U[k0:k1], stack.Bt[k0:k1], out=buf[: k1 - k0]).reshape(-1, ys.shape[1])
        if layout.rows is None:
            part = ys[layout.lo + k0 * c : layout.lo + k1 * c]
            part += z
        else:
            ys[layout.rows[k0 * c : k1 * c]] += z


def stacked_backward(
    dys: np.ndarray,
    X: np.ndarray,
    U: np.ndarray,
    layout: StackLayout,
    stack: AdapterStack,
    dxs: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """dA (K, r, in) and dB^T (K, r, out) of every slot, and dxs[rows] += G A in place if given.

    dys : (N, out) the upstream gradient (rows as ``layout`` indexes them); X, U : from
    `stacked_shrink`; dxs : (N, in) or None.
    """
    k = stack.A.shape[0]
    dY = _block(dys, layout, k)  # (K, c, out)
    G = np.matmul(dY, stack.Bt.transpose(0, 2, 1))  # (K, c, r)
    G *= stack.scalings.astype(G.dtype, copy=False)
    if layout.c == 1:  # outer products: NumPy's matmul runs them without BLAS, einsum is faster
        dA = np.einsum("kcr,kci->kri", G, X)
        dBt = np.einsum("kcr,kco->kro", U, dY)
    else:
        dA = np.matmul(G.transpose(0, 2, 1), X)
        dBt = np.matmul(U.transpose(0, 2, 1), dY)
    if dxs is not None:
        _add_block(dxs, np.matmul(G, stack.A), layout)
    return dA, dBt
