"""``Module`` and ``Parameter``: the bookkeeping that turns functions into layers with named weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from loralab._validate import boolean
from loralab.tensor import Tensor

__all__ = ["Module", "Parameter", "edit_count", "recall", "remember", "remembered", "make_rng"]

_EDITS = [0]  # see edit_count


def make_rng(
    seed: int | None = None, rng: np.random.Generator | None = None
) -> np.random.Generator:
    """The generator a layer draws from: ``rng`` if given, else one built from ``seed``."""
    if rng is not None and seed is not None:
        raise ValueError(f"pass seed or rng, not both (got seed={seed!r} and an rng)")
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return rng
    return np.random.default_rng(seed)


def edit_count() -> int:
    """How many edits this process has made to any model's parameters or options: each time a
    `Parameter` is given an array (``p.data = ...``, also ``p.data += ...``) and each time a
    `Module` attribute is set or deleted (except a class's ``Module._quiet`` attributes).

    While it has not moved, whatever was worked out from a model's parameters and options still
    holds, so a cache keyed on it can skip checking them one by one (a mixed batch's stack of
    256 adapters, `loralab.lora.LoRALinear`). An edit *inside* an array (``p.data[0] = 1``)
    does not move it: the array is the same object, and what reads it reads the new values.
    """
    return _EDITS[0]


def recall(owner: Any, slot: str, key: Any) -> Any:
    """What `remember` kept on ``owner`` under ``slot`` for an equal ``key``, while
    `edit_count` has not moved since; else None."""
    seen = owner.__dict__.get(slot)
    if seen is not None and seen[0] == _EDITS[0] and seen[1] == key:
        return seen[2]
    return None


def remember(owner: Any, slot: str, key: Any, value: Any) -> Any:
    """Keep ``value`` (not None) on ``owner`` under ``slot`` for ``key``, until `edit_count`
    moves (`recall`); returns ``value``. Kept without counting as an edit."""
    object.__setattr__(owner, slot, (_EDITS[0], key, value))
    return value


def remembered(owner: Any, slot: str, key: Any, build: Callable[[], Any]) -> Any:
    """`recall` on ``owner``, else ``build()`` kept by `remember`; a ``build`` that raises keeps
    nothing."""
    found = recall(owner, slot, key)
    return remember(owner, slot, key, build()) if found is None else found


class Parameter(Tensor):
    """A Tensor that belongs to a Module and, unless frozen, requires a gradient.

    Parameters
    ----------
    data : array_like
    requires_grad : bool, default True
        False for a frozen weight (such as W0 under LoRA).
    """

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "data":  # a new array: counted (`edit_count`)
            _EDITS[0] += 1
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"
        )


class Module:
    """Base class of layers and models.

    Assigning a `Parameter` or a ``Module`` to an attribute registers it, in order, so that
    `named_parameters` yields dotted names like PyTorch's (``"layers.0.weight"``).
    Subclasses call ``super().__init__()`` first and define ``forward``.
    """

    _quiet: frozenset[str] = frozenset()
    """Attributes that a forward reads but no cache depends on (a mixed batch's rows, set for
    every batch): setting them does not move `edit_count`."""

    # Set in __init__ through object.__setattr__ (they are the registries __setattr__ fills).
    _parameters: dict[str, Parameter]
    _modules: dict[str, Module]
    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        if name not in self._quiet:
            _EDITS[0] += 1
        # Assigning to an existing key keeps its place, so a wrapped child keeps its order.
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._modules[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        _EDITS[0] += 1
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ----- traversal ------------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (named ``prefix``, "" at the top) and every descendant, depth first."""
        stack = [(prefix, self)]
        seen: set[int] = set()
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) for every parameter, each shared parameter once."""
        seen: set[int] = set()
        for mod_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, path: str) -> Module:
        """The module at dotted ``path`` ("" is this module)."""
        module = self
        for part in path.split(".") if path else []:
            if part not in module._modules:
                raise AttributeError(
                    f"{type(module).__name__} has no submodule {part!r} (in {path!r})"
                )
            module = module._modules[part]
        return module

    # ----- modes and gradients ------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout active) for this module and its descendants."""
        mode = boolean("mode", mode, f"{type(self).__name__}.train")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Forget every parameter's gradient."""
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter."""
        requires_grad = boolean(
            "requires_grad", requires_grad, f"{type(self).__name__}.requires_grad_"
        )
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    # ----- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter's values, by dotted name."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy values from ``state`` into the parameters, all or nothing.

        Parameters
        ----------
        state : dict of name -> array_like
        strict : bool, default True
            Refuse missing and unexpected keys. Mis-shaped values are always refused.

        Raises
        ------
        KeyError
            Listing the missing and unexpected keys (strict mode).
        ValueError
            Naming each key whose shape differs, with both shapes.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        wrong = [
            f"{k}: model has {params[k].shape}, state has {np.shape(v)}"
            for k, v in state.items()
            if k in params and np.shape(v) != params[k].shape
        ]
        if wrong:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: shape mismatch: " + "; ".join(wrong)
            )
        for k, v in state.items():
            if k in params:
                np.copyto(params[k].data, np.asarray(v), casting="same_kind")

    # ----- printing ---------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"
