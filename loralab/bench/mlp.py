"""The benchmarked model, one MLP of ``N_LAYERS`` Linear(width, width) layers, three ways.

- `engine_model` / `engine_step`: loralab's `MLP` with `inject_lora`, trained through the engine;
- `HandStep`: the same LoRA step written by hand in NumPy, without a graph: the baseline that
  shows what the engine's bookkeeping costs (this hand-written step is the point of section 1);
- `torch_model` / `torch_step`: the same model converted to PyTorch by `loralab.torch.to_torch`,
  its LoRA layers run through plain autograd as PEFT does: ``base(x) + s * B(A(x))``.

All three start from the same `MLPArrays` and take the same Adam step (loralab.optim's Adam
for the first two, ``torch.optim.Adam`` for the third).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab.bench.config import ALPHA, LR, N_LAYERS, RANK
from loralab.bench.machine import optional_torch
from loralab.lora import inject_lora, merge_lora
from loralab.lora.ops import lora_backward, lora_forward
from loralab.nn import MLP, Parameter
from loralab.tensor import Tensor
from loralab.training import train_step

__all__ = [
    "MLPArrays",
    "LINEAR_NAMES",
    "engine_model",
    "engine_step",
    "HandStep",
    "torch_model",
    "torch_step",
]

LINEAR_NAMES = [str(2 * i) for i in range(N_LAYERS)]  # MLP's Linear layers: "0", "2", "4", "6"


@dataclass
class MLPArrays:
    """Weights of an MLP of ``N_LAYERS`` Linear(width, width) layers with LoRA factors.

    W[i] (width, width), b[i] (width,), A[i] (r, width), B[i] (width, r); B is small but nonzero
    so that no side meets a special case.
    """

    W: list[np.ndarray]
    b: list[np.ndarray]
    A: list[np.ndarray]
    B: list[np.ndarray]

    @classmethod
    def random(cls, width: int, rng: np.random.Generator, r: int = RANK) -> MLPArrays:
        """N_LAYERS layers of float32 arrays drawn from U(-1/sqrt(width), 1/sqrt(width)).

        W0 (width, width), b (width,), A (r, width), and B (width, r) scaled by 0.01 (nonzero).
        """
        bound = 1.0 / math.sqrt(width)

        def u(*shape: int) -> np.ndarray:
            return rng.uniform(-bound, bound, shape).astype(np.float32)

        return cls(
            [u(width, width) for _ in range(N_LAYERS)],
            [u(width) for _ in range(N_LAYERS)],
            [u(r, width) for _ in range(N_LAYERS)],
            [0.01 * u(width, r) for _ in range(N_LAYERS)],
        )


def engine_model(arrays: MLPArrays, *, lora: bool, merged: bool = False) -> MLP:
    """loralab's MLP with these weights; LoRA (r=8, alpha=16) on every Linear if ``lora``."""
    width = arrays.W[0].shape[0]
    model = MLP([width] * (N_LAYERS + 1), seed=0)
    state = {}
    for name, W, b in zip(LINEAR_NAMES, arrays.W, arrays.b, strict=True):
        state[f"{name}.weight"], state[f"{name}.bias"] = W, b
    model.load_state_dict(state)
    if lora:
        inject_lora(model, LINEAR_NAMES, r=arrays.A[0].shape[0], alpha=ALPHA, seed=0)
        for i, name in enumerate(LINEAR_NAMES):
            layer = model.get_submodule(name)
            layer.lora_A.data[...] = arrays.A[i]
            layer.lora_B.data[...] = arrays.B[i]
        if merged:
            merge_lora(model)
    return model


def engine_step(model: MLP, x: np.ndarray, target: np.ndarray) -> Callable[[], float]:
    """One training step (MSE loss, backward, Adam) through the engine, as a closure."""
    opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    xt = Tensor(x)
    return lambda: train_step(opt, lambda: F.mse_loss(model(xt), target))


class HandStep:
    """The same LoRA step by hand: the fused op's NumPy pair, ReLU and MSE, no graph; then Adam.

    The hand-written baseline of section 1: forward and backward are written out with
    `lora_forward` / `lora_backward`, so the difference to `engine_step` is the engine's
    bookkeeping (graph, Tensors, Functions). The update is loralab's `optim.Adam`, the same
    optimizer the engine side uses.

    ``HandStep(arrays, x, target)()`` takes one step; ``params`` holds A_0..A_3 then B_0..B_3.
    """

    def __init__(self, arrays: MLPArrays, x: np.ndarray, target: np.ndarray):
        self.W = [w.copy() for w in arrays.W]
        self.b = [v.copy() for v in arrays.b]
        self.params = [Parameter(a.copy()) for a in arrays.A + arrays.B]
        self.optimizer = optim.Adam(self.params, lr=LR)
        self.s = ALPHA / arrays.A[0].shape[0]
        self.x, self.target = x, target

    def __call__(self) -> None:
        n, W, b = N_LAYERS, self.W, self.b
        P = [p.data for p in self.params]
        caches, masks = [], []
        h = self.x
        for i in range(n):
            y, cache = lora_forward(h, W[i], b[i], P[i], P[n + i], self.s)
            caches.append(cache)
            if i < n - 1:
                mask = y > 0
                masks.append(mask)
                h = y * mask
            else:
                h = y
        dy = (h - self.target) * np.float32(2.0 / h.size)
        for i in reversed(range(n)):
            dx, self.params[i].grad, self.params[n + i].grad, _ = lora_backward(
                dy, caches[i], need_dx=i > 0
            )
            if i > 0:
                dy = dx * masks[i - 1]
        self.optimizer.step()


def torch_model(arrays: MLPArrays, *, lora: bool, merged: bool = False) -> Any:
    """The same MLP in PyTorch (`loralab.torch.to_torch` of `engine_model`).

    Its LoRA layers use plain autograd (``use_custom_backward = False``), PEFT's
    ``base(x) + s * B(A(x))``, so this side is what PyTorch eager does unaided.
    """
    from loralab.torch import LoRALinear, to_torch

    model = to_torch(engine_model(arrays, lora=lora, merged=merged))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.use_custom_backward = False
    return model


def torch_step(model: Any, x: np.ndarray, target: np.ndarray) -> Callable[[], None]:
    """One eager PyTorch training step with ``torch.optim.Adam`` on the trainable parameters."""
    torch = optional_torch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xt), tt).backward()
        opt.step()

    return step
