"""Backends: how the one implementation of injection, merging and the adapter format reaches a model.

`loralab.lora.inject` and `loralab.lora.peft_format` are written once, for any kind of model; what
differs between a `loralab.nn.Module` and a ``torch.nn.Module`` is small and lives in a
`Backend`: which layer type is the LoRA layer, which types it wraps, how to build one, and how to
move arrays in and out of parameters. The NumPy backend is registered here; the torch twin
registers its own from `loralab.torch` (the core never imports torch):

    register_backend(lambda model: isinstance(model, torch.nn.Module), TorchBackend())

`backend_for(model)` picks the first registered backend whose predicate accepts the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from loralab.lora.embedding_layer import EMBEDDING_TYPES, LoRAEmbedding
from loralab.lora.linear_layer import LoRALinear
from loralab.lora.linear_shared import LINEAR_TYPES
from loralab.nn.layers import Linear
from loralab.nn.module import Module, remembered

__all__ = ["Backend", "NumpyBackend", "register_backend", "backend_for"]


class Backend:
    """What a kind of model must tell loralab's LoRA functions; subclasses fill in the blanks.

    ``lora_type`` is the backend's LoRA layer class; ``linear_types()`` the module types it wraps;
    ``build(base, **options)`` makes a LoRA layer (options as `LoRALinear`'s keywords, ``rng``
    included); ``get``/``set`` read and write a parameter of a LoRA layer as an ndarray;
    ``copy`` returns a detached copy of a parameter; ``set_trainable`` sets its requires_grad.
    """

    lora_type: type
    embedding_lora_type: type | None = None  # the backend's LoRAEmbedding, if it has one

    def linear_types(self) -> tuple[type, ...]:
        raise NotImplementedError

    def embedding_types(self) -> tuple[type, ...]:
        """The embedding module types ``embedding_lora_type`` wraps (none by default)."""
        return ()

    def lora_types(self) -> tuple[type, ...]:
        """Every LoRA layer class of the backend: ``lora_type`` and ``embedding_lora_type``."""
        extra = () if self.embedding_lora_type is None else (self.embedding_lora_type,)
        return (self.lora_type, *extra)

    def build(self, base: Any, **options: Any) -> Any:
        if isinstance(base, self.embedding_types()):
            assert self.embedding_lora_type is not None
            return self.embedding_lora_type(base, **options)
        return self.lora_type(base, **options)

    def get(self, layer: Any, name: str) -> np.ndarray:
        raise NotImplementedError

    def set(self, layer: Any, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def copy(self, param: Any) -> Any:
        raise NotImplementedError

    def set_trainable(self, param: Any, flag: bool) -> None:
        raise NotImplementedError

    def remembered(self, model: Any, slot: str, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, worked out anew for every call: a backend whose models count their edits
        (`NumpyBackend`) keeps it on ``model`` until the model changes."""
        return build()

    # ----- written once, from the blanks above -----
    def lora_layers(self, model: Any) -> list[tuple[str, Any]]:
        """(dotted name, layer) for every LoRA layer of ``model``, in module order.

        The walk of ``named_modules`` (depth first, each module once), except that it does not go
        inside a LoRA layer: none holds another, and a layer with K adapters holds K modules
        that every mixed batch would otherwise visit.
        """
        kinds = self.lora_types()
        if not hasattr(model, "named_children"):  # a model that only lists its modules
            return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
        found, seen, stack = [], set(), [("", model)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, kinds):
                found.append((name, module))
                continue
            children = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
            stack.extend(reversed(children))
        return found

    def linear_shape(self, model: Any, path: str) -> tuple[int, int] | None:
        """(out, in) of the linear or LoRA layer at ``path``; None if there is none."""
        try:
            module: Any = model.get_submodule(path)
        except AttributeError:
            return None
        if not isinstance(module, (*self.linear_types(), self.lora_type)):
            return None
        layer: Any = module  # a linear-like module: in_features and out_features
        return layer.out_features, layer.in_features

    def holds_W0(self, model: Any, path: str) -> bool:
        """Whether the linear module at ``path`` keeps W0 as a plain weight (DoRA, PiSSA, OLoRA need it)."""
        return True

    def linear_names(self, model: Any) -> list[str]:
        kinds = (*self.linear_types(), self.lora_type)
        return [n for n, m in model.named_modules() if isinstance(m, kinds)]

    def attach(self, model: Any, path: str, options: dict[str, Any]) -> Any:
        """Wrap the module at ``path`` in a LoRA layer built with ``options``; return the layer."""
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        layer = self.build(getattr(owner, child), **options)
        setattr(owner, child, layer)
        return layer

    def freeze_base(self, model: Any) -> None:
        """Only the LoRA parameters (``lora_*``) stay trainable."""
        for name, p in model.named_parameters():
            self.set_trainable(p, ".lora_" in f".{name}")


class NumpyBackend(Backend):
    """The backend of `loralab.nn.Module` models."""

    lora_type = LoRALinear
    embedding_lora_type = LoRAEmbedding

    def linear_types(self) -> tuple[type, ...]:
        return tuple(LINEAR_TYPES)

    def embedding_types(self) -> tuple[type, ...]:
        return tuple(EMBEDDING_TYPES)

    def lora_layers(self, model: Any) -> list[tuple[str, Any]]:
        """`Backend.lora_layers`, remembered on the model until `loralab.nn.edit_count` moves
        (every module added, replaced or removed moves it): a mixed batch asks for every batch."""
        return list(
            remembered(model, "_lora_layers_seen", None, lambda: Backend.lora_layers(self, model))
        )

    def remembered(self, model: Any, slot: str, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, kept on ``model`` under ``slot`` for an equal ``key`` until
        `loralab.nn.edit_count` moves (`loralab.nn.module.recall`); a ``build`` that raises keeps
        nothing."""
        return remembered(model, slot, key, build)

    def holds_W0(self, model: Any, path: str) -> bool:
        module = model.get_submodule(path)
        return module.plain_base if isinstance(module, LoRALinear) else isinstance(module, Linear)

    def get(self, layer: Any, name: str) -> np.ndarray:
        return getattr(layer, name).data

    def set(self, layer: Any, name: str, value: np.ndarray) -> None:
        param = getattr(layer, name)
        param.data = np.ascontiguousarray(value, dtype=param.dtype)

    def copy(self, param: Any) -> np.ndarray:
        return param.data.copy()

    def set_trainable(self, param: Any, flag: bool) -> None:
        param.requires_grad = flag


_BACKENDS: list[tuple[Callable[[Any], bool], Backend]] = [
    (lambda model: isinstance(model, Module), NumpyBackend())
]


def register_backend(predicate: Callable[[Any], bool], backend: Backend) -> None:
    """Serve models for which ``predicate(model)`` is true with ``backend`` (checked in order)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend: expected a Backend, got {type(backend).__name__}")
    _BACKENDS.append((predicate, backend))


def backend_for(model: Any, what: str = "loralab.lora") -> Backend:
    """The registered backend for ``model``; TypeError naming ``what`` if there is none."""
    for predicate, backend in _BACKENDS:
        if predicate(model):
            return backend
    raise TypeError(
        f"{what}: expected a loralab.nn.Module (or a torch.nn.Module, once loralab.torch is "
        f"imported), got {type(model).__name__}"
    )
