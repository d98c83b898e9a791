"""Layers and models on the autograd engine: ``Module``, ``Linear`` and friends (LoRA: `loralab.lora`)."""

from loralab.nn.layers import GELU, MLP, Dropout, Embedding, LayerNorm, Linear, ReLU, Sequential
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
]
