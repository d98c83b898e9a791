"""The grouped LoRA op: one batch, many adapters, each row through its own (A_k, B_k).

Serving many fine-tuned tasks from one frozen base means a batch whose rows belong to different
adapters. Row i of the batch uses adapter g_i (or none, g_i = -1):

$$h_i = W_0 x_i + b + s_{g_i} B_{g_i} A_{g_i} x_i$$

The base product ``x W0^T`` is shared by every row and computed once for the whole batch: it is
by far the largest matmul (out x in per row). Only the low-rank part differs. The rows are sorted
by adapter ONCE per batch (`group_batch`: one stable ``argsort`` of g, giving the order, the
segment bounds and the inverse permutation, a `RowGroups`), and every layer reuses that order:
it gathers the batch into sorted order once (``xs = x[order]``; nothing at all when the rows
already come sorted), runs one small product pair per adapter on its contiguous segment
X_k = xs[lo_k:hi_k] (n_k, in),

    U_k = s_k X_k A_k^T   (n_k, r_k)        Z_k = U_k B_k^T   (n_k, out)

written straight into one sorted buffer Z (no per-adapter mask, gather or scatter), and adds
``Z[inverse]`` to the base's output in place. That is the idea behind Punica's SGMV and S-LoRA's
batched kernels: the adapters cost sum_k n_k r_k (in + out) multiply-adds, the same as if every
row had its own adapter applied alone, and the base product is never repeated. (What is left
above that bound: one gather of x, one gather-add of Z, and K pairs of small BLAS calls, each of
which reads its A_k and B_k from memory: at one row per adapter that read, not the arithmetic,
is the floor.)

Backward, with dY_k the sorted rows of dy that adapter k produced and G_k = s_k dY_k B_k:

    dX_k = G_k A_k        dA_k = G_k^T X_k        dB_k = dY_k^T U_k

(U_k already carries s_k; the frozen base's share of dx, dy W0, is added by the caller once for
the whole batch). Base-only rows and adapters that no row uses get zero gradients. Pure NumPy;
imports nothing of loralab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from loralab.lora.stacked import CHUNK_ROWS as STACK_CHUNK_ROWS
from loralab.lora.stacked import (
    AdapterStack,
    StackLayout,
    stack_layout,
    stacked_backward,
    stacked_expand_add,
    stacked_shrink,
)

__all__ = [
    "RowGroups",
    "GroupedCache",
    "group_batch",
    "group_rows",
    "grouped_lora_shrink",
    "grouped_lora_expand",
    "grouped_lora_forward",
    "grouped_lora_linear_forward",
    "grouped_lora_linear_serve",
    "grouped_lora_backward",
]


class RowGroups(NamedTuple):
    """A batch's rows sorted by adapter (`group_batch`), computed once, reused by every layer.

    order : int ndarray of shape (N,)
        Row indices, grouped: base-only rows first, then adapter 0's, 1's ..., each group in
        increasing row order (a stable sort).
    segments : list of (lo, hi)
        Adapter k's rows are ``order[lo:hi]`` (positions in the sorted batch); one pair per
        adapter the op runs, in the order of its As and Bs (see `select`).
    inverse : int ndarray of shape (N,)
        Where each row went: ``order[inverse[i]] == i``.
    identity : bool
        The rows already come sorted (``order`` is 0..N-1): no gather is needed at all.
    memo : dict or None
        What the layers sharing these groups would each work out the same way (the stacked
        block's layout, `grouped_lora_shrink`), kept for the batch; None keeps nothing.
    """

    order: np.ndarray
    segments: list[tuple[int, int]]
    inverse: np.ndarray
    identity: bool
    memo: dict | None = None

    def select(self, which: Sequence[int]) -> RowGroups:
        """The same sorted batch with the segments of adapters ``which`` only (a layer that holds
        some of the batch's adapters); the other rows get no low-rank part."""
        return self._replace(segments=[self.segments[k] for k in which], memo={})


def group_batch(adapter_index: np.ndarray, n_adapters: int) -> RowGroups:
    """Sort the rows of a batch by adapter once: a `RowGroups` every layer reuses.

    Parameters
    ----------
    adapter_index : ndarray of int, shape (N,)
        g_i in {-1, 0, ..., K-1}; -1 means "base only".
    n_adapters : int
        K.

    Returns
    -------
    RowGroups with K segments.

    Examples
    --------
    >>> groups = group_batch(np.array([1, -1, 0, 1]), 2)
    >>> groups.order.tolist(), groups.segments, groups.identity
    ([1, 2, 0, 3], [(1, 2), (2, 4)], False)
    """
    g = np.asarray(adapter_index).reshape(-1)
    identity = bool((g[1:] >= g[:-1]).all())  # already grouped (a batch formed so): no sort
    if identity:
        order = inverse = np.arange(g.size)
        grouped = g
    else:
        order = np.argsort(g, kind="stable")
        grouped = g[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
    bounds = np.searchsorted(grouped, np.arange(n_adapters + 1)).tolist()
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))
    return RowGroups(order, segments, inverse, identity, {})


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
    groups = group_batch(adapter_index, n_adapters)
    return [groups.order[lo:hi] for lo, hi in groups.segments]


class Stacked(NamedTuple):
    """The stacked path's part of a `GroupedCache` (`loralab.lora.stacked`)."""

    layout: StackLayout
    stack: AdapterStack
    slots: Sequence[int]  # slots[k]: adapter k's place in the stack
    X: np.ndarray  # (K_stack, c, in), the rows in blocks
    U: np.ndarray  # (K_stack, c, r), s X A^T
    sorted: bool  # the cache's xs (and the layout) are the sorted batch; else the batch as it came


class GroupedCache(NamedTuple):
    """What `grouped_lora_backward` needs: the sorted batch and each adapter's products."""

    groups: RowGroups
    tokens: int  # rows of the flattened x per row of the batch (the op's unit of sorting)
    xs: np.ndarray  # the flattened x in sorted order (as it came when stacked), (N tokens, in)
    us: list[np.ndarray]  # us[k]: U_k = s_k X_k A_k^T, shape (n_k, r_k) ([] when stacked)
    As: Sequence[np.ndarray]
    Bs: Sequence[np.ndarray]
    scalings: Sequence[float]
    x_shape: tuple[int, ...]
    stacked: Stacked | None = None  # the products ran on stacked adapters


def _sorted(a2: np.ndarray, groups: RowGroups) -> np.ndarray:
    """a2 (N * tokens, f) with its batch rows in ``groups.order``: a view when already sorted."""
    if groups.identity:
        return a2
    n = groups.order.size
    return a2.reshape(n, -1)[groups.order].reshape(a2.shape)


def _unsorted(zs: np.ndarray, groups: RowGroups) -> np.ndarray:
    """The inverse of `_sorted`: rows back where they came from."""
    if groups.identity:
        return zs
    n = groups.order.size
    return zs.reshape(n, -1)[groups.inverse].reshape(zs.shape)


def _gaps(segments: list[tuple[int, int]], tokens: int, n: int) -> list[tuple[int, int]]:
    """The spans of the n flattened rows that no segment covers (base-only rows, adapters this
    op lacks), in flattened-row units."""
    out, at = [], 0
    for lo, hi in sorted(segments):
        if lo * tokens > at:
            out.append((at, lo * tokens))
        at = max(at, hi * tokens)
    if at < n:
        out.append((at, n))
    return out


def _zero_gaps(zs: np.ndarray, segments: list[tuple[int, int]], tokens: int) -> None:
    """Zero the rows of ``zs`` no segment writes."""
    for lo, hi in _gaps(segments, tokens, zs.shape[0]):
        zs[lo:hi] = 0


def _as_groups(x_shape: tuple[int, ...], adapter_index, n_adapters: int) -> RowGroups:
    if isinstance(adapter_index, RowGroups):
        return adapter_index
    return group_batch(np.broadcast_to(adapter_index, x_shape[:-1]), n_adapters)


def _layout(
    groups: RowGroups, tokens: int, slots: Sequence[int], n_slots: int, sort_whole_batch: bool
) -> tuple[StackLayout | None, bool]:
    """The stacked block's layout for ``groups`` (`stack_layout`; None: the stacked path would
    not pay) and whether it is the whole sorted batch, worked out once per batch: every layer
    with the same adapters in the same slots finds it in ``groups.memo``."""
    key = (tokens, n_slots, slots if isinstance(slots, range) else tuple(slots), sort_whole_batch)
    memo = groups.memo
    found = None if memo is None else memo.get(key)
    if found is not None:
        return found
    spans = (
        groups.segments
        if tokens == 1
        else [(lo * tokens, hi * tokens) for lo, hi in groups.segments]
    )
    layout = stack_layout(spans, slots, n_slots)
    whole = groups.identity or (sort_whole_batch and layout is not None and layout.rows is None)
    if layout is not None and not whole:  # the block's rows straight from x2, as it came
        layout = stack_layout(spans, slots, n_slots, groups.order, tokens)
    if memo is not None:
        memo[key] = (layout, whole)
    return layout, whole


def grouped_lora_shrink(
    x: np.ndarray,
    adapter_index: np.ndarray | RowGroups,
    As: Sequence[np.ndarray],
    scalings: Sequence[float],
    stack: tuple[AdapterStack, Sequence[int]] | None = None,
    sort_whole_batch: bool = False,
) -> GroupedCache:
    """The first half of `grouped_lora_forward` (Punica's "shrink"): the sorted batch and
    U_k = s_k X_k A_k^T for every adapter, in a cache for `grouped_lora_expand` and the backward.

    Run it before the base's big product when you can: x is then still in the CPU's cache.
    Parameters as `grouped_lora_forward`; ``sort_whole_batch`` (`grouped_lora_linear_forward`):
    on the stacked path, when the sorted batch is the block itself, sort the whole batch (the
    base product then runs on it and one gather puts its output back) rather than gather the
    block's rows and add the products back through an index.
    """
    groups = _as_groups(x.shape, adapter_index, len(As))
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0] // max(groups.order.size, 1)
    if stack is not None:
        st, slots = stack
        layout, whole = _layout(groups, tokens, slots, st.A.shape[0], sort_whole_batch)
        if layout is not None:
            xs = _sorted(x2, groups) if whole else x2
            X, U = stacked_shrink(xs, layout, st)
            part = Stacked(layout, st, slots, X, U, whole)
            return GroupedCache(groups, tokens, xs, [], As, (), scalings, x.shape, part)
    spans = [(lo * tokens, hi * tokens) for lo, hi in groups.segments]
    xs = _sorted(x2, groups)
    ranks = {A.shape[0] for A in As}
    if len(ranks) == 1 and len(set(scalings)) == 1:
        # the common case: one (rows, r) buffer, and s applied once to all of it
        dtype = np.result_type(xs, As[0])
        U = np.zeros((xs.shape[0], ranks.pop()), dtype=dtype)
        for (lo, hi), A in zip(spans, As, strict=True):
            np.matmul(xs[lo:hi], A.T, out=U[lo:hi])
        U *= scalings[0]
        us = [U[lo:hi] for lo, hi in spans]
    else:
        us = []
        for (lo, hi), A, s in zip(spans, As, scalings, strict=True):
            uk = xs[lo:hi] @ A.T
            uk *= s  # on the (n_k, r_k) product: the cheapest place for s_k
            us.append(uk)
    return GroupedCache(groups, tokens, xs, us, As, (), scalings, x.shape)


def grouped_lora_expand(
    cache: GroupedCache, Bs: Sequence[np.ndarray], out: np.ndarray | None = None
) -> tuple[np.ndarray, GroupedCache]:
    """The second half of `grouped_lora_forward` (Punica's "expand"): Z_k = U_k B_k^T written
    into one sorted buffer, put back in row order and added to ``out`` (or returned).

    Parameters
    ----------
    cache : from `grouped_lora_shrink`
    Bs : K arrays, B_k of shape (out, r_k)
    out : ndarray of shape (..., out), optional

    Returns
    -------
    y : ndarray of shape (..., out); cache : the same cache, with Bs, for the backward
    """
    groups, tokens, us = cache.groups, cache.tokens, cache.us
    out_features = Bs[0].shape[0] if len(Bs) else 0
    n = cache.xs.shape[0]
    shape = cache.x_shape[:-1] + (out_features,)
    if cache.stacked is not None:
        st = cache.stacked
        cache = cache._replace(Bs=Bs)
        put_back = st.sorted and not groups.identity  # products in sorted order, then unsorted
        if out is None or put_back:
            zs = np.zeros((n, out_features), dtype=np.result_type(st.U, st.stack.Bt))
        else:  # rows as they came: added straight into place
            zs = out.reshape(-1, out_features)
        stacked_expand_add(zs, st.U, st.layout, st.stack)
        if put_back:
            zs = _unsorted(zs, groups)
            if out is not None:
                y = out.reshape(-1, out_features)
                y += zs
                zs = y
        return zs.reshape(shape), cache
    dtype = np.result_type(*us[:1], *Bs[:1]) if us else cache.xs.dtype
    zs = np.empty((n, out_features), dtype=dtype)
    _zero_gaps(zs, groups.segments, tokens)
    for (lo, hi), uk, B in zip(groups.segments, us, Bs, strict=True):
        np.matmul(uk, B.T, out=zs[lo * tokens : hi * tokens])
    cache = cache._replace(Bs=Bs)
    if out is None:
        if not groups.identity:
            zs = _unsorted(zs, groups)
        return zs.reshape(shape), cache
    y = out.reshape(-1, out_features)
    y += _unsorted(zs, groups)
    return y.reshape(shape), cache


def grouped_lora_forward(
    x: np.ndarray,
    adapter_index: np.ndarray | RowGroups,
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    scalings: Sequence[float],
    out: np.ndarray | None = None,
    stack: tuple[AdapterStack, Sequence[int]] | None = None,
) -> tuple[np.ndarray, GroupedCache]:
    """The low-rank part of a mixed batch: row i gets s_{g_i} B_{g_i} A_{g_i} x_i (or 0).

    `grouped_lora_shrink` then `grouped_lora_expand`.

    Parameters
    ----------
    x : ndarray of shape (..., in)
    adapter_index : int ndarray of shape x.shape[:-1], or RowGroups
        Which adapter each row uses (-1 for none); or the batch already sorted by `group_batch`
        over the first axis of x (its rows: every token of a row shares the row's adapter),
        with one segment per adapter of As.
    As : K arrays, A_k of shape (r_k, in)
    Bs : K arrays, B_k of shape (out, r_k)
    scalings : K floats, s_k
    out : ndarray of shape (..., out), optional
        Add the low-rank part into it in place (e.g. the base's x W0^T + b, so the batch's
        output is not allocated and summed twice) and return it.
    stack : (AdapterStack, slots), optional
        The same adapters stacked (`loralab.lora.stacked.stack_parameters`; adapter k is slot
        ``slots[k]``): short segments then run as batched products, one call for all adapters.

    Returns
    -------
    y : ndarray of shape (..., out), zero on base-only rows (``out`` plus the part, if given)
    cache : GroupedCache for the backward
    """
    return grouped_lora_expand(grouped_lora_shrink(x, adapter_index, As, scalings, stack), Bs, out)


CHUNK_ROWS = 64
"""Rows per up-projection product in `grouped_lora_linear_forward`: its (rows, out) result is
added while it is still in the CPU's cache, instead of going to memory and back."""
SHORT_SEGMENT = 8
"""Below this many rows per adapter on average, `_add_expand` writes every product into one
buffer and adds it once (one call per adapter instead of two)."""


def _add_expand(
    ys: np.ndarray, cache: GroupedCache, Bs: Sequence[np.ndarray], b: np.ndarray | None = None
) -> None:
    """ys[segment k] += U_k B_k^T for every adapter, and ys += b on every row if b is given,
    in place.

    Few adapters (segments of SHORT_SEGMENT rows or more on average): each product (plus b) is
    added CHUNK_ROWS rows at a time, while it is in the CPU's cache, so b costs no pass of its
    own. Many adapters (short segments): every product goes into one buffer, added once, so each
    adapter costs one call, not two.
    """
    if cache.stacked is not None:
        if b is not None:  # (folding b into the chunks measured slower: ys is then warm)
            ys += b
        st = cache.stacked
        stacked_expand_add(ys, st.U, st.layout, st.stack)
        return
    tokens, segments = cache.tokens, cache.groups.segments
    spans = [(lo * tokens, hi * tokens) for lo, hi in segments]
    rows = sum(hi - lo for lo, hi in spans)
    if rows >= SHORT_SEGMENT * len(spans):
        for (lo, hi), uk, B in zip(spans, cache.us, Bs, strict=True):
            for at in range(lo, hi, CHUNK_ROWS):
                end = min(at + CHUNK_ROWS, hi)
                zk = uk[at - lo : end - lo] @ B.T
                if b is not None:
                    zk += b
                ys[at:end] += zk
        if b is not None:
            for lo, hi in _gaps(segments, tokens, ys.shape[0]):
                ys[lo:hi] += b
        return
    if b is not None:
        ys += b
    zs = np.empty(ys.shape, dtype=np.result_type(*cache.us[:1], *Bs[:1]))
    _zero_gaps(zs, segments, tokens)
    for (lo, hi), uk, B in zip(spans, cache.us, Bs, strict=True):
        np.matmul(uk, B.T, out=zs[lo:hi])
    ys += zs


def grouped_lora_linear_forward(
    x: np.ndarray,
    W0: np.ndarray,
    b: np.ndarray | None,
    adapter_index: np.ndarray | RowGroups,
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    scalings: Sequence[float],
    stack: tuple[AdapterStack, Sequence[int]] | None = None,
) -> tuple[np.ndarray, GroupedCache]:
    """A mixed batch through a Linear base, fused: h_i = W0 x_i + b + s_{g_i} B_{g_i} A_{g_i} x_i.

    The whole layer runs on the sorted batch: ``xs = x[order]`` once, the low-rank products
    U_k on it (`grouped_lora_shrink`, while xs is in the CPU's cache), the base's
    ``ys = xs W0^T + b`` (the same rows, permuted: the same work), then ``ys[segment k] +=
    U_k B_k^T`` in place on contiguous slices, and one gather puts the rows back. When the rows
    already come grouped by adapter there is no gather at all.

    Parameters
    ----------
    x : ndarray of shape (..., in)
    W0 : ndarray of shape (out, in)
    b : ndarray of shape (out,) or None
    adapter_index, As, Bs, scalings, stack : as `grouped_lora_forward`

    Returns
    -------
    h : ndarray of shape (..., out)
    cache : GroupedCache for `grouped_lora_backward` (its dx adds dy W0 when given W0)
    """
    cache = grouped_lora_shrink(x, adapter_index, As, scalings, stack, sort_whole_batch=True)
    ys = cache.xs @ W0.T
    _add_expand(ys, cache, Bs, b)  # + b too, in the same pass when it can
    as_came = cache.stacked is not None and not cache.stacked.sorted
    h = ys if as_came else _unsorted(ys, cache.groups)
    return h.reshape(x.shape[:-1] + (W0.shape[0],)), cache._replace(Bs=Bs)


class _ServePlan(NamedTuple):
    """`grouped_lora_linear_serve`'s plan for one batch and one stack: the block is the sorted
    rows lo..hi as (k, c, in), and Z = U B^T is added ``chunks`` at a time, (k0, k1, row0, row1)
    each, into a (step, c, out) buffer (`loralab.lora.stacked.stacked_expand_add`'s chunks)."""

    whole: bool
    k: int
    c: int
    lo: int
    hi: int
    step: int
    chunks: tuple[tuple[int, int, int, int], ...]


def _serve_plan(
    groups: RowGroups, tokens: int, slots: Sequence[int], n_slots: int
) -> _ServePlan | None:
    """The plan (worked out once per batch, kept in ``groups.memo``), or None when the block is
    not one contiguous run of the sorted rows (padded segments, some of the stack's slots):
    then `grouped_lora_linear_forward` serves it."""
    key = ("serve", tokens, n_slots, slots if isinstance(slots, range) else tuple(slots))
    memo = groups.memo
    if memo is not None and key in memo:
        return memo[key]
    layout, whole = _layout(groups, tokens, slots, n_slots, True)
    plan = None
    if layout is not None and layout.rows is None and layout.slots is None:
        c, lo = layout.c, layout.lo
        step = max(1, STACK_CHUNK_ROWS // c)  # adapters per chunk, as stacked_expand_add
        chunks = tuple(
            (k0, min(k0 + step, n_slots), lo + k0 * c, lo + min(k0 + step, n_slots) * c)
            for k0 in range(0, n_slots, step)
        )
        plan = _ServePlan(whole, n_slots, c, lo, layout.hi, min(step, n_slots), chunks)
    if memo is not None:
        memo[key] = plan
    return plan


def grouped_lora_linear_serve(
    x: np.ndarray,
    W0: np.ndarray,
    b: np.ndarray | None,
    adapter_index: np.ndarray | RowGroups,
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    scalings: Sequence[float],
    stack: tuple[AdapterStack, Sequence[int]] | None = None,
) -> np.ndarray:
    """h of `grouped_lora_linear_forward`, bit for bit, without the cache a backward needs: a
    serving batch (no gradient).

    On stacked adapters whose block is a contiguous run of the sorted batch (every adapter of
    the stack, as many rows each), the layer is the same NumPy calls in the same order (the
    down product on the block, the base product, + b, the up product added a chunk at a time)
    with nothing around them: the plan is worked out once per batch and kept in
    ``RowGroups.memo`` for every layer. Between big BLAS calls that push it out of the CPU's
    caches, each line of Python costs several times what it costs warm. Any other batch runs
    `grouped_lora_linear_forward`. The bodies of `loralab.lora.stacked.stacked_shrink` and
    `stacked_expand_add` are written out here, not called: calling them (each working out its
    layout's case and its chunks again) kept under half of the saving in A/B runs. The tests
    hold the two to the same bits.

    Parameters and shapes as `grouped_lora_linear_forward`; returns h of shape (..., out).
    """
    plan = None
    if stack is not None and isinstance(adapter_index, RowGroups):
        groups, (st, slots) = adapter_index, stack
        x2 = x.reshape(-1, x.shape[-1])
        tokens = x2.shape[0] // max(groups.order.size, 1)
        plan = _serve_plan(groups, tokens, slots, st.A.shape[0])
    if plan is None:
        return grouped_lora_linear_forward(x, W0, b, adapter_index, As, Bs, scalings, stack)[0]
    xs = _sorted(x2, groups) if plan.whole else x2
    X = xs[plan.lo : plan.hi].reshape(plan.k, plan.c, xs.shape[1])
    Ut = np.matmul(st.A, X.transpose(0, 2, 1))  # (`stacked_shrink`)
    Ut *= st.scalings.astype(Ut.dtype, copy=False)
    U = Ut.transpose(0, 2, 1)
    ys = xs @ W0.T
    if b is not None:
        ys += b
    out = ys.shape[1]
    buf = np.empty((plan.step, plan.c, out), dtype=np.result_type(U, st.Bt))
    for k0, k1, row0, row1 in plan.chunks:  # (`stacked_expand_add`)
        z = np.matmul(U[k0:k1], st.Bt[k0:k1], out=buf[: k1 - k0]).reshape(-1, out)
        part = ys[row0:row1]
        part += z
    h = _unsorted(ys, groups) if plan.whole else ys
    return h.reshape(x.shape[:-1] + (out,))


def grouped_lora_backward(
    dy: np.ndarray, cache: GroupedCache, need_dx: bool = True, W0: np.ndarray | None = None
) -> tuple[np.ndarray | None, list[np.ndarray], list[np.ndarray]]:
    """Backward of `grouped_lora_forward`: (dx of the low-rank part or None, [dA_k], [dB_k]).

    Parameters
    ----------
    dy : ndarray of shape (..., out)
    cache : from `grouped_lora_forward` (or `grouped_lora_linear_forward`)
    need_dx : bool
        Skip dx when the input needs no gradient.
    W0 : ndarray of shape (out, in), optional
        Add the frozen base's share dy W0 to dx (computed on the sorted rows, like the forward
        of `grouped_lora_linear_forward`).

    Returns
    -------
    dx : ndarray of shape (..., in) or None (dy W0 included only if W0 is given)
    dAs : K arrays of shape (r_k, in)
    dBs : K arrays of shape (out, r_k)
    """
    groups, tokens, xs = cache.groups, cache.tokens, cache.xs
    dys = dy.reshape(-1, dy.shape[-1])
    as_came = cache.stacked is not None and not cache.stacked.sorted
    if not as_came:  # (the stacked products of a batch not sorted index the rows as they came)
        dys = _sorted(dys, groups)
    dxs = None
    if need_dx and W0 is not None:
        dxs = dys @ W0
    elif need_dx and cache.stacked is not None:  # the stacked products add into it
        dxs = np.zeros((dys.shape[0], xs.shape[1]), dtype=np.result_type(dys, xs))
    elif need_dx:
        dxs = np.empty((dys.shape[0], xs.shape[1]), dtype=np.result_type(dys, xs))
        _zero_gaps(dxs, groups.segments, tokens)
    if cache.stacked is not None:
        st = cache.stacked
        dA, dBt = stacked_backward(dys, st.X, st.U, st.layout, st.stack, dxs)
        dAs, dBs = [dA[k] for k in st.slots], [dBt[k].T for k in st.slots]
    else:
        dAs, dBs = _backward_loop(dys, cache, dxs, W0 is not None)
    if dxs is None:
        return None, dAs, dBs
    return (dxs if as_came else _unsorted(dxs, groups)).reshape(cache.x_shape), dAs, dBs


def _backward_loop(
    dys: np.ndarray, cache: GroupedCache, dxs: np.ndarray | None, add: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """dA_k, dB_k one adapter at a time, and dxs[segment k] (+)= G_k A_k in place."""
    tokens, xs = cache.tokens, cache.xs
    dAs, dBs = [], []
    for (lo, hi), uk, A, B, s in zip(
        cache.groups.segments, cache.us, cache.As, cache.Bs, cache.scalings, strict=True
    ):
        lo, hi = lo * tokens, hi * tokens
        dyk = dys[lo:hi]
        gk = dyk @ B  # (n_k, r_k)
        gk *= s
        dAs.append(gk.T @ xs[lo:hi])
        dBs.append(dyk.T @ uk)
        if dxs is not None and add:
            dxs[lo:hi] += gk @ A
        elif dxs is not None:
            np.matmul(gk, A, out=dxs[lo:hi])
    return dAs, dBs
