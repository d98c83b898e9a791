"""Optimizers with exactly PyTorch's update rules, keeping state only for the parameters given.

Under LoRA only A and B are handed to the optimizer, so Adam's two moment buffers exist for
r (d + k) numbers per adapted matrix instead of d k: that is most of LoRA's memory saving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from loralab._validate import _is_number
from loralab.tensor import Tensor

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]

# PyTorch's words for each option, so that a refused option reads the same on both sides.
_OPTION_WORDS = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "weight_decay": "weight_decay value",
    "momentum": "momentum value",
}


def _real(value: Any, name: str, where: str) -> float:
    """``value`` as a float if it is a real number (`_validate`'s rule: not a bool); the range
    checks stay with the caller, in torch.optim's words."""
    if not _is_number(value):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    return float(value)


def _check_options(options: dict[str, Any], where: str, group: str) -> None:
    """Refuse what torch.optim refuses, in its words, and also infinite values.

    ``where`` names the optimizer, ``group`` the parameter group ("" for the defaults).
    """
    for key, words in _OPTION_WORDS.items():
        if key in options:
            value = _real(options[key], key, where)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(
                    f"{where}: Invalid {words}: {options[key]}{group} "
                    "(expected a finite number >= 0)"
                )
    if "betas" in options:
        betas = options["betas"]
        if isinstance(betas, str) or not isinstance(betas, (tuple, list)):
            raise TypeError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}{group}")
        if len(betas) != 2:
            raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}{group}")
        for i, beta in enumerate(betas):
            if not 0.0 <= _real(beta, f"beta parameter at index {i}", where) < 1.0:
                raise ValueError(
                    f"{where}: Invalid beta parameter at index {i}: {beta}{group} "
                    "(expected a number in [0, 1))"
                )


class Optimizer:
    """Base class: parameter groups, ``zero_grad`` and per-parameter ``state``.

    Parameters
    ----------
    params : iterable of Tensor, or of dicts ``{"params": [...], "lr": ...}``
        Each dict is a parameter group whose keys override ``defaults``.
    defaults : dict
        Hyper-parameters of the groups that do not set their own.

    Raises
    ------
    TypeError
        For params that are not a list of Tensors or of dicts, or an option that is not a number.
    ValueError
        For an empty list, a group without ``"params"``, a parameter in two groups, or an option
        that torch.optim refuses (negative or NaN lr, eps, weight_decay, momentum; betas outside
        [0, 1)), or an infinite one.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        name = type(self).__name__
        if isinstance(params, Tensor):
            raise TypeError(
                f"{name}: params argument given to the optimizer should be an iterable of "
                "Tensors or dicts, but got Tensor"
            )
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                f"{name}: optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. "
                "Please use a list instead."
            )
        params = list(params)
        if not params:
            raise ValueError(f"{name}: got an empty parameter list")
        _check_options(defaults, name, "")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for i, g in enumerate(groups):
            if not isinstance(g, dict):
                raise TypeError(f"{name}: param_group must be a dict, but got {type(g).__name__}")
            if "params" not in g:
                raise ValueError(f"{name}: parameter group {i} has no 'params' (keys: {sorted(g)})")
            group = {**defaults, **g}
            group["params"] = (
                [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
            )
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(
                        f"{name}: optimizer can only optimize Tensors, but one of the params is "
                        f"{type(p).__name__}"
                    )
            ids = {id(p) for p in group["params"]}
            if len(ids) < len(group["params"]):
                raise ValueError(f"{name}: a parameter appears twice in parameter group {i}")
            if ids & seen:
                raise ValueError(f"{name}: some parameters appear in more than one parameter group")
            seen |= ids
            _check_options(group, name, f" in parameter group {i}")
            self.param_groups.append(group)
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self) -> None:
        """Forget the gradients of every parameter this optimizer updates."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _updatable(
        self,
    ) -> Iterator[tuple[dict[str, Any], Tensor, np.ndarray, dict[str, Any]]]:
        """(group, parameter, its gradient, its state) for every parameter with a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    yield group, p, p.grad, self.state.setdefault(id(p), {})

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
        for group, p, g, state in self._updatable():
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
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def step(self) -> None:
        for group, p, g, state in self._updatable():
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            if not state:
                state["step"] = 0
                state["exp_avg"] = np.zeros_like(p.data)
                state["exp_avg_sq"] = np.zeros_like(p.data)
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
