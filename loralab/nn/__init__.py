"""Layers and models on the autograd engine: ``Module``, ``Linear``, ``LoRALinear`` and friends."""

from loralab.nn.layers import GELU, MLP, Dropout, Embedding, LayerNorm, Linear, ReLU, Sequential
from loralab.nn.lora import LoRALinear
from loralab.nn.module import Module, Parameter

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
    "LoRALinear",
]
