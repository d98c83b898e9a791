"""The equivalence harness: train a loralab model and its torch twin side by side and measure.

`check_equivalence` runs both models on the same batches with the twin optimizers
(``loralab.optim.Adam`` and ``torch.optim.Adam``, ...) and records, at every step, the largest
relative difference of the loss, the outputs, the input gradient, the parameter gradients and,
after the update, the parameters.

Dropout draws random masks, so the two models would differ by design. Inside
`shared_dropout_masks` the torch twin draws every mask from a copy of the NumPy module's
generator, with the NumPy function that makes masks, so both see the same masks in the same
order (a generator shared by several NumPy layers stays shared among their twins).

Some parameters have an exact gradient of zero, such as the key bias b_k of attention: softmax
is invariant to adding the same number to every score of a row, and b_k adds q_i . b_k to every
score of row i. Both sides then compute round-off, different on each side, and Adam does not
scale it down: its step lr m / (sqrt(v) + eps) is the round-off times lr / eps where the round-off
is below eps (float64: a factor 1e6 at lr = 1e-2), and about lr sign(g) where it is above
(float32). A parameter with a real gradient keeps its relative round-off instead. Comparing the
zero-gradient trajectories would measure noise; ``check_equivalence(..., zero_grad=names)``
checks instead that their gradients are zero to round-off and leaves their values out (the
outputs, which do not depend on them, are compared).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loralab import functional as LF
from loralab import lora, nn, optim
from loralab._validate import boolean, one_of, positive_int, positive_number
from loralab.tensor import Tensor
from loralab.torch.layers import LoRALinear, numpy_dtype

__all__ = [
    "check_equivalence",
    "EquivalenceReport",
    "shared_dropout_masks",
    "relative_difference",
]

_OPTIMIZERS = {
    "adam": (optim.Adam, torch.optim.Adam),
    "adamw": (optim.AdamW, torch.optim.AdamW),
    "sgd": (optim.SGD, torch.optim.SGD),
}
_LOSSES = ("cross_entropy", "mse")


def relative_difference(a: Any, b: Any) -> float:
    """max|a - b| / max(max|a|, max|b|): the error relative to the larger array's size (0 if both are 0).

    Measured against the largest entry rather than entry by entry, so a value that is zero in
    both (such as dA while B = 0) is not an infinite relative error. A NaN or inf in either
    array gives inf: such values cannot be compared, and a check must fail on them.
    """
    a = np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=float)
    b = np.asarray(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"relative_difference: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    scale = max(np.abs(a).max(), np.abs(b).max())
    return float(np.abs(a - b).max() / scale) if scale > 0 else 0.0


@dataclass
class EquivalenceReport:
    """Per-step largest relative differences between a loralab model and its torch twin.

    Attributes
    ----------
    loss, output, input_grad, grad, param : list of float, one entry per step
        ``grad`` and ``param`` are the worst over all parameters (``param`` after the update,
        frozen ones included); ``input_grad`` is empty for integer inputs.
    zero_grad : list of float, one entry per step
        For the parameters named in ``check_equivalence(..., zero_grad=...)``: their largest
        |gradient|, on either side, divided by the largest |gradient| of the other parameters
        (empty when none is named). Exact math gives 0; round-off gives at most a few float eps.
    initial_param : float
        Largest parameter difference before training.
    worst_grad, worst_param : str
        Name of the parameter behind ``max_grad`` and ``max_param``.
    dtype : str
    """

    dtype: str
    initial_param: float = 0.0
    loss: list[float] = field(default_factory=list)
    output: list[float] = field(default_factory=list)
    input_grad: list[float] = field(default_factory=list)
    grad: list[float] = field(default_factory=list)
    param: list[float] = field(default_factory=list)
    zero_grad: list[float] = field(default_factory=list)
    worst_grad: str = ""
    worst_param: str = ""

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def max_loss(self) -> float:
        return max(self.loss, default=0.0)

    @property
    def max_output(self) -> float:
        return max(self.output, default=0.0)

    @property
    def max_input_grad(self) -> float:
        return max(self.input_grad, default=0.0)

    @property
    def max_grad(self) -> float:
        return max(self.grad, default=0.0)

    @property
    def max_param(self) -> float:
        return max([self.initial_param, *self.param])

    @property
    def max_zero_grad(self) -> float:
        return max(self.zero_grad, default=0.0)

    @property
    def max_difference(self) -> float:
        """The largest of all the maxima."""
        return max(
            self.max_loss,
            self.max_output,
            self.max_input_grad,
            self.max_grad,
            self.max_param,
            self.max_zero_grad,
        )

    def assert_close(self, rtol: float) -> None:
        """Raise AssertionError naming every quantity whose largest difference exceeds ``rtol``."""
        bad = [
            f"{name}={value:.3g}"
            for name, value in (
                ("max_loss", self.max_loss),
                ("max_output", self.max_output),
                ("max_input_grad", self.max_input_grad),
                ("max_grad", self.max_grad),
                ("max_param", self.max_param),
                ("max_zero_grad", self.max_zero_grad),
            )
            if not value <= rtol
        ]
        if bad:
            raise AssertionError(
                f"twins differ by more than rtol={rtol:g}: {', '.join(bad)}\n{self}"
            )

    def __str__(self) -> str:
        head = (
            f"{'step':>5} {'loss':>10} {'output':>10} {'input grad':>10} {'grad':>10} {'param':>10}"
        )
        lines = [
            f"Equivalence over {self.steps} steps ({self.dtype}), max relative differences",
            head,
        ]
        for i in range(self.steps):
            ig = f"{self.input_grad[i]:10.2e}" if self.input_grad else f"{'-':>10}"
            lines.append(
                f"{i + 1:>5} {self.loss[i]:10.2e} {self.output[i]:10.2e} {ig} "
                f"{self.grad[i]:10.2e} {self.param[i]:10.2e}"
            )
        ig = f"{self.max_input_grad:10.2e}" if self.input_grad else f"{'-':>10}"
        lines.append(
            f"{'max':>5} {self.max_loss:10.2e} {self.max_output:10.2e} {ig} "
            f"{self.max_grad:10.2e} {self.max_param:10.2e}"
        )
        lines.append(f"worst gradient: {self.worst_grad}; worst parameter: {self.worst_param}")
        if self.zero_grad:
            lines.append(
                "zero-gradient parameters (values not compared): largest |grad| / largest other "
                f"|grad| = {self.max_zero_grad:.2e}"
            )
        return "\n".join(lines)


def _replay_hook(rng: np.random.Generator) -> Any:
    def hook(module: torch.nn.Dropout, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or module.p == 0.0:  # as loralab.functional.dropout
            return None
        x = args[0]
        mask = LF.dropout_mask(tuple(x.shape), module.p, rng, numpy_dtype(x.dtype))
        return x * torch.from_numpy(mask).to(x.device)

    return hook


@contextmanager
def shared_dropout_masks(np_model: nn.Module, torch_model: torch.nn.Module) -> Iterator[None]:
    """Make ``torch_model`` draw the same dropout masks as ``np_model``, in the same order.

    Each ``torch.nn.Dropout`` and `loralab.torch.LoRALinear` twin draws from a copy of its
    NumPy module's generator (copied once: layers sharing a generator keep sharing it), with
    `loralab.functional.dropout_mask`. Run both models forward in the same order inside
    the ``with`` block. On exit the torch model draws from torch's generator again.

    Raises
    ------
    ValueError
        When a NumPy dropout layer has no twin of the right type under the same name.
    """
    twins = dict(torch_model.named_modules())
    memo: dict[int, Any] = {}
    hooks, saved = [], []
    try:
        for name, m in np_model.named_modules():
            if isinstance(m, nn.Dropout):
                t = twins.get(name)
                if not isinstance(t, torch.nn.Dropout):
                    raise ValueError(
                        f"shared_dropout_masks: {name!r} is a Dropout in the NumPy model but "
                        f"{type(t).__name__} in the torch model"
                    )
                hooks.append(t.register_forward_hook(_replay_hook(copy.deepcopy(m.rng, memo))))
            elif isinstance(m, lora.LoRALinear) and m.dropout > 0.0:
                t = twins.get(name)
                if not isinstance(t, LoRALinear):
                    raise ValueError(
                        f"shared_dropout_masks: {name!r} is a LoRALinear in the NumPy model but "
                        f"{type(t).__name__} in the torch model"
                    )
                saved.append((t, t.mask_rng))
                t.mask_rng = copy.deepcopy(m.rng, memo)
        yield
    finally:
        for h in hooks:
            h.remove()
        for t, rng in saved:
            t.mask_rng = rng


def _check_pairs(np_params: dict, t_params: dict) -> None:
    if list(np_params) != list(t_params):
        raise ValueError(
            "check_equivalence: the models' parameters differ: only in the NumPy model "
            f"{sorted(set(np_params) - set(t_params))}, only in the torch model "
            f"{sorted(set(t_params) - set(np_params))} (or their order differs)"
        )
    flags = [n for n in np_params if np_params[n].requires_grad != t_params[n].requires_grad]
    if flags:
        raise ValueError(f"check_equivalence: requires_grad differs for {flags}")
    shapes = [n for n in np_params if np_params[n].shape != tuple(t_params[n].shape)]
    if shapes:
        raise ValueError(f"check_equivalence: shapes differ for {shapes}")


def _check_finite(np_params: dict, t_params: dict, batches: list) -> None:
    """A NaN or inf in a parameter or a batch makes every comparison meaningless: refuse it."""
    arrays = [(f"parameter {n!r} of the NumPy model", p.data) for n, p in np_params.items()]
    arrays += [(f"parameter {n!r} of the torch model", p) for n, p in t_params.items()]
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"check_equivalence: batches[{i}] must be a pair (x, y), got {batch!r}")
        arrays += [(f"batches[{i}] x", batch[0]), (f"batches[{i}] y", batch[1])]
    for what, value in arrays:
        array = (
            value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        )
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise ValueError(
                f"check_equivalence: {what} holds {int((~np.isfinite(array)).sum())} NaN or inf "
                "values; nothing could be compared"
            )


def _grad_array(p: torch.Tensor) -> np.ndarray:
    """``p.grad`` as an ndarray, zeros where torch left it None (no gradient reached ``p``)."""
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    return grad.detach().cpu().numpy()


def _zero_grad_ratio(grads: dict[str, Any], zero: set[str], others: list[str]) -> float:
    """Largest |gradient| over ``zero``, relative to the largest over ``others`` (0 if both 0)."""
    top = max(float(np.abs(grads[n]).max(initial=0.0)) for n in zero)
    scale = max(float(np.abs(grads[n]).max(initial=0.0)) for n in others)
    return top / scale if scale > 0 else (0.0 if top == 0 else float("inf"))


def check_equivalence(
    np_model: nn.Module,
    torch_model: torch.nn.Module,
    batches: Sequence[tuple[Any, Any]],
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    loss: str = "cross_entropy",
    optimizer_options: dict[str, Any] | None = None,
    training: bool = True,
    zero_grad: Collection[str] = (),
) -> EquivalenceReport:
    """Train ``np_model`` and ``torch_model`` side by side and report how far apart they get.

    Both start from whatever values they hold (use `loralab.torch.to_torch` to make the
    twin), see the same batches in the same order, the same dropout masks and the twin optimizers.
    Both models are trained in place.

    Parameters
    ----------
    np_model : loralab.nn.Module
    torch_model : torch.nn.Module
        Same parameter names, shapes and requires_grad flags.
    batches : sequence of (x, y)
        NumPy arrays; x of the model's input shape (floats, or integer token ids), y of shape
        (...) integer classes for ``"cross_entropy"`` or the output's shape for ``"mse"``.
        Cycled when ``steps`` exceeds their number.
    steps : int
        Optimizer steps to take (>= 1).
    lr : float
        The learning rate of both optimizers (> 0).
    optimizer : "adam", "adamw" or "sgd"
        ``loralab.optim.X`` against ``torch.optim.X``, on the parameters with requires_grad.
    loss : "cross_entropy" or "mse"
    optimizer_options : dict, optional
        Extra keyword arguments for both optimizers (``weight_decay``, ``momentum``, ``betas``...).
    training : bool, default True
        Mode of both models (dropout active when True, with shared masks).
    zero_grad : collection of str, default ()
        Names of trainable parameters whose exact gradient is zero, such as every attention's
        key bias (``"blocks.0.attn.k.bias"``, ...). Their gradients and values are not compared
        (both are round-off, which Adam amplifies by lr / eps, or to steps of about lr where it
        exceeds eps); ``report.zero_grad`` records how close to zero their gradients are,
        relative to the other gradients.

    Returns
    -------
    EquivalenceReport

    Examples
    --------
    >>> from loralab.nn import MLP
    >>> from loralab.torch import to_torch
    >>> rng = np.random.default_rng(0)
    >>> model = MLP([4, 8, 3], seed=0, dtype=np.float64)
    >>> batches = [(rng.normal(size=(5, 4)), rng.integers(0, 3, 5))]
    >>> report = check_equivalence(model, to_torch(model), batches, steps=3, lr=0.01)
    >>> report.max_param < 1e-12
    True
    """
    where = "check_equivalence"
    one_of("optimizer", optimizer, _OPTIMIZERS, where)
    one_of("loss", loss, _LOSSES, where)
    steps = positive_int("steps", steps, where)
    positive_number("lr", lr, where)
    training = boolean("training", training, where)
    batches = list(batches)
    if not batches:
        raise ValueError("check_equivalence: batches is empty")
    np_params = dict(np_model.named_parameters())
    t_params = dict(torch_model.named_parameters())
    _check_pairs(np_params, t_params)
    _check_finite(np_params, t_params, batches)
    trainable = [n for n, p in np_params.items() if p.requires_grad]
    if not trainable:
        raise ValueError("check_equivalence: no parameter requires a gradient")
    if isinstance(zero_grad, str):
        raise TypeError(
            f"check_equivalence: zero_grad must be a collection of names, got {zero_grad!r}"
        )
    zero_grad = set(zero_grad)
    unknown = sorted(zero_grad - set(trainable))
    if unknown:
        raise ValueError(
            f"check_equivalence: zero_grad names {unknown}, which are not trainable parameters "
            f"of the model (trainable: {trainable})"
        )
    compared = [n for n in trainable if n not in zero_grad]
    if not compared:
        raise ValueError(
            f"check_equivalence: every trainable parameter is in zero_grad ({sorted(zero_grad)}); "
            "leave at least one to compare"
        )
    options = dict(optimizer_options or {})
    np_cls, t_cls = _OPTIMIZERS[optimizer]
    np_opt = np_cls([np_params[n] for n in trainable], lr=lr, **options)
    t_opt = t_cls([t_params[n] for n in trainable], lr=lr, **options)
    device = next(iter(t_params.values())).device
    np_model.train(training)
    torch_model.train(training)

    report = EquivalenceReport(dtype=str(next(iter(np_params.values())).dtype))
    report.initial_param = max(
        relative_difference(np_params[n].data, t_params[n]) for n in np_params
    )
    worst_grad = worst_param = (-1.0, "")
    with shared_dropout_masks(np_model, torch_model):
        for step in range(steps):
            x, y = batches[step % len(batches)]
            x, y = np.asarray(x), np.asarray(y)
            floating = np.issubdtype(x.dtype, np.floating)
            xn = Tensor(x, requires_grad=floating)
            xt = torch.tensor(x, device=device, requires_grad=floating)
            out_n, out_t = np_model(xn), torch_model(xt)
            if loss == "cross_entropy":
                loss_n = LF.cross_entropy(out_n, y)
                yt = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
                loss_t = torch.nn.functional.cross_entropy(out_t.reshape(-1, out_t.shape[-1]), yt)
            else:
                loss_n = LF.mse_loss(out_n, y)
                loss_t = torch.nn.functional.mse_loss(out_t, torch.tensor(y, device=device))
            np_opt.zero_grad()
            t_opt.zero_grad(set_to_none=True)
            loss_n.backward()
            loss_t.backward()
            report.loss.append(relative_difference(loss_n.data, loss_t))
            report.output.append(relative_difference(out_n.data, out_t))
            if floating:
                report.input_grad.append(relative_difference(xn.grad, xt.grad))
            g_np = {
                n: np_params[n].grad if np_params[n].grad is not None else 0.0 * np_params[n].data
                for n in trainable
            }
            g_t = {n: _grad_array(t_params[n]) for n in trainable}
            grads = {n: relative_difference(g_np[n], g_t[n]) for n in compared}
            report.grad.append(max(grads.values()))
            if zero_grad:
                report.zero_grad.append(
                    max(_zero_grad_ratio(g, zero_grad, compared) for g in (g_np, g_t))
                )
            worst_grad = max(worst_grad, max((v, n) for n, v in grads.items()))
            np_opt.step()
            t_opt.step()
            params = {
                n: relative_difference(np_params[n].data, t_params[n])
                for n in np_params
                if n not in zero_grad
            }
            report.param.append(max(params.values()))
            worst_param = max(worst_param, max((v, n) for n, v in params.items()))
    report.worst_grad, report.worst_param = worst_grad[1], worst_param[1]
    return report
