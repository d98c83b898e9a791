"""`LoRALinear`: a frozen linear base plus a trainable rank-r update (the NumPy layer).

    h = base(x) + s B A dropout(x)          (the paper's h = W0 x + (alpha / r) B A x)

with A of shape (r, in), B of shape (out, r) and s = alpha / r (alpha / sqrt(r) for rsLoRA).

The backend-neutral part (options, initialisation, ΔW, merging, named adapters, the base-layer
interface) is `loralab.lora.linear_shared.LoRALayerMixin`, shared with the torch layer; the
Functions the forward runs are in `loralab.lora.engine_functions`. Here: the NumPy layer, its parameters
and dropout masks, and the small modules that hold its further named adapters (`LoRAAdapter` in
an `AdapterDict`, ``layer.lora_adapters[name]``).

A plain `loralab.nn.Linear` runs the whole layer through the fused `LoRALinearFn` (or DoRA's).
Any other base runs ``base(x) + LoRABranchFn(x, A, B)``: the base computes its own part (e.g. by
dequantizing W0), and the branch's hand-derived backward gives dx, dA and dB. DoRA, PiSSA and OLoRA
need W0 itself, so they are refused on such a base.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, is_
from typing import Any

import numpy as np

from loralab import functional as F
from loralab.lora.engine_functions import (
    DoRALinearFn,
    GroupedLoRAFn,
    GroupedLoRALinearFn,
    LoRABranchFn,
    LoRALinearFn,
)
from loralab.lora.grouped import RowGroups, grouped_lora_linear_serve
from loralab.lora.linear_shared import (
    DEFAULT_ADAPTER,
    LINEAR_TYPES,
    AdapterMixin,
    LoRALayerMixin,
    check_mixed_rows,
    holders_with_dora,
)
from loralab.lora.stacked import AdapterStack, stack_parameters
from loralab.nn.layers import Linear, check_input
from loralab.nn.module import Module, Parameter, make_rng, recall, remember
from loralab.tensor import Tensor, is_grad_enabled

__all__ = ["LoRALinear", "LoRAAdapter", "AdapterDict"]

# a mixed batch reads these from K adapters per layer: C-level getters
_LORA_A, _LORA_B = attrgetter("lora_A"), attrgetter("lora_B")
_SCALING, _DATA = attrgetter("scaling"), attrgetter("data")
_A_DATA, _B_DATA = attrgetter("lora_A.data"), attrgetter("lora_B.data")

_FUNCTIONS = {"lora": LoRALinearFn, "dora": DoRALinearFn}  # the layer's kind -> its fused Function


class LoRALinear(LoRALayerMixin, Module):
    """A frozen linear base plus a trainable rank-r update.

    $$h = W_0 x + b + \\frac{\\alpha}{r} B A x$$

    Parameters
    ----------
    base : Linear (or a registered linear-like module, see the module docstring)
        The pre-trained layer; kept as the field ``base`` and frozen (W0 and b get no gradient).
    r : int, default 8
        Rank of the update, 1 <= r <= min(in_features, out_features).
    alpha : float, default 8
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
        alpha: float = 8,
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

    def _mixed_forward(self, x: Tensor, groups: RowGroups, holders: list[Any]) -> Tensor:
        """base(x) + the grouped op: the batch's rows, sorted by adapter once for every layer
        (``groups``, one segment per holder), each through its own adapter."""
        check_mixed_rows(self._describe(), groups.order.size, x.shape)
        if not holders:  # no row uses an adapter of this layer
            return self.base(x)
        if self.training and any(h.dropout > 0.0 for h in holders):
            raise ValueError(
                f"{self._describe()}: a mixed batch runs without dropout; call model.eval() or use "
                "adapters with dropout=0"
            )
        serving = self.plain_base and not is_grad_enabled()  # no graph, so no Function
        current = self._current_stack(holders) if serving else None
        A: Sequence[np.ndarray]
        B: Sequence[np.ndarray]
        scalings: Sequence[float]
        stack: tuple[AdapterStack, Sequence[int]] | None
        if current is not None:  # the common case: nothing to build, every view in place
            stack, A, B = current
            scalings = stack[0].scaling_key
        else:
            As = list(map(_LORA_A, holders))
            Bs = list(map(_LORA_B, holders))
            each = list(map(_SCALING, holders))
            stack = self._stacked(holders, As, Bs, each)
            scalings = each
            if serving:  # (a new stack, or adapters that are not stacked)
                A, B = list(map(_DATA, As)), list(map(_DATA, Bs))
        if serving:
            b = self.base.bias
            bias = None if b is None else b.data
            W0 = self.base.weight.data
            return Tensor(
                grouped_lora_linear_serve(x.data, W0, bias, groups, A, B, scalings, stack)
            )
        if self.plain_base:
            W0, b = self.base.weight, self.base.bias
            return GroupedLoRALinearFn.apply(
                x, W0, b, *As, *Bs, index=groups, scalings=scalings, stack=stack
            )
        y = GroupedLoRAFn.apply(x, *As, *Bs, index=groups, scalings=scalings, stack=stack)
        return self.base(x) + y

    def _batch_holders(self, used: list[str]) -> tuple[list[str], list[Any], list[str]]:
        """`loralab.lora.linear_shared.batch_holders` for a mixed batch of adapters ``used``,
        remembered until `loralab.nn.module.edit_count` moves: a serving batch asks for the same
        K adapters again and again (the returned list is shared: do not change it)."""
        found = recall(self, "_holders_seen", used)
        if found is None:
            found = remember(self, "_holders_seen", list(used), holders_with_dora(self, used))
        return found

    def _current_stack(
        self, holders: list[Any]
    ) -> tuple[tuple[AdapterStack, range], list[np.ndarray], list[np.ndarray]] | None:
        """The layer's stack and its slots when ``holders`` are all of its adapters (in name
        order, as `forward_plan` gives them) and each still holds its views of it with the same
        scaling: what `_stacked` would return, read straight from the holders, with the K
        views of A and the K of B as lists. Else None.

        Checked once, then remembered until `loralab.nn.module.edit_count` moves (a parameter
        given a new array, a scaling set, an adapter added ...): a serving batch of K = 256
        adapters otherwise spends its Python time reading 3K attributes per layer, from objects
        that the products have pushed out of the CPU's cache.
        """
        stack = self.__dict__.get("_adapter_stack")
        key = (id(stack), holders)  # (the stack kept alive by what is remembered: a unique id)
        found = recall(self, "_stack_seen", key)
        if found is not None:
            return found
        k = len(holders)
        if stack is None or k != len(self.adapter_names) or len(stack.views) != 2 * k:
            return None
        views = stack.views
        if not (
            all(map(is_, map(_A_DATA, holders), views[:k]))
            and all(map(is_, map(_B_DATA, holders), views[k:]))
            and stack.scaling_key == tuple(map(_SCALING, holders))
        ):
            return None
        # the lists are kept too: slicing ``views`` anew for every batch touches all 2K arrays
        current = (stack, range(k)), list(views[:k]), list(views[k:])
        params = (*map(_LORA_A, holders), *map(_LORA_B, holders))
        if all(isinstance(p, Parameter) for p in params):  # (whose new arrays are counted)
            remember(self, "_stack_seen", (id(stack), list(holders)), current)
        return current

    def _stacked(
        self, holders: list[Any], As: list[Parameter], Bs: list[Parameter], scalings: list[float]
    ) -> tuple[AdapterStack, range | list[int]] | None:
        """Every adapter of this layer stacked in name order (`loralab.lora.stacked`: built
        once, then reused while the adapters' parameters hold their slices), and the slot of
        each of ``holders``; None when the adapters differ in rank or dtype.

        ``holders`` come in the batch's order (by name, `forward_plan`): when they are all of
        the layer's adapters, they are the stack's order and every slot is theirs.
        """
        slots: range | list[int] = range(len(holders))
        if len(holders) != len(self.adapter_names):  # the batch uses some: stack them all
            everyone = self.holders(sorted(self.adapter_names))
            where = {id(h): k for k, h in enumerate(everyone)}
            slots = [where[id(h)] for h in holders]
            As = [h.lora_A for h in everyone]
            Bs = [h.lora_B for h in everyone]
            scalings = [h.scaling for h in everyone]
        stack = stack_parameters(As, Bs, scalings, self.__dict__.get("_adapter_stack"))
        object.__setattr__(self, "_adapter_stack", stack)
        return None if stack is None else (stack, slots)


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
