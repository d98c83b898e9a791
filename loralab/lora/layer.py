"""`LoRALinear`: a frozen linear base plus a trainable rank-r update, and the Functions it runs.

    h = base(x) + s B A dropout(x)          (the paper's h = W0 x + (alpha / r) B A x)

with A of shape (r, in), B of shape (out, r) and s = alpha / r (alpha / sqrt(r) for rsLoRA).

Shared by both backends
-----------------------
`LoRALayerMixin` holds everything the NumPy layer here and the torch layer
(`loralab.torch.layers.LoRALinear`) have in common: validation, the options, initialisation (in
NumPy, so both start from the same values bit for bit), ΔW, merging, unmerging and the repr. A
backend adds its parameters, dropout masks and forward Functions (`LoRALinearFn`, `DoRALinearFn`,
`LoRABranchFn` here, each a thin wrapper over `loralab.lora.ops`).

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
or routes each row of a mixed batch through its own adapter (`GroupedLoRALinearFn`, the grouped
op of `loralab.lora.grouped`). Why this layout: every existing model, twin, test and adapter file
keeps its names; see docs/guides/many_adapters.md.

A plain `loralab.nn.Linear` runs the whole layer through the fused `LoRALinearFn` (or DoRA's).
Any other base runs ``base(x) + LoRABranchFn(x, A, B)``: the base computes its own part (e.g. by
dequantizing W0), and the branch's hand-derived backward gives dx, dA and dB. DoRA, PiSSA and OLoRA
need W0 itself, so they are refused on such a base.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralab import functional as F
from loralab._validate import boolean, positive_int, probability
from loralab.lora.config import (
    check_rank_fits,
    lora_init,
    lora_scaling,
    positive_number,
)
from loralab.lora.grouped import grouped_lora_backward, grouped_lora_forward
from loralab.lora.ops import (
    branch_backward,
    branch_forward,
    dora_backward,
    dora_forward,
    lora_backward,
    lora_backward_dW0,
    lora_forward,
)
from loralab.lora.variants import INITS, KINDS
from loralab.nn.layers import Linear, check_input
from loralab.nn.module import Module, Parameter, make_rng
from loralab.tensor import Function, Tensor, as_tensor

__all__ = [
    "LoRALinear",
    "LoRALayerMixin",
    "LoRALinearFn",
    "DoRALinearFn",
    "LoRABranchFn",
    "GroupedLoRAFn",
    "GroupedLoRALinearFn",
    "AdapterMixin",
    "LoRAAdapter",
    "AdapterDict",
    "DEFAULT_ADAPTER",
    "BASE_ROWS",
    "check_adapter_name",
    "check_mixed_rows",
    "lora_linear",
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
) -> None:
    """Raise a clear error for a bad LoRA option (shared by the NumPy and torch layers).

    A wrong type is a TypeError, a wrong value a ValueError; alpha must be finite and positive;
    r at most min(in_features, out_features) (`loralab.lora.config.check_rank_fits`).
    """
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

ADAPTER_OPTIONS = ("r", "alpha", "dropout", "init", "use_rslora", "use_dora", "scaling")
ADAPTER_PARAMETERS = ("lora_A", "lora_B", "lora_magnitude_vector")


def check_adapter_name(name: Any, where: str) -> str:
    """``name`` if it can name an adapter: a non-empty str without '.', not ``"__base__"``."""
    if not isinstance(name, str):
        raise TypeError(
            f"{where}: adapter_name must be a str, got {name!r} ({type(name).__name__})"
        )
    if not name or "." in name or name == BASE_ROWS or name.startswith("_"):
        raise ValueError(
            f"{where}: adapter_name={name!r} is not a valid adapter name (non-empty, no '.', "
            f"not starting with '_', not {BASE_ROWS!r})"
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
    per batch row, set by `loralab.lora.adapters.mixed_batch`) routes each row through its own.
    """

    base: Any
    in_features: int
    out_features: int
    plain_base: bool
    adapter_names: list[str]
    active_adapter_names: list[str]
    merged_adapters: list[str]
    disabled: bool
    mixed_rows: list[str] | None
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

    def add_adapter(
        self,
        adapter_name: str,
        *,
        rng: np.random.Generator,
        r: int = 8,
        alpha: float = 16,
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
        ("mixed", (row_index, holders)), following PEFT: disabled or merged -> the base alone;
        active adapters this layer lacks are skipped."""
        if self.disabled or self.merged_adapters:
            return "base", None
        if self.mixed_rows is not None:
            asked = set(self.mixed_rows)
            used = [n for n in self.adapter_names if n in asked]
            position = {n: k for k, n in enumerate(used)}
            index = np.array([position.get(n, -1) for n in self.mixed_rows], dtype=np.int64)
            return "mixed", (index, [self.adapter(n) for n in used])
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

    def _names_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            return [n for n in self.active_adapter_names if n in self.adapter_names]
        return [n for n in adapter_names if n in self.adapter_names]

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


# ----- the Functions --------------------------------------------------------------------------------
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
    `loralab.lora.grouped.grouped_lora_backward` (so one batch trains several adapters at once)."""

    @staticmethod
    def forward(ctx, x, *AB, index, scalings):
        k = len(scalings)
        y, cache = grouped_lora_forward(x, index, AB[:k], AB[k:], scalings)
        ctx.save_for_backward(cache)
        return y

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved
        dx, dAs, dBs = grouped_lora_backward(grad, cache, need_dx=ctx.needs_input_grad[0])
        return (dx, *dAs, *dBs)


class GroupedLoRALinearFn(Function):
    """A mixed batch through a plain Linear base, fused: ``y = x W0^T + b`` plus, in place, each
    row's ``s_k B_k A_k x_i`` (`GroupedLoRAFn`'s part), over (x, W0, b, A_1..A_K, B_1..B_K).

    Backward: dx = dy W0 + the grouped part's dx; db = sum dy; dW0 = dy^T x only if W0 asks.
    """

    @staticmethod
    def forward(ctx, x, W0, b, *AB, index, scalings):
        k = len(scalings)
        y = x @ W0.T
        if b is not None:
            y += b
        y, cache = grouped_lora_forward(x, index, AB[:k], AB[k:], scalings, out=y)
        ctx.save_for_backward(cache, x, W0)
        return y

    @staticmethod
    def backward(ctx, grad):
        cache, x, W0 = ctx.saved
        need = ctx.needs_input_grad
        dx, dAs, dBs = grouped_lora_backward(grad, cache, need_dx=need[0])
        if dx is not None:
            dx += grad @ W0
        g2 = grad.reshape(-1, grad.shape[-1])
        dW0 = g2.T @ x.reshape(-1, x.shape[-1]) if need[1] else None
        db = g2.sum(axis=0) if need[2] else None
        return (dx, dW0, db, *dAs, *dBs)


_FUNCTIONS = {"lora": LoRALinearFn, "dora": DoRALinearFn}  # the layer's kind -> its fused Function


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


# ----- the NumPy layer ------------------------------------------------------------------------------
class LoRALinear(LoRALayerMixin, Module):
    """A frozen linear base plus a trainable rank-r update.

    $$h = W_0 x + b + \\frac{\\alpha}{r} B A x$$

    Parameters
    ----------
    base : Linear (or a registered linear-like module, see the module docstring)
        The pre-trained layer; kept as the field ``base`` and frozen (W0 and b get no gradient).
    r : int, default 8
        Rank of the update, 1 <= r <= min(in_features, out_features).
    alpha : float, default 16
        The scaling numerator, finite and positive: scaling = alpha / r (alpha / sqrt(r) with
        ``use_rslora``).
    dropout : float in [0, 1), default 0.0
        Dropout on the LoRA branch's input (training mode only), as in PEFT.
    init : "kaiming", "gaussian", "pissa" or "olora"
        A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform with a=sqrt(5)), or A ~ N(0, (1/r)^2)
        (PEFT's "gaussian"); B = 0 either way, so ΔW = 0 at first. "pissa" and "olora" instead
        put the top-r singular part (PiSSA) or the first r QR columns (OLoRA) of W0 into A and B
        and keep the residual W0 - s B A frozen in ``base.weight`` (see
        `loralab.lora.variants`); the layer's output is unchanged at initialisation.
    use_rslora : bool, default False
        Rank-stabilised scaling alpha / sqrt(r).
    use_dora : bool, default False
        DoRA: a trainable magnitude m per output row, W' = m * (W0 + s B A) / ||W0 + s B A||_row,
        the norm held constant in the backward; m starts at ||W0 + s B A||_row.
    seed, rng : source of A's initial values and of the dropout masks.

    Attributes
    ----------
    lora_A : Parameter of shape (r, in_features)
    lora_B : Parameter of shape (out_features, r)
    lora_magnitude_vector : Parameter of shape (out_features,), only with ``use_dora``
    scaling : float
    merged : bool
        Whether ΔW is currently added into ``base.weight``.

    Examples
    --------
    >>> from loralab.nn import Linear
    >>> layer = LoRALinear(Linear(6, 4, seed=0), r=2, alpha=4, seed=1)
    >>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling
    ((2, 6), (4, 2), 2.0)
    """

    def __init__(
        self,
        base: Any,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ):
        if not isinstance(base, tuple(LINEAR_TYPES)):
            raise TypeError(
                f"LoRALinear: base must be a loralab.nn.Linear, got {type(base).__name__} "
                "(other linear-like types: loralab.lora.register_linear_type)"
            )
        super().__init__()
        self.rng = make_rng(seed, rng)
        self._init_lora(base, self.rng, r, alpha, dropout, init, use_rslora, use_dora, adapter_name)

    def _weight_array(self, base: Any) -> np.ndarray | None:
        return base.weight.data if isinstance(base, Linear) else None

    def _new_adapter(self) -> LoRAAdapter:
        return LoRAAdapter()

    def _norm_from(self, norm: Any) -> np.ndarray:
        data = norm.detach().cpu().numpy() if hasattr(norm, "detach") else norm
        return np.array(data)

    def _new_adapter_dict(self) -> AdapterDict:
        return AdapterDict()

    def _set_weight(self, array: np.ndarray) -> None:
        self.base.weight.data = array

    def _parameter(self, array: np.ndarray) -> Parameter:
        return Parameter(array)

    def weight_row_norms(self, W: np.ndarray) -> np.ndarray:
        return np.linalg.norm(W, axis=1)

    def forward(self, x: Any) -> Tensor:
        """x of shape (..., in_features) -> h of shape (..., out_features)."""
        x = check_input(self._describe(), x, self.in_features)
        route, what = self.forward_plan()
        if route == "base":
            return self.base(x)
        if route == "mixed":
            return self._mixed_forward(x, *what)
        holders = [what] if route == "one" else what
        masks = [self._mask(x, h) for h in holders]
        if route == "one" and self.plain_base:
            h = holders[0]
            extra = [getattr(h, name) for name in h.kind.extra_names]
            W0, b = self.base.weight, self.base.bias
            fn = _FUNCTIONS[h.kind.name]
            return fn.apply(x, W0, b, h.lora_A, h.lora_B, *extra, scaling=h.scaling, mask=masks[0])
        y = self.base(x)
        for h, mask in zip(holders, masks, strict=True):
            y = y + LoRABranchFn.apply(x, h.lora_A, h.lora_B, scaling=h.scaling, mask=mask)
        return y

    def _mask(self, x: Tensor, holder: Any) -> np.ndarray | None:
        if self.training and holder.dropout > 0.0:
            return F.dropout_mask(x.shape, holder.dropout, self.rng, x.dtype)
        return None

    def _mixed_forward(self, x: Tensor, index: np.ndarray, holders: list[Any]) -> Tensor:
        """base(x) + the grouped op: row i through adapter index[i] (-1: none)."""
        check_mixed_rows(self._describe(), len(index), x.shape)
        if self.training and any(h.dropout > 0.0 for h in holders):
            raise ValueError(
                f"{self._describe()}: a mixed batch runs without dropout; call model.eval() or use "
                "adapters with dropout=0"
            )
        rows = np.broadcast_to(index.reshape((-1,) + (1,) * (x.ndim - 2)), x.shape[:-1])
        As = [h.lora_A for h in holders]
        Bs = [h.lora_B for h in holders]
        scalings = [h.scaling for h in holders]
        if self.plain_base:
            W0, b = self.base.weight, self.base.bias
            return GroupedLoRALinearFn.apply(x, W0, b, *As, *Bs, index=rows, scalings=scalings)
        return self.base(x) + GroupedLoRAFn.apply(x, *As, *Bs, index=rows, scalings=scalings)


def check_mixed_rows(where: str, n_names: int, x_shape: tuple[int, ...]) -> None:
    """A mixed batch names one adapter per row: x must be (batch, ..., in) with batch == n_names."""
    if len(x_shape) < 2 or x_shape[0] != n_names:
        raise ValueError(
            f"{where}: mixed_batch got {n_names} adapter names but x has shape {tuple(x_shape)}; "
            f"expected ({n_names}, ..., in_features), one name per row"
        )


class LoRAAdapter(AdapterMixin, Module):
    """A second (third ...) adapter of a NumPy `LoRALinear`: its A, B (m) and options."""

    def weight_row_norms(self, W: np.ndarray) -> np.ndarray:
        return np.linalg.norm(W, axis=1)


class AdapterDict(Module):
    """Adapters by name (``layer.lora_adapters``), as ``torch.nn.ModuleDict`` holds them."""

    def __getitem__(self, name: str) -> Any:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    def __delitem__(self, name: str) -> None:
        delattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self) -> list[str]:
        return list(self._modules)
