"""The grouped LoRA op in torch: the twin of `loralab.lora.grouped` (one batch, many adapters).

Row i of the batch goes through adapter g_i (or none, g_i = -1)::

    y_i = s_{g_i} B_{g_i} A_{g_i} x_i

computed as the NumPy op does: the rows sorted by adapter once per batch (a
`loralab.lora.grouped.RowGroups`), one small product pair per adapter on its contiguous segment
X_k of the sorted batch (U_k = s_k X_k A_k^T, Z_k = U_k B_k^T, written into one sorted buffer),
and the rows put back by one gather; with the same hand backward as the NumPy op::

    G_k = s_k dY_k B_k     dX_k = G_k A_k     dA_k = G_k^T X_k     dB_k = dY_k^T U_k

Many adapters with few rows each (a serving batch) run on the *stacked* path instead, as
`loralab.lora.stacked` does in NumPy: the layer keeps its adapters' A in one tensor (K, r, in)
and B^T in one (K, r, out) (`loralab.torch.stacked`, the parameters holding views of their
slices), the batch's rows go into a (K, c, in) block (`loralab.lora.stacked.stack_layout`: a
view when the segments are equal and grouped, a gather of the rows as they came, or a zero-padded
block for unequal segments), and every adapter's products are one batched ``torch.matmul`` each
(`StackedLoRAFunction`; forward U = s X A^T, Z = U B^T; backward G = s dY B, dX = G A,
dA = G^T X, dB^T = U^T dY, each one call for all K adapters). Long segments (more than
`loralab.lora.stacked.MAX_ROWS_PER_SLOT` rows per adapter), too much padding, or adapters that
cannot be stacked (ranks differ) keep the per-adapter products.

`GroupedLoRAFunction` and `StackedLoRAFunction` are checked against plain torch autograd on the
same computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from loralab.lora.grouped import RowGroups, group_batch
from loralab.lora.stacked import stack_layout
from loralab.torch.stacked import TorchAdapterStack

__all__ = [
    "GroupedLoRAFunction",
    "StackedLoRAFunction",
    "StackPlan",
    "stack_plan",
    "grouped_lora",
    "grouped_lora_autograd",
]


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


class StackPlan(NamedTuple):
    """Where the batch's rows sit in the (K, c, ...) blocks of the stacked products
    (`loralab.lora.stacked.StackLayout` with torch index tensors on x's device).

    stack : the layer's `loralab.torch.stacked.TorchAdapterStack` (K slots)
    slots : slots[k], the stack slot of the op's adapter k
    c : rows per slot
    lo, hi : when ``rows`` is None, rows ``lo:hi`` of the flattened batch are the block
    rows : None, or the flattened batch's rows that go into the block, in block order
    fill : None when ``rows`` fill the block exactly; else where each of ``rows`` goes in the
        flattened (K * c) block (the other places are zero padding)
    n : rows of the flattened batch
    """

    stack: TorchAdapterStack
    slots: Sequence[int]
    c: int
    lo: int
    hi: int
    rows: torch.Tensor | None
    fill: torch.Tensor | None
    n: int


def stack_plan(
    x: torch.Tensor, index: Any, stack: TorchAdapterStack, slots: Sequence[int]
) -> StackPlan | None:
    """The stacked path's layout for x (..., in) and ``index`` (as `GroupedLoRAFunction`), with
    the op's adapter k in slot ``slots[k]`` of ``stack``; None when the per-adapter products
    would do as well (`loralab.lora.stacked.stack_layout`)."""
    if not isinstance(index, RowGroups):
        index = group_batch(index.reshape(-1).cpu().numpy(), len(slots))
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    tokens = n // max(index.order.size, 1)
    spans = [(lo * tokens, hi * tokens) for lo, hi in index.segments]
    order = None if index.identity else index.order
    layout = stack_layout(spans, slots, stack.A.shape[0], order, tokens)
    if layout is None:
        return None
    rows, fill = (
        None if a is None else torch.from_numpy(a).to(x.device) for a in (layout.rows, layout.slots)
    )
    return StackPlan(stack, slots, layout.c, layout.lo, layout.hi, rows, fill, n)


def _block(a2: torch.Tensor, plan: StackPlan) -> torch.Tensor:
    """a2's rows (the flattened batch, (N, f)) as the (K, c, f) block of ``plan``."""
    shape = (plan.stack.A.shape[0], plan.c, a2.shape[1])
    if plan.rows is None:
        return a2[plan.lo : plan.hi].reshape(shape)
    if plan.fill is None:
        return a2.index_select(0, plan.rows).reshape(shape)
    block = a2.new_zeros((shape[0] * shape[1], shape[2]))
    block.index_copy_(0, plan.fill, a2.index_select(0, plan.rows))
    return block.reshape(shape)


def _unblock(z: torch.Tensor, plan: StackPlan) -> torch.Tensor:
    """The inverse of `_block`: z (K, c, f) back as (N, f) rows, zero where no slot writes."""
    flat = z.reshape(-1, z.shape[-1])
    if plan.rows is None:
        if plan.lo == 0 and plan.hi == plan.n:
            return flat
        out = flat.new_zeros((plan.n, flat.shape[1]))
        out[plan.lo : plan.hi] = flat
        return out
    if plan.fill is not None:
        flat = flat.index_select(0, plan.fill)
    if plan.rows.numel() == plan.n:  # a permutation of every row: nothing left to zero
        out = flat.new_empty((plan.n, flat.shape[1]))
    else:
        out = flat.new_zeros((plan.n, flat.shape[1]))
    return out.index_copy_(0, plan.rows, flat)


def _add_unblock(out2: torch.Tensor, z: torch.Tensor, plan: StackPlan) -> None:
    """out2 (N, f) += z (K, c, f) on the rows the block came from, in place."""
    flat = z.reshape(-1, z.shape[-1])
    if plan.rows is None:
        out2[plan.lo : plan.hi] += flat
        return
    if plan.fill is not None:
        flat = flat.index_select(0, plan.fill)
    out2.index_add_(0, plan.rows, flat)  # the rows are distinct: a plain sum


class StackedLoRAFunction(torch.autograd.Function):
    """``apply(x, plan, out, A_1..A_K, B_1..B_K)`` -> the low-rank part, shape (..., out_features),
    computed on the stack (`stack_plan`), or ``out`` plus it (in place) when ``out`` is a
    tensor of that shape (say the base's x W0^T + b: no second output to allocate and add).

    A_k, B_k are the adapters' parameters (views of slots ``plan.slots[k]`` of ``plan.stack``),
    given so that their gradients reach them. With X (K_stack, c, in) the block of x's rows and
    s the slots' scalings::

        U = s X A^T (K, c, r)    Z = U B^T (K, c, out)
        G = s dY B               dX = G A        dA = G^T X        dB^T = U^T dY
    """

    @staticmethod
    def forward(ctx, x, plan, out, *AB):
        st = plan.stack
        X = _block(x.reshape(-1, x.shape[-1]), plan)  # (K, c, in)
        # U^T = s A X^T (K, r, c): with r outputs per row, faster with A on the left
        U = torch.matmul(st.A, X.transpose(1, 2)).mul_(st.scalings).transpose(1, 2)
        Z = torch.matmul(U, st.Bt)  # (K, c, out)
        shape = (*x.shape[:-1], st.Bt.shape[-1])
        if out is None:
            y = _unblock(Z, plan).reshape(shape)
        else:
            _add_unblock(out.view(-1, shape[-1]), Z, plan)
            ctx.mark_dirty(out)
            y = out
        ctx.save_for_backward(X, U, st.A, st.Bt, st.scalings)
        ctx.plan, ctx.x_shape = plan, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        X, U, A, Bt, s = ctx.saved_tensors
        plan = ctx.plan
        k = len(plan.slots)
        need_A, need_B = ctx.needs_input_grad[3 : 3 + k], ctx.needs_input_grad[3 + k :]
        dY = _block(dy.reshape(-1, dy.shape[-1]), plan)  # (K, c, out)
        G = torch.matmul(dY, Bt.transpose(1, 2)).mul_(s)  # (K, c, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _unblock(torch.matmul(G, A), plan).reshape(ctx.x_shape)
        dA = torch.matmul(G.transpose(1, 2), X) if any(need_A) else None
        dBt = torch.matmul(U.transpose(1, 2), dY) if any(need_B) else None
        dAs = [dA[j] if need else None for j, need in zip(plan.slots, need_A, strict=True)]
        dBs = [dBt[j].T if need else None for j, need in zip(plan.slots, need_B, strict=True)]
        dout = dy if ctx.needs_input_grad[2] else None
        return (dx, None, dout, *dAs, *dBs)


def grouped_lora(
    x: torch.Tensor,
    index: Any,
    holders: Sequence[Any],
    stack: tuple[TorchAdapterStack, Sequence[int]] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`GroupedLoRAFunction` (or `StackedLoRAFunction`) over the adapters ``holders`` (each with
    lora_A, lora_B, scaling).

    x : (..., in); index : int tensor of shape x.shape[:-1] (-1: no adapter) or a RowGroups (as
    `GroupedLoRAFunction`); holder k's A_k is (r_k, in) and B_k (out, r_k); stack : the same
    adapters stacked (`loralab.torch.stacked.stack_parameters`), holder k in slot ``slots[k]``:
    short segments then run as batched products; out : (..., out), optional, a tensor of the
    caller's own (the base's output) that the low-rank part is added to, in place when stacked.
    Returns the low-rank part, shape (..., out), or ``out`` plus it.
    """
    As = [h.lora_A for h in holders]
    Bs = [h.lora_B for h in holders]
    if stack is not None:
        plan = stack_plan(x, index, *stack)
        if plan is not None and out is not None and not out.is_contiguous():
            out = out.contiguous()  # added into as (N, out) rows: a copy of our own
        if plan is not None:
            return StackedLoRAFunction.apply(x, plan, out, *As, *Bs)
    z = GroupedLoRAFunction.apply(x, index, [h.scaling for h in holders], *As, *Bs)
    return z if out is None else out + z


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
