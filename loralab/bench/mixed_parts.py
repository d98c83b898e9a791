"""Section 5's floors and per-part profile (`loralab.bench.sections.mixed_batch` runs them).

The floors, each a side timed beside the mixed batch: the low-rank products of every layer
alone (`products_alone_side`), one read of every layer's stacked adapters (`bytes_floor_side`),
the same read in place, between the base products where the mixed forward reads them
(`bytes_in_place_side`), and the same forward as plain NumPy calls, against the base forward as
plain NumPy calls (`plain_numpy_side`). `read_bandwidth` measures how fast a streaming read
runs over a buffer of a given size: the CPU's caches hold a small one, not a large one.

`profile_layer` times the parts of one layer's mixed forward alone, the way it was before
issue 21 (a sort in every layer, a gather ``x[rows]`` and a scatter ``y[rows] +=`` per adapter)
and the way it is now (one batched product per layer on the stacked adapters); tutorial 12
draws the same profile.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from loralab.bench.config import ALPHA, N_LAYERS, RANK
from loralab.bench.machine import blas_threads
from loralab.bench.timing import time_alternating
from loralab.lora import adapter_order, lora_layers
from loralab.lora import grouped as G
from loralab.lora import stacked as ST
from loralab.lora.linear_shared import route_rows
from loralab.nn.module import Parameter

__all__ = [
    "PARTS",
    "products_alone_side",
    "bytes_floor_side",
    "bytes_in_place_side",
    "read_bandwidth",
    "plain_numpy_side",
    "profile_layer",
]

PARTS = ("sort rows", "gathers and scatters", "down products x A^T", "up products U B^T + add")
"""The parts of a layer's low-rank work that `profile_layer` times (besides the base product)."""


def _layer_stacks(model: Any, names: list[str]) -> list[tuple[Any, ...]]:
    """Per LoRA layer: (the batch's RowGroups for it, As, Bs, scalings, stack or None), as the
    layer's mixed forward builds them (`forward_plan`, `_stacked`), for rows grouped by adapter."""
    order, _ = adapter_order(names)
    routing = route_rows([names[i] for i in order])
    layers = []
    for _, layer in lora_layers(model):
        used = [n for n in routing.position if n in set(layer.adapter_names)]
        holders = layer.holders(used)
        groups = routing.groups.select([routing.position[n] for n in used])
        As = [h.lora_A for h in holders]
        Bs = [h.lora_B for h in holders]
        scalings = [h.scaling for h in holders]
        stack = layer._stacked(holders, As, Bs, scalings)
        layers.append((groups, [a.data for a in As], [b.data for b in Bs], scalings, stack))
    return layers


def products_alone_side(model: Any, x: np.ndarray, names: list[str]) -> Callable[[], None]:
    """The first floor: each layer's low-rank products (U = s X A^T, then U B^T added in
    place) on the grouped rows, as the mixed forward runs them (one batched product per layer
    on the stacked adapters, or one pair per adapter for long segments), and nothing else: no
    base product, no gather, no Tensor or Function."""
    order, _ = adapter_order(names)
    xs = np.ascontiguousarray(x[order])
    ys = np.zeros_like(xs)
    layers = _layer_stacks(model, names)

    def run() -> None:
        for groups, As, Bs, scalings, stack in layers:
            cache = G.grouped_lora_shrink(xs, groups, As, scalings, stack)
            G._add_expand(ys, cache, Bs)

    return run


def _plain_steps(model: Any, names: list[str]) -> list[Any]:
    """The model's children in order: (W0, b, groups, As, Bs, scalings, stack) for a LoRA layer
    (its arrays and the batch's stacked adapters, as `_layer_stacks` gives them), None for a
    ReLU."""
    lora = {id(layer) for _, layer in lora_layers(model)}
    stacks = iter(_layer_stacks(model, names))
    steps: list[Any] = []
    for module in model.children():  # the MLP's Linear (LoRA) and ReLU layers, in order
        if id(module) in lora:
            groups, As, Bs, scalings, stack = next(stacks)
            W0, b = module.base.weight.data, module.base.bias.data
            steps.append((W0, b, groups, As, Bs, scalings, stack))
        else:
            steps.append(None)  # a ReLU
    return steps


def plain_numpy_side(
    model: Any, x: np.ndarray, names: list[str], *, base: bool = False
) -> Callable[[], np.ndarray]:
    """The third floor: the grouped-once mixed forward as plain NumPy calls: the rows grouped by
    adapter (``x[order]``, `adapter_order`), each layer's
    `loralab.lora.grouped.grouped_lora_linear_serve` on its arrays and its stacked adapters,
    ``np.maximum`` between layers, and the rows put back (``[inverse]``), as the grouped-once
    side does them: what the method costs without the engine's Tensors, Functions, routing and
    checks. It is measured against ``base=True``, the base forward as plain NumPy calls
    (``x W0^T + b``, ``np.maximum``; no grouping, the base needs none). Returns the output,
    rows in arrival order."""
    order, inverse = adapter_order(names)
    moved = not (order == np.arange(order.size)).all()
    steps = _plain_steps(model, names)

    def run() -> np.ndarray:
        h = x[order] if moved else x
        for step in steps:
            if step is None:
                h = np.maximum(h, 0)
            else:  # (no cache: the engine keeps none without a graph)
                h = G.grouped_lora_linear_serve(h, *step)
        return h[inverse] if moved else h

    def run_base() -> np.ndarray:
        h = x
        for step in steps:
            if step is None:
                h = np.maximum(h, 0)
            else:
                h = h @ step[0].T
                h += step[1]
        return h

    return run_base if base else run


def bytes_floor_side(model: Any, names: list[str]) -> Callable[[], None]:
    """The second floor: every layer's K adapters read once from memory (a streaming
    ``np.maximum.reduce`` over the stacked A and B^T, the fastest read NumPy has), nothing else.
    Whatever computes the batch reads these bytes; at one row per adapter they are the work."""
    stacks = [s[0] for *_, s in _layer_stacks(model, names) if s is not None]

    def run() -> None:
        for st in stacks:
            np.maximum.reduce(st.A, axis=None)
            np.maximum.reduce(st.Bt, axis=None)

    return run


def bytes_in_place_side(
    model: Any, x: np.ndarray, names: list[str], read: Callable[[np.ndarray], Any] | None = None
) -> Callable[[], np.ndarray]:
    """The bytes in place: the base forward as plain NumPy calls (as ``plain_numpy_side(...,
    base=True)``), with every layer's adapters read once (``read``, by default the streaming
    ``np.maximum.reduce``) where the mixed forward reads them: A before the layer's base
    product, B^T after it (the stacked arrays; each adapter's A and B when they are not
    stacked). Timed against the plain base, it is what reading the adapters' bytes costs among
    the base's own traffic, which can push them (and W0) out of the CPU's caches; the products
    cannot cost less. Returns the base forward's output."""
    reduce = read or (lambda a: np.maximum.reduce(a, axis=None))
    steps = []
    for s in _plain_steps(model, names):  # (W0, b, groups, As, Bs, scalings, stack) or None
        if s is None:
            steps.append(None)
        elif s[6] is not None:  # the stacked adapters: one (K, r, in) A and one (K, r, out) B^T
            steps.append((s[0], s[1], [s[6][0].A], [s[6][0].Bt]))
        else:  # adapters not stacked (their ranks or dtypes differ): each one's A and B
            steps.append((s[0], s[1], s[3], s[4]))

    def run() -> np.ndarray:
        h = x
        for step in steps:
            if step is None:
                h = np.maximum(h, 0)
                continue
            W0, b, before, after = step
            for a in before:
                reduce(a)
            h = h @ W0.T
            h += b
            for a in after:
                reduce(a)
        return h

    return run


def read_bandwidth(mib: float, repeats: int = 5, min_seconds: float = 0.02) -> float:
    """GiB per second of a streaming read (``np.maximum.reduce``) over a float32 buffer of
    ``mib`` MiB, read again and again (wall time): the median of ``repeats`` timed reads, after
    at least ``min_seconds`` of untimed reads to settle the caches. The CPU's caches hold a
    small buffer between reads, not one larger than they are: the rate falls to main memory's."""
    if mib <= 0:
        raise ValueError(f"read_bandwidth: mib must be > 0, got {mib}")
    buf = np.ones(max(1, int(mib * 2**20) // 4), dtype=np.float32)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        np.maximum.reduce(buf)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        np.maximum.reduce(buf)
        times.append(time.perf_counter() - t)
    return buf.nbytes / 2**30 / max(statistics.median(times), 1e-9)


def _parts_before(x, W0, b, As, Bs, scalings, index) -> dict[str, Callable[[], Any]]:
    """The per-layer way this op ran before issue 21, one closure per part: a stable argsort in
    every layer, then per adapter a gather x[rows], two products and a scatter y[rows] +=."""
    k = len(As)
    groups = G.group_rows(index, k)
    xks = [x[rows] for rows in groups]
    uks = [xk @ A.T for xk, A in zip(xks, As, strict=True)]
    zks = [s * (uk @ B.T) for uk, B, s in zip(uks, Bs, scalings, strict=True)]
    y = x @ W0.T + b

    def gathers_and_scatters() -> None:
        for rows, zk in zip(groups, zks, strict=True):
            x[rows]
            y[rows] += zk

    return {
        "sort rows": lambda: G.group_rows(index, k),
        "gathers and scatters": gathers_and_scatters,
        "down products x A^T": lambda: [xk @ A.T for xk, A in zip(xks, As, strict=True)],
        "up products U B^T + add": lambda: [
            s * (uk @ B.T) for uk, B, s in zip(uks, Bs, scalings, strict=True)
        ],
    }


def _parts_now(x, W0, b, As, Bs, scalings, names) -> dict[str, Callable[[], Any]]:
    """The way it runs now (`grouped_lora_linear_forward` on stacked adapters), one closure per
    part: the sort (once per batch); the rows moved into the (K, c, in) block and the output
    put back (the whole batch sorted and unsorted when every adapter has as many rows, else the
    block's rows gathered as they came and the products added back through their index); one
    batched down product for all adapters; one batched up product added in place. (Segments
    longer than `loralab.lora.stacked.MAX_ROWS_PER_SLOT` rows, K = 1 here, keep one product
    pair per adapter, as the op does.)"""
    routing = route_rows(names)
    groups = routing.groups
    n = x.shape[0]
    used = [int(name[1:]) for name in routing.position]  # adapters with rows, batch order
    in_order = G.RowGroups(np.arange(n), groups.segments, np.arange(n), True)  # xs is sorted
    xs = G._sorted(x, groups)
    params = [Parameter(a) for a in As], [Parameter(b) for b in Bs]
    adapters = ST.stack_parameters(*params, scalings)  # one rank and dtype: always stacked
    assert adapters is not None
    stack = (adapters, used)
    As_u, Bs_u = [As[i] for i in used], [Bs[i] for i in used]
    s_u = [scalings[i] for i in used]
    cache = G.grouped_lora_shrink(xs, in_order, As_u, s_u, stack)
    ys = xs @ W0.T + b
    spans = list(groups.segments)
    sorted_layout = ST.stack_layout(spans, used, len(As))
    arrival = ST.stack_layout(spans, used, len(As), groups.order)

    def gathers_and_scatters() -> None:
        if groups.identity:
            return
        if arrival is None or sorted_layout is None or sorted_layout.rows is None:
            G._sorted(x, groups)  # the whole batch each way
            G._unsorted(ys, groups)
        else:  # x's rows into the block, and the rows of y the products are added into
            x[arrival.rows]
            ys[arrival.rows]

    return {
        "sort rows": lambda: route_rows(names),
        "gathers and scatters": gathers_and_scatters,
        "down products x A^T": lambda: G.grouped_lora_shrink(xs, in_order, As_u, s_u, stack),
        "up products U B^T + add": lambda: G._add_expand(ys, cache, Bs_u),
    }


def profile_layer(
    width: int,
    batch: int,
    k: int,
    *,
    rank: int = RANK,
    repeats: int = 7,
    sample_seconds: float = 0.02,
    clock: Callable[[], float] = time.process_time,
    threads: int | None = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the parts of one mixed Linear(width, width) layer alone, before and now.

    Rows spread round-robin over ``k`` adapters of rank ``rank`` (float32). Each part runs on
    its own, repeatedly (`loralab.bench.timing.time_alternating`, median of ``repeats``), with
    ``threads`` BLAS threads (default 1: on a busy machine a second thread mostly waits; None
    leaves NumPy's count).

    Returns
    -------
    dict with ``base`` (seconds of x W0^T + b) and ``before`` / ``now``: {part: seconds}, the
    parts of `PARTS` ("sort rows", now, is the once-per-batch sort divided by the N_LAYERS
    layers that share it).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    W0 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    b = np.zeros(width, dtype=np.float32)
    As = [rng.standard_normal((rank, width)).astype(np.float32) for _ in range(k)]
    Bs = [rng.standard_normal((width, rank)).astype(np.float32) for _ in range(k)]
    scalings = [ALPHA / rank] * k
    names = [f"t{i % k}" for i in range(batch)]
    index = np.array([int(n[1:]) for n in names])
    before = _parts_before(x, W0, b, As, Bs, scalings, index)
    now = _parts_now(x, W0, b, As, Bs, scalings, names)
    timed = {"base": lambda: x @ W0.T + b}
    timed.update({f"before: {p}": f for p, f in before.items()})
    timed.update({f"now: {p}": f for p, f in now.items()})
    with blas_threads(threads):
        times = time_alternating(timed, repeats, sample_seconds, clock)
    med = {name: statistics.median(t) for name, t in times.items()}
    out_now = {p: med[f"now: {p}"] for p in now}
    out_now["sort rows"] /= N_LAYERS  # one sort per batch, shared by every layer
    return {"base": med["base"], "before": {p: med[f"before: {p}"] for p in before}, "now": out_now}
