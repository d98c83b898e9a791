"""What the NumPy and torch `LoRALinear` share: the base-layer registry, the options, named adapters.

    h = base(x) + s B A dropout(x)          (the paper's h = W0 x + (alpha / r) B A x)

with A of shape (r, in), B of shape (out, r) and s = alpha / r (alpha / sqrt(r) for rsLoRA).

Shared by both backends
-----------------------
`LoRALayerMixin` holds everything the NumPy layer (`loralab.lora.linear_layer.LoRALinear`) and the torch
layer (`loralab.torch.layers.LoRALinear`) have in common: validation, the options, initialisation
(in NumPy, so both start from the same values bit for bit), ΔW, merging, unmerging and the repr.
A backend adds its parameters, dropout masks and forward Functions (the NumPy ones are in
`loralab.lora.engine_functions`).

Base layers (the interface a quantized base implements)
-------------------------------------------------------
A LoRALinear wraps a *linear-like* module of a type registered with `register_linear_type`
(`loralab.nn.Linear` is registered; `loralab.quant.Linear4bit` registers itself). Such a base has

- ``in_features``, ``out_features``: ints;
- ``forward(x)``: (..., in_features) -> (..., out_features), differentiable with respect to x;
- ``requires_grad_(flag)``: a loralab Module's, to freeze it;
- optionally ``add_delta_(delta)``: add ΔW, of shape (out_features, in_features), into its W0 in
  place (returning anything); ΔW is the backend's array (an ndarray, or a torch tensor on the
  layer's device). ``merge``/``unmerge`` call it; without it they refuse;
- optionally ``compute_dtype``: the NumPy dtype of its outputs, given to A and B (float32 if absent).

Named adapters
--------------
A layer holds one or more adapters by name (PEFT's ``adapter_name``, "default" first). The first
adapter lives on the layer itself, so a layer with one adapter keeps the parameter names
``lora_A``, ``lora_B``, ``lora_magnitude_vector`` (and ``r``, ``alpha``, ``scaling`` are its); every
further adapter is an `AdapterMixin` module in ``lora_adapters[name]`` with the same attribute
names (``<path>.lora_adapters.<name>.lora_A``). ``adapter(name)`` gives an adapter's holder; the
forward adds the active adapters' updates (summed), or the base alone when disabled or merged,
or routes each row of a mixed batch through its own adapter (`loralab.lora.engine_functions.GroupedLoRALinearFn`, the grouped
op of `loralab.lora.grouped`). Why this layout: every existing model, twin, test and adapter file
keeps its names; see docs/guides/many_adapters.md.
"""

from __future__ import annotations

import re
from itertools import repeat
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from loralab._validate import boolean, positive_int, probability
from loralab.lora.config import (
    check_rank_fits,
    lora_init,
    lora_scaling,
    positive_number,
)
from loralab.lora.grouped import RowGroups, group_batch
from loralab.lora.variants import INITS, KINDS
from loralab.nn.layers import Linear
from loralab.nn.module import Module

__all__ = [
    "LoRALayerMixin",
    "AdapterMixin",
    "DEFAULT_ADAPTER",
    "BASE_ROWS",
    "check_adapter_name",
    "check_mixed_rows",
    "check_not_in_mixed_batch",
    "MixedRouting",
    "route_rows",
    "layer_groups",
    "batch_holders",
    "holders_with_dora",
    "MIXED_BATCH_ATTRIBUTES",
    "LINEAR_TYPES",
    "register_linear_type",
    "validate_lora_options",
]

LINEAR_TYPES: list[type] = [Linear]
"""The module types `LoRALinear` wraps and `inject_lora` targets (see `register_linear_type`)."""


def register_linear_type(cls: type) -> type:
    """Let `LoRALinear` wrap modules of type ``cls`` and `loralab.lora.inject_lora` target them.

    ``cls`` must be a `loralab.nn.Module` with the base interface of this module's docstring.
    Usable as a class decorator; registering twice is harmless.
    """
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"register_linear_type: expected a loralab.nn.Module class, got {cls!r}")
    if cls not in LINEAR_TYPES:
        LINEAR_TYPES.append(cls)
    return cls


def validate_lora_options(
    in_features: int,
    out_features: int,
    r: Any,
    alpha: Any,
    dropout: Any,
    init: Any,
    use_rslora: Any = False,
    use_dora: Any = False,
    *,
    where: str | None = None,
) -> None:
    """Raise a clear error for a bad LoRA option (shared by the NumPy and torch layers).

    A wrong type is a TypeError, a wrong value a ValueError; alpha must be finite and positive;
    r at most min(in_features, out_features) (`loralab.lora.config.check_rank_fits`). ``where``
    starts each message (default ``LoRALinear(in_features=..., out_features=...)``).
    """
    if where is None:
        where = f"LoRALinear(in_features={in_features}, out_features={out_features})"
    positive_int("r", r, where)
    check_rank_fits(int(r), in_features, out_features, where)
    positive_number("alpha", alpha, where)
    probability("dropout", dropout, where)
    lora_init("init", init, where)
    boolean("use_rslora", use_rslora, where)
    boolean("use_dora", use_dora, where)


DEFAULT_ADAPTER = "default"
"""The name of the adapter `inject_lora` and `load_adapter` make when none is given (PEFT's)."""

BASE_ROWS = "__base__"
"""In a mixed batch, the rows named so use no adapter (PEFT's ``adapter_names`` value)."""


class MixedRouting(NamedTuple):
    """A mixed batch's rows sorted by adapter once (`route_rows`), reused by every layer.

    rows : list of str
        The adapter name of each row (``mixed_rows``), as given.
    position : dict
        Adapter name -> its segment in ``groups`` (the batch's adapters, sorted by name).
    groups : RowGroups
        The sorted batch (`loralab.lora.grouped.group_batch`), one segment per adapter.
    plans : dict
        id(layer) -> what that layer's `forward_plan` returns for the batch ((its RowGroups,
        its holders)), filled by `loralab.lora.mixed_batch` as it checks the layers, so no
        layer works it out again.
    """

    rows: list[str]
    position: dict[str, int]
    groups: RowGroups
    plans: dict


def route_rows(rows: list[str]) -> MixedRouting:
    """Sort a mixed batch whose row i asks for adapter ``rows[i]`` (`BASE_ROWS`: none), once.

    Examples
    --------
    >>> routing = route_rows(["b", "__base__", "a", "b"])
    >>> routing.position, routing.groups.order.tolist(), routing.groups.segments
    ({'a': 0, 'b': 1}, [1, 2, 0, 3], [(1, 2), (2, 4)])
    """
    names = set(rows)
    names.discard(BASE_ROWS)
    used = sorted(names)
    position = dict(zip(used, range(len(used))))
    index = np.fromiter(map(position.get, rows, repeat(-1)), dtype=np.int64, count=len(rows))
    return MixedRouting(rows, position, group_batch(index, len(used)), {})


def layer_groups(routing: MixedRouting, used: list[str]) -> RowGroups:
    """The batch's RowGroups for a layer holding the batch's adapters ``used`` (names, in
    ``routing.position``'s order): the batch's own when it holds them all, else the same sorted
    batch with only their segments (`loralab.lora.grouped.RowGroups.select`)."""
    if len(used) == len(routing.position):
        return routing.groups
    return routing.groups.select([routing.position[n] for n in used])


def batch_holders(layer: Any, used: list[str]) -> tuple[list[str], list[Any], list[str]]:
    """A layer's share of a mixed batch whose adapters are ``used`` (names, in
    ``routing.position``'s order): the ones it holds (``used`` itself when it holds them all),
    their holders (`holders`, in that order) and the names of those that use DoRA (which a
    mixed batch refuses). A layer that remembers them (the NumPy `LoRALinear`:
    ``_batch_holders``) answers itself."""
    own = getattr(layer, "_batch_holders", None)
    return holders_with_dora(layer, used) if own is None else own(used)


def holders_with_dora(layer: Any, used: list[str]) -> tuple[list[str], list[Any], list[str]]:
    """`batch_holders`, worked out: (the names of ``used`` that ``layer`` holds, their holders
    in that order, the names among them whose adapters use DoRA)."""
    names = set(layer.adapter_names)
    mine = used if names.issuperset(used) else [n for n in used if n in names]
    holders = layer.holders(mine)
    if not any(map(_USE_DORA, holders)):
        return mine, holders, []
    return mine, holders, [n for n, h in zip(mine, holders, strict=True) if h.use_dora]


_USE_DORA = attrgetter("use_dora")

MIXED_BATCH_ATTRIBUTES = frozenset({"mixed_rows", "mixed_routing"})
"""What `loralab.lora.mixed_batch` sets on every LoRA layer for every batch: not counted as
edits (`loralab.nn.module.edit_count`), so the layers' remembered checks survive the batch."""

ADAPTER_OPTIONS = ("r", "alpha", "dropout", "init", "use_rslora", "use_dora", "scaling")
ADAPTER_PARAMETERS = ("lora_A", "lora_B", "lora_magnitude_vector")


MAX_ADAPTER_NAME = 100
"""The longest adapter name: it names a folder when saved (`loralab.lora.save_adapter`)."""

RESERVED_ADAPTER_NAMES = (
    # Attributes of the dict module holding a layer's adapters (torch.nn.ModuleDict, and the NumPy
    # AdapterDict): an adapter named so would shadow one, or torch refuses it with a bare KeyError.
    # Fixed here (the core never imports torch); tests/test_lora_peft_format_hardening.py checks
    # that it covers both dicts' attributes.
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children",
    "clear", "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float",
    "forward", "get_buffer", "get_extra_state", "get_parameter", "get_submodule", "half", "ipu",
    "items", "keys", "load_state_dict", "modules", "mtia", "named_buffers", "named_children",
    "named_modules", "named_parameters", "parameters", "pop", "register_backward_hook",
    "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook",
    "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook", "register_module",
    "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook",
    "requires_grad_", "set_extra_state", "set_submodule", "share_memory", "state_dict", "to",
    "to_empty", "train", "training", "type", "update", "values", "xpu", "zero_grad",
)  # fmt: skip
_WINDOWS_DEVICES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)),
}
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_adapter_name(name: Any, where: str) -> str:
    """``name`` if it can name an adapter, else a TypeError/ValueError saying why.

    A saved adapter's name is a folder's name (`loralab.lora.save_adapter`) and a key of the
    module dict holding a layer's adapters, so it must be one safe path component: 1 to
    `MAX_ADAPTER_NAME` ASCII letters, digits, '-' or '_', starting with a letter or a digit (no
    '/', '\\', '.', '..', NUL or absolute path; not a Windows device name such as ``"CON"``),
    and not one of `RESERVED_ADAPTER_NAMES` (``"keys"``, ``"training"``, ``"forward"`` ...).
    ``"__base__"`` (`BASE_ROWS`) is refused by the same rule.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"{where}: adapter_name must be a str, got {name!r} ({type(name).__name__})"
        )
    if (
        len(name) > MAX_ADAPTER_NAME
        or not _ADAPTER_NAME.fullmatch(name)
        or name.upper() in _WINDOWS_DEVICES
    ):
        shown = name if len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
        raise ValueError(
            f"{where}: adapter_name={shown!r} is not a valid adapter name: it names a folder "
            f"when saved, so use 1 to {MAX_ADAPTER_NAME} letters, digits, '-' or '_', starting "
            "with a letter or a digit (not a Windows device name such as 'CON')"
        )
    if name in RESERVED_ADAPTER_NAMES:
        raise ValueError(
            f"{where}: adapter_name={name!r} is not a valid adapter name: it is reserved, an "
            "attribute of the module dict that holds a layer's adapters (torch.nn.ModuleDict); "
            "choose another name"
        )
    return name


class AdapterMixin:
    """One adapter's weights and options: A (r, in), B (out, r), DoRA's m (out,), r, alpha, s ...

    The layer itself holds its first adapter (so a layer with one adapter keeps the parameter
    names ``lora_A``, ``lora_B``, ``lora_magnitude_vector``); every other adapter is a small
    module of this kind in the layer's ``lora_adapters`` dict. A backend supplies
    ``weight_row_norms(W)`` (DoRA's merge).
    """

    lora_A: Any
    lora_B: Any
    lora_magnitude_vector: Any  # DoRA's m, only with use_dora (declared, not set)
    r: int
    alpha: float
    dropout: float
    init: str
    use_rslora: bool
    use_dora: bool
    scaling: float
    _merge_norm: Any

    def weight_row_norms(self, W: Any) -> Any:
        raise NotImplementedError

    @property
    def kind(self) -> Any:
        """The adapter's kind, `loralab.lora.variants.KINDS[use_dora]`: plain LoRA or DoRA."""
        return KINDS[self.use_dora]

    def delta_weight(self) -> Any:
        """ΔW = scaling * B A, of shape (out_features, in_features), outside any graph."""
        return self.scaling * (self.lora_B.data @ self.lora_A.data)


class LoRALayerMixin(AdapterMixin):
    """What the NumPy and torch `LoRALinear` share; a backend class supplies

    - ``_weight_array(base)``: W0 as an ndarray (out, in), or None for a base without a plain W0;
    - ``_set_weight(array)``: replace W0 (by PiSSA's or OLoRA's residual);
    - ``_parameter(array)``: a trainable parameter holding ``array``, on W0's device;
    - ``weight_row_norms(W)``: ||W||_row, shape (out,) (DoRA's merge);
    - ``_new_adapter()``: an empty module for a second adapter's weights (an `AdapterMixin`);
    - ``_new_adapter_dict()``: the dict module ``lora_adapters`` that holds those.

    Named adapters (PEFT's semantics)
    ---------------------------------
    A layer holds one or more adapters by name, in ``adapter_names`` (insertion order). The
    first lives on the layer itself (``lora_A``, ``lora_B``, ``r``, ``scaling`` ... are its), the
    others in ``lora_adapters[name]`` with the same attribute names, so their parameters are
    called ``<path>.lora_adapters.<name>.lora_A``. ``active_adapter_names`` (the same list on
    every layer of a model) says which adapters the forward adds, their updates summed;
    ``merged_adapters`` which are in W0; ``disabled`` runs the base alone; ``mixed_rows`` (a name
    per batch row, set by `loralab.lora.named_adapters.mixed_batch`, with ``mixed_routing``: the
    rows sorted by adapter once per batch, `route_rows`) routes each row through its own.
    """

    _quiet = MIXED_BATCH_ATTRIBUTES  # set for every batch (``Module._quiet``)

    base: Any
    in_features: int
    out_features: int
    plain_base: bool
    adapter_names: list[str]
    active_adapter_names: list[str]
    merged_adapters: list[str]
    disabled: bool
    mixed_rows: list[str] | None
    mixed_routing: MixedRouting | None
    lora_adapters: Any

    def _weight_array(self, base: Any) -> np.ndarray | None:
        raise NotImplementedError

    def _set_weight(self, array: np.ndarray) -> None:
        raise NotImplementedError

    def _parameter(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def _new_adapter(self) -> Any:
        raise NotImplementedError

    def _norm_from(self, norm: Any) -> Any:
        """A (out,) vector of the other backend as this backend's array type."""
        raise NotImplementedError

    def _new_adapter_dict(self) -> Any:
        raise NotImplementedError

    def _init_lora(
        self,
        base: Any,
        rng: np.random.Generator,
        r: Any,
        alpha: Any,
        dropout: Any,
        init: Any,
        use_rslora: Any,
        use_dora: Any,
        adapter_name: Any = DEFAULT_ADAPTER,
    ) -> None:
        """Validate the options (the layer's keywords), freeze ``base``, then create A, B (and DoRA's m)."""
        check_adapter_name(adapter_name, "LoRALinear")
        validate_lora_options(
            base.in_features, base.out_features, r, alpha, dropout, init, use_rslora, use_dora
        )
        W0 = self._weight_array(base)
        if W0 is None and (use_dora or INITS[init].moves_W0):
            raise ValueError(
                f"LoRALinear: use_dora={use_dora}, init={init!r} need W0 itself, which a "
                f"{type(base).__name__} base does not hold; use init='kaiming' or 'gaussian' without DoRA"
            )
        base.requires_grad_(False)
        self.base = base
        self.plain_base = W0 is not None  # W0 is a plain weight: the fused Functions run
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapter_names, self.active_adapter_names = [], [adapter_name]
        self.merged_adapters, self.disabled, self.mixed_rows = [], False, None
        self.mixed_routing = None
        self._fill_adapter(self, rng, r, alpha, dropout, init, use_rslora, use_dora)
        self.adapter_names.append(adapter_name)

    def _fill_adapter(
        self, holder: Any, rng: np.random.Generator, r, alpha, dropout, init, use_rslora, use_dora
    ) -> None:
        """Give ``holder`` (the layer or an adapter module) its options, A, B (and m), initialised."""
        W0 = self._weight_array(self.base)
        holder.r, holder.alpha, holder.dropout = int(r), float(alpha), float(dropout)
        holder.init, holder.use_rslora, holder.use_dora = init, bool(use_rslora), bool(use_dora)
        holder.scaling = lora_scaling(holder.alpha, holder.r, holder.use_rslora)
        shape = (self.out_features, self.in_features)
        A, B, residual = INITS[init](W0, holder.r, holder.scaling, rng, shape)
        if residual is not None:  # the principal part of W0 moved into A and B
            self._set_weight(residual)
            W0 = residual
        dtype = (
            W0.dtype
            if W0 is not None
            else np.dtype(getattr(self.base, "compute_dtype", np.float32))
        )
        # Cast in NumPy first, so float32 values agree bit for bit between the backends.
        A, B = A.astype(dtype), B.astype(dtype)
        holder.lora_A = self._parameter(A)
        holder.lora_B = self._parameter(B)
        for name, value in holder.kind.extra_parameters(W0, A, B, holder.scaling).items():
            setattr(holder, name, self._parameter(value))
        holder._merge_norm = None

    # ----- named adapters ---------------------------------------------------------------------------
    def adapter(self, name: str) -> Any:
        """The holder of adapter ``name``: the layer itself for its first adapter, else a module."""
        if name == self.adapter_names[0]:
            return self
        return self.lora_adapters[name]

    def holders(self, names: list[str]) -> list[Any]:
        """``[self.adapter(n) for n in names]``, in one pass (a mixed batch asks for K at once)."""
        first = self.adapter_names[0]
        # the children of the NumPy AdapterDict and of torch's ModuleDict, by name
        others = self.lora_adapters._modules if len(self.adapter_names) > 1 else {}
        return [self if n == first else others[n] for n in names]

    def add_adapter(
        self,
        adapter_name: str,
        *,
        rng: np.random.Generator,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> Any:
        """Add a new adapter beside the existing ones (inactive: `set_adapter` activates it)."""
        check_adapter_name(adapter_name, "LoRALinear.add_adapter")
        if adapter_name in self.adapter_names:
            raise ValueError(
                f"LoRALinear.add_adapter: adapter {adapter_name!r} exists already; "
                f"the layer's adapters are {self.adapter_names}"
            )
        validate_lora_options(
            self.in_features, self.out_features, r, alpha, dropout, init, use_rslora, use_dora
        )
        if INITS[init].moves_W0:
            raise ValueError(
                f"LoRALinear.add_adapter: init={init!r} replaces W0 by a residual, which would change "
                f"the adapters {self.adapter_names} trained on W0; use 'kaiming' or 'gaussian'"
            )
        if use_dora and not self.plain_base:
            raise ValueError(
                f"LoRALinear.add_adapter: use_dora=True needs W0 itself, which a "
                f"{type(self.base).__name__} base does not hold"
            )
        holder = self._new_adapter()
        self._fill_adapter(holder, rng, r, alpha, dropout, init, use_rslora, use_dora)
        if "lora_adapters" not in self._adapter_children():
            self.lora_adapters = self._new_adapter_dict()
        self.lora_adapters[adapter_name] = holder
        self.adapter_names.append(adapter_name)
        return holder

    def _adapter_children(self) -> list[str]:
        return [name for name, _ in self.named_children()]  # type: ignore[attr-defined]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (not merged, not the layer's only one). If it is the first, the
        next adapter's parameters (the same objects) move onto the layer itself."""
        if len(self.adapter_names) == 1:
            raise ValueError(
                f"LoRALinear.delete_adapter: {name!r} is the layer's only adapter; replace the layer "
                "by its base instead"
            )
        stored = name
        if name == self.adapter_names[0]:
            stored = self.adapter_names[1]
            holder = self.lora_adapters[stored]
            for attr in ADAPTER_PARAMETERS:
                value = getattr(holder, attr, None)
                if value is not None:
                    setattr(self, attr, value)
                elif getattr(self, attr, None) is not None:
                    delattr(self, attr)
            for attr in ADAPTER_OPTIONS:
                setattr(self, attr, getattr(holder, attr))
            self._merge_norm = holder._merge_norm
        del self.lora_adapters[stored]
        if len(self.lora_adapters) == 0:
            delattr(self, "lora_adapters")
        self.adapter_names.remove(name)

    def copy_adapters_from(self, source: Any, to_param: Any) -> None:
        """Take ``source``'s adapter names, its second and later adapters (their parameters made by
        ``to_param``) and its active and merged lists: a twin conversion's named-adapter part
        (the first adapter, on the layer itself, is the converter's)."""
        for name in source.adapter_names[1:]:
            src, holder = source.adapter(name), self._new_adapter()
            for attr in ADAPTER_OPTIONS:
                setattr(holder, attr, getattr(src, attr))
            for attr in ("lora_A", "lora_B", *src.kind.extra_names):
                setattr(holder, attr, to_param(getattr(src, attr)))
            norm = src._merge_norm  # a merged DoRA adapter's ||W0 + ΔW||_row, for unmerge
            holder._merge_norm = None if norm is None else self._norm_from(norm)
            if "lora_adapters" not in self._adapter_children():
                self.lora_adapters = self._new_adapter_dict()
            self.lora_adapters[name] = holder
        self.adapter_names = list(source.adapter_names)
        self.active_adapter_names = list(source.active_adapter_names)
        self.merged_adapters = list(source.merged_adapters)

    def adapter_parameters(self, name: str) -> dict[str, Any]:
        """``{"lora_A": ..., "lora_B": ..., ["lora_magnitude_vector": ...]}`` of adapter ``name``."""
        holder = self.adapter(name)
        return {p: getattr(holder, p) for p in ("lora_A", "lora_B", *holder.kind.extra_names)}

    def forward_plan(self) -> tuple[str, Any]:
        """What the forward runs: ("base", None), ("one", holder), ("sum", holders) or
        ("mixed", (row_groups, holders)), following PEFT: disabled or merged -> the base alone;
        active adapters this layer lacks are skipped. A mixed batch none of whose adapters this
        layer holds (only "__base__" rows, say) gets no holders: the layer checks the rows, then
        runs its base."""
        if self.disabled or self.merged_adapters:
            return "base", None
        if self.mixed_rows is not None:
            routing = getattr(self, "mixed_routing", None)
            if routing is None or routing.rows is not self.mixed_rows:  # rows set by hand
                routing = route_rows(self.mixed_rows)
            elif id(self) in routing.plans:  # worked out by mixed_batch, for this batch
                return "mixed", routing.plans[id(self)]
            # the batch's adapters this layer holds, in the batch's (sorted) order: when the layer
            # holds them all, the segments are the batch's own, adjacent in the sorted rows
            held = set(self.adapter_names)
            used = [n for n in routing.position if n in held]
            return "mixed", (layer_groups(routing, used), self.holders(used))
        holders = [self.adapter(n) for n in self.active_adapter_names if n in self.adapter_names]
        if not holders:
            return "base", None
        if len(holders) == 1:
            return "one", holders[0]
        if any(h.use_dora for h in holders):
            raise ValueError(
                f"{self._describe()}: several active adapters {self.active_adapter_names} with a DoRA "
                "adapter among them is not supported; activate one DoRA adapter at a time"
            )
        return "sum", holders

    # ----- the first adapter's view, as the layer had before named adapters --------------------------
    @property
    def merged(self) -> bool:
        """Whether some adapter is merged into ``base.weight`` (see ``merged_adapters``)."""
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:
        self.merged_adapters = (
            [n for n in self.active_adapter_names if n in self.adapter_names] if value else []
        )

    @property
    def weight(self) -> Any:
        """The base weight W0 (ΔW included while merged)."""
        return self.base.weight

    @property
    def bias(self) -> Any:
        return self.base.bias

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add ΔW of each adapter (default: the active ones) into W0 in place, so inference costs
        exactly one matmul (no extra latency).

        With DoRA the merged weight is m * (W0 + ΔW) / ||W0 + ΔW||_row; the norm is kept for
        `unmerge`. A base without a plain W0 merges through its ``add_delta_``.
        """
        names = self._names_to_merge(adapter_names)
        already = [n for n in names if n in self.merged_adapters]
        if already:
            raise ValueError(
                f"LoRALinear.merge(): adapters {already} are already merged; call unmerge() first"
            )
        for name in names:
            self._move_delta(self.adapter(name), into_base=True)
            self.merged_adapters.append(name)

    def merge_problem(self, adapter_names: list[str] | None = None) -> str | None:
        """Why merging ``adapter_names`` (default: the active ones) would write a W0 that is not
        finite, or None: checked on every layer before `loralab.lora.merge_lora` changes one."""
        names = self._names_to_merge(adapter_names)
        if not names:
            return None
        base = self.base
        W0 = base.weight.data if self.plain_base else getattr(base, "dequantized_weight", None)
        if W0 is None:
            return None
        merged = _as_numpy(W0() if callable(W0) else W0).copy()
        with np.errstate(over="ignore", invalid="ignore"):
            for name in names:
                merged += _as_numpy(self.adapter(name).delta_weight())
                if not np.isfinite(merged).all():
                    return f"adapter {name!r} makes W0 + ΔW not finite in {merged.dtype}"
        return None

    def _names_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapter_names if adapter_names is None else adapter_names
        return [n for n in names if n in self.adapter_names]

    def unmerge(self) -> None:
        """Subtract every merged ΔW from W0 again (last merged first), restoring W0 up to round-off."""
        if not self.merged_adapters:
            raise ValueError("LoRALinear.unmerge(): the layer is not merged; nothing to unmerge")
        while self.merged_adapters:
            self._move_delta(self.adapter(self.merged_adapters[-1]), into_base=False)
            self.merged_adapters.pop()

    def _move_delta(self, holder: Any, into_base: bool) -> None:
        if self.plain_base:
            W = self.base.weight.data
            holder.kind.merge(holder, W) if into_base else holder.kind.unmerge(holder, W)
            return
        add = getattr(self.base, "add_delta_", None)
        if add is None:
            raise TypeError(
                f"LoRALinear.merge(): a {type(self.base).__name__} base has no add_delta_, so ΔW "
                "cannot be merged into it"
            )
        delta = holder.delta_weight()  # the backend's array (a torch tensor stays on its device)
        add(delta if into_base else -delta)

    def _describe(self) -> str:
        return (
            f"LoRALinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.r})"
        )

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        rs += ", use_dora=True" if self.use_dora else ""
        rs += f", init={self.init!r}" if INITS[self.init].moves_W0 else ""
        names = (
            "" if self.adapter_names == [DEFAULT_ADAPTER] else f", adapters={self.adapter_names}"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, dropout={self.dropout:g}{rs}, merged={self.merged}{names}"
        )


def check_not_in_mixed_batch(layers: list[tuple[str, Any]], where: str) -> None:
    """Refuse a change of adapters (merge, delete, add ...) inside a `mixed_batch` block: the
    block routes rows by the names it was given, and would run the changed layers wrongly."""
    if any(getattr(layer, "mixed_rows", None) is not None for _, layer in layers):
        raise ValueError(
            f"{where}: called inside a mixed_batch block, whose rows are routed by the adapters "
            "it was given; change adapters after the block ends"
        )


def _as_numpy(array: Any) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.detach().cpu().numpy()


def check_mixed_rows(where: str, n_names: int, x_shape: tuple[int, ...]) -> None:
    """A mixed batch names one adapter per row: x must be (batch, ..., in) with batch == n_names."""
    if len(x_shape) < 2 or x_shape[0] != n_names:
        raise ValueError(
            f"{where}: mixed_batch got {n_names} adapter names but x has shape {tuple(x_shape)}; "
            f"expected ({n_names}, ..., in_features), one name per row"
        )
