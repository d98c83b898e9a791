"""How `loralab.lora.adapter` (the one implementation of PEFT's format) reads and writes torch models.

``save_adapter`` and ``load_adapter`` pick this backend when given a ``torch.nn.Module``; it has
the same methods as `loralab.lora.adapter.NumpyBackend`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loralab.torch.layers import LoRALinear

__all__ = ["TorchBackend"]


class TorchBackend:
    """The torch side of the adapter format: find LoRA layers, read and write A, B and DoRA's m.

    ``name`` is a parameter name of `LoRALinear`: ``"lora_A"``, ``"lora_B"`` or
    ``"lora_magnitude_vector"``; ``options`` are `LoRALinear`'s keyword arguments (``use_dora``
    included).
    """

    def lora_layers(self, model: torch.nn.Module) -> list[tuple[str, LoRALinear]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

    def linear_shape(self, model: torch.nn.Module, path: str) -> tuple[int, int] | None:
        """(out, in) of the Linear or LoRALinear at ``path``; None if there is none."""
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(module, (torch.nn.Linear, LoRALinear)):
            return module.out_features, module.in_features
        return None

    def linear_names(self, model: torch.nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, LoRALinear))]

    def get(self, layer: LoRALinear, name: str) -> np.ndarray:
        return getattr(layer, name).detach().cpu().numpy()

    def set(self, layer: LoRALinear, name: str, value: np.ndarray) -> None:
        param = getattr(layer, name)
        with torch.no_grad():  # copy_ casts to the parameter's dtype and device
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def attach(self, model: torch.nn.Module, path: str, options: dict[str, Any]) -> LoRALinear:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        layer = LoRALinear(getattr(owner, child), **options)
        setattr(owner, child, layer)
        return layer

    def freeze_base(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in f".{name}")
