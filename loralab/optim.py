"""Optimizers with exactly PyTorch's update rules, keeping state only for the parameters given.

Under LoRA only A and B are handed to the optimizer, so Adam's two moment buffers exist for
r (d + k) numbers per adapted matrix instead of d k: that is most of LoRA's memory saving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from loralab.tensor import Tensor

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]


class Optimizer:
    """Base class: parameter groups, ``zero_grad`` and per-parameter ``state``.

    Parameters
    ----------
    params : iterable of Tensor, or of dicts ``{"params": [...], "lr": ...}``
        Each dict is a parameter group whose keys override ``defaults``.
    defaults : dict
        Hyper-parameters of the groups that do not set their own.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for g in groups:
            group = {**defaults, **g, "params": list(g["params"])}
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(
                        f"{type(self).__name__}: expected Tensors, got {type(p).__name__}"
                    )
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter appears in two groups")
                seen.add(id(p))
            if group["lr"] < 0:
                raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {group['lr']}")
            self.param_groups.append(group)
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self) -> None:
        """Forget the gradients of every parameter this optimizer updates."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _updatable(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    yield group, p, self.state.setdefault(id(p), {})

    def step(self) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and (L2) weight decay, as ``torch.optim.SGD``.

    g = grad + wd p;  buf = g (first step) or momentum buf + g;  p = p - lr buf.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def step(self) -> None:
        for group, p, state in self._updatable():
            g = p.grad
            if group["weight_decay"]:
                g = g + group["weight_decay"] * p.data
            if group["momentum"]:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = np.array(g, dtype=p.dtype)
                else:
                    buf *= group["momentum"]
                    buf += g
                g = buf
            p.data -= group["lr"] * g


class Adam(Optimizer):
    """Adam as ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    With t the step count, m and v the moment buffers:
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p = p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """

    decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def step(self) -> None:
        for group, p, state in self._updatable():
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            if not state:
                state["step"] = 0
                state["exp_avg"] = np.zeros_like(p.data)
                state["exp_avg_sq"] = np.zeros_like(p.data)
            g = p.grad
            if wd and self.decoupled:
                p.data *= 1.0 - lr * wd
            elif wd:
                g = g + wd * p.data
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m += (g - m) * (1.0 - b1)  # torch's lerp_(g, 1 - b1)
            v *= b2
            v += (1.0 - b2) * (g * g)
            step_size = lr / (1.0 - b1**t)
            denom = np.sqrt(v) / math.sqrt(1.0 - b2**t)
            denom += eps
            p.data -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``: p = p (1 - lr wd) before the Adam step."""

    decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr, betas, eps, weight_decay)
