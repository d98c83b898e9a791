"""Layers and models on the autograd engine: ``Module``, ``Linear`` and friends (LoRA: `loralab.lora`)."""

from typing import TYPE_CHECKING, Any

from loralab._deprecated import moved_attribute
from loralab.nn.layers import GELU, MLP, Dropout, Embedding, LayerNorm, Linear, ReLU, Sequential
from loralab.nn.module import Module, Parameter, edit_count

__all__ = [
    "Module",
    "Parameter",
    "Linear",
    "Embedding",
    "LayerNorm",
    "ReLU",
    "GELU",
    "Dropout",
    "Sequential",
    "MLP",
    "edit_count",
]

if not TYPE_CHECKING:  # mypy would otherwise accept any attribute of loralab.nn

    def __getattr__(name: str) -> Any:
        """0.1's ``loralab.nn.LoRALinear`` with a DeprecationWarning; removed in 0.3."""
        return moved_attribute(__name__, name)
