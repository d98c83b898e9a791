"""One base, many adapters: PEFT's named-adapter functions, mixed batches and adapter arithmetic.

A LoRA layer can hold several adapters by name (`loralab.lora.linear_shared.LoRALayerMixin`); these
functions act on every LoRA layer of a model at once, NumPy or torch alike (written once, over
`loralab.lora.backend`), with PEFT's names and semantics:

- `set_adapter` (one name or several: their updates are summed), `active_adapters`;
- `delete_adapter` (refused for an active or merged adapter);
- `disable_adapters`, a context manager: the base alone inside it;
- `mixed_batch`, a context manager: row i of the batch through adapter ``adapter_names[i]``
  (``"__base__"``: none), PEFT's ``adapter_names`` forward argument, run by the grouped op
  (`loralab.lora.grouped`); `adapter_order` groups a batch's rows by adapter once, before the
  model, as a serving scheduler does;
- `add_weighted_adapter`: a new adapter from a weighted combination of others ("linear",
  "cat", "svd", with PEFT's definitions).

Every function validates the whole request first; a refused call changes nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from typing import Any

import numpy as np

from loralab._validate import positive_int
from loralab.lora.backend import backend_for
from loralab.lora.inject import active_names, adapter_names_of, check_known
from loralab.lora.linear_shared import (
    BASE_ROWS,
    MixedRouting,
    batch_holders,
    check_adapter_name,
    check_not_in_mixed_batch,
    layer_groups,
    route_rows,
)

__all__ = [
    "set_adapter",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "disable_adapters",
    "mixed_batch",
    "adapter_order",
    "add_weighted_adapter",
    "COMBINATIONS",
]

COMBINATIONS = ("linear", "cat", "svd")
"""`add_weighted_adapter`'s ``combination_type`` values (PEFT's, without the pruning ones)."""


def _named_layers(model: Any, where: str) -> list[tuple[str, Any]]:
    """The model's LoRA layers that hold named adapters; a ValueError if it has none."""
    layers = backend_for(model, where).lora_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoRA layers; call inject_lora first")
    return [(n, m) for n, m in layers if hasattr(m, "adapter_names")]


def list_adapters(model: Any) -> list[str]:
    """Every adapter of ``model``, in the order they were added."""
    return adapter_names_of(backend_for(model, "list_adapters").lora_layers(model))


def active_adapters(model: Any) -> list[str]:
    """The adapters the forward adds (their updates summed), as PEFT's ``active_adapters``.

    Examples
    --------
    >>> from loralab.nn import MLP
    >>> from loralab.lora import inject_lora
    >>> model = inject_lora(MLP([4, 8, 2], seed=0), ["0"], r=2, seed=0)
    >>> model = inject_lora(model, ["0", "2"], r=2, seed=1, adapter_name="task")
    >>> active_adapters(model), list_adapters(model)
    (['default'], ['default', 'task'])
    >>> set_adapter(model, "task"); active_adapters(model)
    ['task']
    """
    return active_names(backend_for(model, "active_adapters").lora_layers(model))


def set_adapter(model: Any, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (one name or a list) the active adapters, as PEFT's ``set_adapter``.

    The forward adds the active adapters' updates, summed; their parameters become trainable and
    every other adapter's are frozen (so training one adapter leaves the others untouched).
    A merged model is refused (unmerge first; PEFT unmerges with a warning).
    """
    names = check_known(model, adapter_name, "set_adapter")
    layers = _named_layers(model, "set_adapter")
    check_not_in_mixed_batch(layers, "set_adapter")
    _refuse_merged(layers, "set_adapter")
    backend = backend_for(model, "set_adapter")
    for _, layer in layers:
        layer.active_adapter_names = list(names)
        for name in layer.adapter_names:
            for param in layer.adapter_parameters(name).values():
                backend.set_trainable(param, name in names)


def delete_adapter(model: Any, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer; a layer left with none becomes its base.

    Refused for a merged adapter (as PEFT) and for an active one: PEFT would then activate
    another adapter silently (the first remaining name), so the model would change what it
    computes without being asked; here you `set_adapter` to another first.
    """
    (name,) = check_known(model, [adapter_name], "delete_adapter")
    layers = _named_layers(model, "delete_adapter")
    check_not_in_mixed_batch(layers, "delete_adapter")
    if any(name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"delete_adapter: adapter {name!r} is merged; call unmerge_lora first")
    active = active_adapters(model)
    if name in active:
        raise ValueError(
            f"delete_adapter: adapter {name!r} is active ({active}); call set_adapter with "
            f"another of {list_adapters(model)} first"
        )
    for path, layer in layers:
        if name not in layer.adapter_names:
            continue
        if len(layer.adapter_names) > 1:
            layer.delete_adapter(name)
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)


def _refuse_merged(layers: list[tuple[str, Any]], where: str) -> None:
    """ValueError naming the merged layers: their W0 holds ΔW, so they are unmerged first."""
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{where}: layers {merged} are merged; call unmerge_lora first")


@contextmanager
def _set_inside(layers: list[tuple[str, Any]], **values: Any) -> Iterator[None]:
    """Every layer's attributes set to ``values`` inside the block; the old values come back after.

    So blocks nest: when an inner block ends, the enclosing block's values are in force again (an
    attribute a layer did not have yet comes back as None).
    """
    outer = [{k: getattr(layer, k, None) for k in values} for _, layer in layers]
    # a layer's per-batch attributes (``Module._quiet``: no edit counted, never a parameter)
    # go straight into its __dict__: a mixed batch sets them for every batch
    quiet = [values.keys() <= getattr(layer, "_quiet", frozenset()) for _, layer in layers]
    _set_all(layers, quiet, [values] * len(layers))
    try:
        yield
    finally:
        _set_all(layers, quiet, outer)


def _set_all(layers: list[tuple[str, Any]], quiet: list[bool], values: list[dict]) -> None:
    """Layer i's attributes set to ``values[i]``: into its __dict__ where ``quiet[i]``, else by
    ``setattr`` (which counts the edit and keeps the module's registries)."""
    for (_, layer), fast, these in zip(layers, quiet, values, strict=True):
        if fast:
            layer.__dict__.update(these)
            continue
        for k, v in these.items():
            setattr(layer, k, v)


@contextmanager
def disable_adapters(model: Any) -> Iterator[Any]:
    """Inside the block the model computes with its base weights alone (PEFT's ``disable_adapter``).

    A merged model is refused (W0 holds ΔW; unmerge first). Blocks nest: when one ends, the
    model computes as the enclosing block (if any) said.
    """
    layers = _named_layers(model, "disable_adapters")
    _refuse_merged(layers, "disable_adapters")
    with _set_inside(layers, disabled=True):
        yield model


@contextmanager
def mixed_batch(model: Any, adapter_names: Sequence[str]) -> Iterator[Any]:
    """Inside the block, row i of every batch goes through adapter ``adapter_names[i]``.

    PEFT's ``model(x, adapter_names=[...])``: ``"__base__"`` means no adapter; a layer that lacks
    a row's adapter gives that row the base alone. Each layer runs its base once on the whole
    batch and the grouped op (`loralab.lora.grouped`) for the low-rank parts, one small product
    pair per adapter, with a hand backward, so a mixed batch can train several adapters at once.
    The batch must have ``len(adapter_names)`` rows (x of shape (len, ..., in)). The rows are
    sorted by adapter once per composition: a NumPy model remembers the last batch's routing, so
    the same names again (a decode loop's next step) reuse it until the model is edited
    (`loralab.nn.edit_count`).

    Refused: unknown names (the message lists the known ones), a merged model, DoRA adapters
    (as PEFT), and adapters with dropout in training mode. Blocks nest (the enclosing block's
    rows come back when an inner one ends); inside one, changing the adapters (`merge_lora`,
    `delete_adapter`, `set_adapter`, `add_weighted_adapter`, `inject_lora`) is refused.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"mixed_batch: adapter_names must be a list of str (one per row), got {adapter_names!r}"
        )
    rows = list(adapter_names)
    if not rows or not all(map(isinstance, rows, repeat(str))):
        raise TypeError(
            f"mixed_batch: adapter_names must be a non-empty list of str, got {adapter_names!r}"
        )
    # worked out once per composition of the batch, like vLLM's ``set_adapter_mapping``: a decode
    # loop serves the same rows step after step (a NumPy model keeps it until it is edited)
    backend = backend_for(model, "mixed_batch")
    routing, layers = backend.remembered(model, "_mixed_seen", rows, lambda: _route(model, rows))
    _refuse_merged(layers, "mixed_batch")  # (each time: a merge edits W0 in place, uncounted)
    with _set_inside(layers, mixed_rows=routing.rows, mixed_routing=routing):
        yield model


def _route(model: Any, rows: list[str]) -> tuple[MixedRouting, list[tuple[str, Any]]]:
    """`mixed_batch`'s work for a batch of ``rows``: the batch sorted by adapter (`route_rows`)
    with each layer's plan in it, and the model's LoRA layers; checked (unknown names, DoRA)."""
    routing = route_rows(rows)  # sorted by adapter once, for every layer and every call
    used = list(routing.position)
    layers = _named_layers(model, "mixed_batch")
    # each layer's share of the batch: the adapters it holds, their holders, the DoRA ones
    plans = [batch_holders(layer, used) for _, layer in layers]
    if all(len(mine) < len(used) for mine, _, _ in plans):  # (else one layer holds them all)
        known = set().union(*(set(layer.adapter_names) for _, layer in layers))
        unknown = [n for n in used if n not in known]
        if unknown:
            raise ValueError(
                f"mixed_batch: unknown adapters {unknown}; the model's adapters are "
                f"{adapter_names_of(layers)} (and {BASE_ROWS!r} for the base alone)"
            )
    _refuse_merged(layers, "mixed_batch")
    dora = {n for _, _, uses_dora in plans for n in uses_dora}
    if dora:
        raise ValueError(
            f"mixed_batch: adapters {sorted(dora)} use DoRA, which a mixed batch does not support"
        )
    for (_, layer), (mine, holders, _) in zip(layers, plans, strict=True):
        routing.plans[id(layer)] = (layer_groups(routing, mine), holders)  # its forward_plan
    return routing, layers


def adapter_order(adapter_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The permutation that groups a batch's rows by adapter, and its inverse.

    `mixed_batch` sorts the rows once per batch, but each layer still gathers its input into
    that order and puts its output back (two passes over the activations per layer). A serving
    system (Punica, S-LoRA) instead forms the batch already grouped by adapter, so that no layer
    has to: do the same with ``order`` before the model and ``inverse`` after it.

    Parameters
    ----------
    adapter_names : list of str, one per row (``"__base__"``: none)

    Returns
    -------
    order : int ndarray of shape (N,)
        ``x[order]`` has base-only rows first, then each adapter's rows (adapters by name),
        each group in arrival order.
    inverse : int ndarray of shape (N,)
        ``y[inverse]`` puts the rows of an output computed on ``x[order]`` back in arrival order.

    Examples
    --------
    >>> order, inverse = adapter_order(["b", "a", "b", "__base__"])
    >>> order.tolist(), inverse.tolist()
    ([3, 1, 0, 2], [2, 1, 3, 0])

    With a model: ``with mixed_batch(model, [names[i] for i in order]): y = model(x[order])``,
    then ``y.data[inverse]`` is what ``mixed_batch(model, names)`` gives on ``x``.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"adapter_order: adapter_names must be a list of str (one per row), got {adapter_names!r}"
        )
    rows = list(adapter_names)
    if not all(isinstance(n, str) for n in rows):
        raise TypeError(
            f"adapter_order: adapter_names must be a list of str, got {adapter_names!r}"
        )
    groups = route_rows(rows).groups
    return groups.order.copy(), groups.inverse.copy()


# ----- adapter arithmetic ------------------------------------------------------------------------
def _combine(
    holders: list[Any], weights: list[float], combination_type: str, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of the combined adapter of one layer, in float64; its scaling is 1 (alpha = r).

    - "linear" (PEFT): A = sum_i sign_i sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i, so
      B A = sum_ij ... includes cross terms B_i A_j: not sum_i w_i ΔW_i unless one adapter;
    - "cat": A = [w_1 s_1 A_1; ...; w_k s_k A_k] (stacked rows), B = [B_1, ..., B_k] (columns),
      so B A = sum_i w_i s_i B_i A_i = sum_i w_i ΔW_i exactly, at rank sum r_i;
    - "svd": ΔW = sum_i w_i ΔW_i, truncated to ``rank``: B = U_r S_r, A = V_r^T (the best rank-r
      approximation, Eckart-Young).
    """
    As = [np.asarray(_to_numpy(h.lora_A), dtype=np.float64) for h in holders]
    Bs = [np.asarray(_to_numpy(h.lora_B), dtype=np.float64) for h in holders]
    ss = [w * h.scaling for h, w in zip(holders, weights, strict=True)]
    if combination_type == "linear":
        A = sum(math.copysign(math.sqrt(abs(s)), s) * A_i for s, A_i in zip(ss, As, strict=True))
        B = sum(math.sqrt(abs(s)) * B_i for s, B_i in zip(ss, Bs, strict=True))
        return np.asarray(A), np.asarray(B)
    if combination_type == "cat":
        A = np.concatenate([s * A_i for s, A_i in zip(ss, As, strict=True)], axis=0)
        return A, np.concatenate(Bs, axis=1)
    delta = sum(s * (B_i @ A_i) for s, A_i, B_i in zip(ss, As, Bs, strict=True))
    U, S, Vh = np.linalg.svd(np.asarray(delta), full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]


def _to_numpy(param: Any) -> np.ndarray:
    data = param.data
    return data if isinstance(data, np.ndarray) else data.detach().cpu().numpy()


def add_weighted_adapter(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """Add adapter ``adapter_name``: a weighted combination of ``adapters`` (PEFT's definitions).

    The new adapter has alpha = r (so s = 1), the other options of ``adapters[0]`` (as PEFT), on
    every layer that holds at least one of ``adapters`` (those it lacks count as zero there), and
    starts inactive and frozen (`set_adapter` to use it).

    Parameters
    ----------
    adapters : list of str
        Existing adapter names, no repeats.
    weights : list of float
        w_i, one per adapter, finite (negative subtracts a task); Python or NumPy numbers.
    adapter_name : str
        A new name.
    combination_type : "linear", "cat" or "svd" (default, as PEFT)
        With ΔW_i = s_i B_i A_i: "cat" gives sum_i w_i ΔW_i exactly, at rank sum_i r_i; "svd" its
        best rank-``svd_rank`` approximation; "linear" combines A and B separately (weights
        sqrt(|w_i s_i|), the sign on A), cheap and only approximate (its B A has cross terms
        B_i A_j), and needs equal ranks, since A_i (r_i, in) are added entry by entry.
    svd_rank : int, optional
        The rank for "svd" (default: the largest rank among ``adapters``).

    Raises
    ------
    ValueError
        Unknown or repeated adapter names (the message lists the known ones), an existing
        ``adapter_name``, weights of the wrong length, not finite or so large that the new
        A, B or B A would overflow the adapters' dtype, an unknown ``combination_type``,
        "linear" with different ranks, DoRA adapters, adapters on an embedding (a
        `loralab.lora.LoRAEmbedding` holds one adapter), a merged model, a call inside a
        `mixed_batch` block.
    """
    names = check_known(model, list(adapters), "add_weighted_adapter")
    if not names:
        raise ValueError("add_weighted_adapter: adapters is empty; name at least one adapter")
    check_adapter_name(adapter_name, "add_weighted_adapter")
    known = list_adapters(model)
    if adapter_name in known:
        raise ValueError(
            f"add_weighted_adapter: adapter {adapter_name!r} exists already; the model's adapters "
            f"are {known}"
        )
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"add_weighted_adapter: weights must be a list of numbers, got {weights!r}")
    if len(weights) != len(names):
        raise ValueError(
            f"add_weighted_adapter: got {len(weights)} weights for {len(names)} adapters {names}"
        )
    for w in weights:  # Python or NumPy real numbers (np.float32(0.5)), as PEFT accepts
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Real):
            raise TypeError(
                f"add_weighted_adapter: weights must be numbers, got {w!r} ({type(w).__name__})"
            )
        if not math.isfinite(w):
            raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {w!r}")
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"add_weighted_adapter: combination_type must be one of {list(COMBINATIONS)}, "
            f"got {combination_type!r}"
        )
    if svd_rank is not None:
        positive_int("svd_rank", svd_rank, "add_weighted_adapter")
    if len(names) == 1:
        combination_type = "linear"  # as PEFT: one adapter is scaled, whatever was asked
    layers = _named_layers(model, "add_weighted_adapter")
    check_not_in_mixed_batch(layers, "add_weighted_adapter")
    _refuse_merged(layers, "add_weighted_adapter")
    single = [
        n
        for n, layer in layers
        if not hasattr(layer, "add_adapter") and any(a in layer.adapter_names for a in names)
    ]
    if single:  # a LoRAEmbedding holds one adapter: the combination would have nowhere to go
        raise ValueError(
            f"add_weighted_adapter: layers {single} ({type(dict(layers)[single[0]]).__name__}) "
            f"hold one adapter each, so a combined adapter cannot be added beside {names}; "
            "combine adapters on Linear layers only"
        )
    ranks: dict[str, int] = {}
    first: Any = None
    for path, layer in layers:
        for n in names:
            if n in layer.adapter_names:
                holder = layer.adapter(n)
                ranks[n] = max(ranks.get(n, 0), holder.r)
                if holder.use_dora:
                    raise ValueError(
                        f"add_weighted_adapter: adapter {n!r} uses DoRA (layer {path!r}); its "
                        "magnitude vector has no weighted combination"
                    )
                if first is None and n == names[0]:
                    first = holder
    if combination_type == "linear" and len(set(ranks.values())) > 1:
        raise ValueError(
            f"add_weighted_adapter: combination_type='linear' needs adapters of one rank, got "
            f"{ranks}; it adds the A_i (r_i, in) entry by entry. Use 'cat' or 'svd'"
        )
    rank = {
        "linear": max(ranks.values()),
        "cat": sum(ranks.values()),
        "svd": svd_rank or max(ranks.values()),
    }[combination_type]
    plans = []
    for path, layer in layers:
        present = [
            (layer.adapter(n), w)
            for n, w in zip(names, weights, strict=True)
            if n in layer.adapter_names
        ]
        if not present:
            continue
        if rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"add_weighted_adapter: rank {rank} exceeds min(in_features, out_features) of "
                f"layer {path!r} ({layer.in_features}, {layer.out_features})"
            )
        hs, ws = [h for h, _ in present], [float(w) for _, w in present]
        with np.errstate(over="ignore", invalid="ignore"):
            A, B = _combine(hs, ws, combination_type, rank)
            dtype = _to_numpy(hs[0].lora_A).dtype
            fits = all(np.isfinite(M.astype(dtype)).all() for M in (A, B, B @ A))
        if not fits:
            raise ValueError(
                f"add_weighted_adapter: weights {list(weights)} give layer {path!r} an adapter "
                f"whose A, B or B A is not finite in {dtype}; use smaller weights"
            )
        plans.append((layer, A, B))
    backend = backend_for(model, "add_weighted_adapter")
    options = dict(
        r=rank, alpha=rank, dropout=first.dropout, init="kaiming", use_rslora=first.use_rslora
    )
    for layer, A, B in plans:  # checked: the model changes from here on
        holder = layer.add_adapter(adapter_name, rng=np.random.default_rng(0), **options)
        dtype = _to_numpy(holder.lora_A).dtype
        full_A = np.zeros((rank, layer.in_features), dtype=dtype)
        full_B = np.zeros((layer.out_features, rank), dtype=dtype)
        full_A[: A.shape[0]] = A
        full_B[:, : B.shape[1]] = B
        backend.set(holder, "lora_A", full_A)
        backend.set(holder, "lora_B", full_B)
        for param in layer.adapter_parameters(adapter_name).values():
            backend.set_trainable(param, False)
