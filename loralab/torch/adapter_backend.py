"""The torch backend of `loralab.lora` (injection, merging, the adapter format), registered on import.

`loralab.torch` registers `TorchBackend` with `loralab.lora.register_backend`, so the one
implementation of ``inject_lora``, ``merge_lora``, ``lora_layers``, ``save_adapter`` and
``load_adapter`` in `loralab.lora` also serves ``torch.nn.Module`` models; the core never
imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loralab.lora.backend import Backend
from loralab.torch.embedding import LoRAEmbedding
from loralab.torch.layers import LINEAR_TYPES, LoRALinear

__all__ = ["TorchBackend", "is_torch_model"]


def is_torch_model(model: Any) -> bool:
    """Whether ``model`` is a ``torch.nn.Module`` (the test `register_backend` pairs with `TorchBackend`)."""
    return isinstance(model, torch.nn.Module)


class TorchBackend(Backend):
    """Find, build, read and write `loralab.torch.LoRALinear` layers of a torch model.

    ``use_custom_backward`` is passed to every layer it builds (see `LoRALinear`).
    """

    lora_type = LoRALinear
    embedding_lora_type = LoRAEmbedding

    def __init__(self, use_custom_backward: bool = True):
        self.use_custom_backward = use_custom_backward

    def linear_types(self) -> tuple[type, ...]:
        return tuple(LINEAR_TYPES)  # torch.nn.Linear and the registered linear-like types

    def embedding_types(self) -> tuple[type, ...]:
        return (torch.nn.Embedding,)

    def build(self, base: Any, **options: Any) -> LoRALinear | LoRAEmbedding:
        cls = LoRAEmbedding if isinstance(base, torch.nn.Embedding) else LoRALinear
        return cls(base, use_custom_backward=self.use_custom_backward, **options)

    def get(self, layer: Any, name: str) -> np.ndarray:
        return getattr(layer, name).detach().cpu().numpy()

    def set(self, layer: Any, name: str, value: np.ndarray) -> None:
        param = getattr(layer, name)
        with torch.no_grad():  # copy_ casts to the parameter's dtype and device
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def copy(self, param: Any) -> torch.Tensor:
        return param.detach().clone()

    def set_trainable(self, param: Any, flag: bool) -> None:
        param.requires_grad_(flag)
