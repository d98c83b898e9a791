"""Training: one loop for everything loralab trains, and the classifier set-up on top of it.

`fit` is the loop: it takes a loss function, an iterable of batches and an optimizer, and runs
`train_step` (zero the gradients, compute the loss, backpropagate, update) once per batch,
recording each step's loss and wall time, calling an evaluation callback every ``eval_every``
steps, and showing a tqdm progress bar when asked. What trains is decided by what is frozen: the
optimizer holds only the parameters with ``requires_grad=True``, so the same loop does full
fine-tuning, LoRA (after `loralab.lora.inject_lora` froze the base) and head-only training.

Its callers: `train_classifier` (the digits MLP of the tutorials and the demo, and the MLP's
pre-training in `loralab.models.digits`), `loralab.models.pretrain` (the GPT's pre-training, with
a cosine learning-rate schedule) and `loralab.models.adapt` (LoRA on the GPT). The benchmarks time
single `train_step` calls.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab._validate import (
    non_negative_int,
    non_negative_number,
    one_of,
    positive_int,
    positive_number,
)
from loralab.datasets import Dataset
from loralab.nn import Module
from loralab.tensor import Tensor, no_grad

__all__ = [
    "History",
    "batch_indices",
    "evaluate",
    "fit",
    "train_step",
    "train_classifier",
    "OPTIMIZERS",
]

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}

Batch = TypeVar("Batch")


@dataclass
class History:
    """What `fit` recorded.

    Attributes
    ----------
    loss : list of float
        Training loss of every step (one batch each).
    eval_step : list of int
        Steps (1-based; 0 is before training) at which the evaluation callback ran.
    eval_loss, eval_accuracy : list of float
        Loss and accuracy it returned at those steps.
    step_seconds : list of float
        Wall time of every training step (evaluation excluded); its median is robust to the
        occasional step that a busy machine slows down.
    """

    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Wall time of all the training steps (evaluation excluded)."""
        return sum(self.step_seconds)

    @property
    def step_time(self) -> float:
        """Mean seconds per training step."""
        return self.seconds / max(len(self.loss), 1)


def batch_indices(n: int, *, batch_size: int, steps: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``steps`` mini-batches of ``min(batch_size, n)`` rows of an ``n``-row dataset.

    Rows are drawn without replacement from a shuffled order; when fewer than ``batch_size`` rows
    are left, the rest of the epoch is dropped and the rows are reshuffled. The order comes from
    ``numpy.random.default_rng(seed)`` alone, so the same seed gives the same batches.

    Yields
    ------
    idx : ndarray of int, shape (min(batch_size, n),)

    Examples
    --------
    Five rows in batches of two: the third batch starts a new epoch (one row left over).

    >>> [b.tolist() for b in batch_indices(5, batch_size=2, steps=3, seed=0)]
    [[2, 4], [3, 0], [4, 1]]
    """
    # Checked here, at the call: the generator below would only check at the first next().
    n = positive_int("n", n, "batch_indices")
    batch_size = positive_int("batch_size", batch_size, "batch_indices")
    steps = non_negative_int("steps", steps, "batch_indices")
    return _batch_indices(n, batch_size, steps, seed)


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def evaluate(model: Module, data: Dataset) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data``, without a graph.

    Parameters
    ----------
    model : Module mapping x of shape (n, features) to logits of shape (n, classes)
    data : Dataset

    Returns
    -------
    (loss, accuracy) : tuple of float
    """
    was_training = model.training
    model.eval()
    with no_grad():
        logits = model(data.x)
        loss = float(F.cross_entropy(logits, data.y).item())
    model.train(was_training)
    accuracy = float((logits.data.argmax(axis=-1) == data.y).mean())
    return loss, accuracy


def train_step(optimizer: optim.Optimizer, compute_loss: Callable[[], Tensor]) -> float:
    """One optimizer step: zero the gradients, compute the loss, backpropagate, update.

    The graph (and the activations it holds) is released before the update, so a step's peak
    memory is the larger of the backward's and the optimizer's, not their sum.

    Parameters
    ----------
    optimizer : Optimizer
        Holds the parameters to update (those with ``requires_grad=True``).
    compute_loss : callable
        ``compute_loss()`` runs the forward pass and returns the scalar loss Tensor.

    Returns
    -------
    float
        The loss before the update.
    """
    optimizer.zero_grad()
    loss = compute_loss()
    if not loss.requires_grad:
        raise RuntimeError(
            "train_step: the loss does not depend on any parameter that requires a gradient, so "
            "there is nothing to train (did it run under no_grad()? are the model's LoRA layers "
            "merged? A merged layer computes with the frozen W0 + ΔW: call unmerge_lora first)"
        )
    loss.backward()
    value = float(loss.item())
    del loss
    optimizer.step()
    return value


def fit(
    loss_fn: Callable[[Batch], Tensor],
    batches: Iterable[Batch],
    optimizer: optim.Optimizer,
    *,
    steps: int,
    lr_schedule: Callable[[int], float] | None = None,
    eval_fn: Callable[[], tuple[float, float]] | None = None,
    eval_every: int = 50,
    progress: bool = False,
    desc: str = "train",
    leave: bool = False,
) -> History:
    """The training loop: one `train_step` per batch, ``steps`` of them.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(batch)`` returns the scalar loss Tensor of one batch.
    batches : iterable
        Yields at least ``steps`` batches; drawing a batch is not counted in the step time.
    optimizer : Optimizer
    steps : int
        Number of optimizer steps (> 0).
    lr_schedule : callable, optional
        ``lr_schedule(i)`` for step i = 0, 1, ...: the factor applied to every parameter group's
        initial learning rate before that step (e.g. a cosine decay). None keeps it constant.
    eval_fn : callable, optional
        ``eval_fn()`` returns (loss, accuracy); called before training, every ``eval_every``
        steps and after the last step, and recorded in the History.
    eval_every : int, default 50
        Also how often the progress bar's postfix is updated: the mean training loss of the last
        ``eval_every`` steps and, with ``eval_fn``, the latest accuracy.
    progress : bool, default False
        Show a tqdm progress bar (on stderr).
    desc : str
        The progress bar's label.
    leave : bool, default False
        Keep the finished bar on screen (with its final postfix) instead of clearing it.

    Returns
    -------
    History
    """
    steps = positive_int("steps", steps, "fit")
    eval_every = positive_int("eval_every", eval_every, "fit")
    history = History()
    initial_lr = [group["lr"] for group in optimizer.param_groups]

    def record(step: int) -> None:
        if eval_fn is not None:
            loss, accuracy = eval_fn()
            history.eval_step.append(step)
            history.eval_loss.append(loss)
            history.eval_accuracy.append(accuracy)

    record(0)
    bar = None
    if progress:
        from tqdm.std import tqdm

        bar = tqdm(total=steps, desc=desc, mininterval=0.5, leave=leave)
    try:
        for step, batch in zip(range(1, steps + 1), batches):
            if lr_schedule is not None:
                factor = lr_schedule(step - 1)
                for group, lr in zip(optimizer.param_groups, initial_lr, strict=True):
                    group["lr"] = lr * factor
            start = time.perf_counter()
            loss = train_step(optimizer, functools.partial(loss_fn, batch))
            history.step_seconds.append(time.perf_counter() - start)
            history.loss.append(loss)
            if step % eval_every == 0 or step == steps:
                record(step)
                if bar is not None:
                    bar.set_postfix_str(_postfix(history, eval_every), refresh=False)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    if len(history.loss) < steps:
        raise ValueError(f"fit: batches ran out after {len(history.loss)} of {steps} steps")
    return history


def train_classifier(
    model: Module,
    data: Dataset,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    eval_data: Dataset | None = None,
    eval_every: int = 50,
    progress: bool = True,
    desc: str = "train",
    leave: bool = False,
) -> History:
    """Train every parameter of ``model`` that requires a gradient, with cross-entropy loss.

    Mini-batches come from `batch_indices` (a shuffled order, reshuffled each epoch, seeded with
    ``seed``), so a run is reproducible; the loop is `fit`.

    Parameters
    ----------
    model : Module
        Maps x of shape (batch, features) to logits of shape (batch, classes); trained in place.
    data : Dataset
        x of shape (n, features), integer labels y of shape (n,).
    steps : int
        Number of optimizer steps (> 0).
    lr : float
        Learning rate (> 0).
    batch_size : int, default 64
    seed : int, default 0
        Seed of the batch order.
    optimizer : {"adam", "adamw", "sgd"}
    weight_decay : float, default 0
        Passed to the optimizer; >= 0.
    eval_data : Dataset, optional
        Evaluated (loss and accuracy) before training, every ``eval_every`` steps and at the end.
    eval_every : int, default 50
        As in `fit` (``eval_data`` plays the part of ``eval_fn``).
    progress : bool, default True
        Show a tqdm progress bar (on stderr); ``desc`` and ``leave`` as in `fit`.

    Returns
    -------
    History

    Raises
    ------
    TypeError
        For an option of the wrong type (``steps=2.5``, ``lr="1e-2"``).
    ValueError
        For an option of the wrong value (``steps=0``, ``optimizer="lbfgs"``), data whose x and y
        differ in rows, a model with nothing to train, or merged LoRA layers.
    """
    where = "train_classifier"
    steps = positive_int("steps", steps, where)
    batch_size = positive_int("batch_size", batch_size, where)
    eval_every = positive_int("eval_every", eval_every, where)
    lr = positive_number("lr", lr, where)
    weight_decay = non_negative_number("weight_decay", weight_decay, where)
    one_of("optimizer", optimizer, OPTIMIZERS, where)
    if len(data.x) != len(data.y):
        raise ValueError(
            f"train_classifier: data.x has {len(data.x)} rows but data.y has {len(data.y)}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_classifier: the model has no parameter with requires_grad=True")
    # Any layer that can be merged says so with a ``merged`` flag (the loop knows no LoRA class).
    merged = [name for name, m in model.named_modules() if getattr(m, "merged", False) is True]
    if merged:
        raise ValueError(
            f"train_classifier: the model's LoRA layers {merged} are merged: they compute with "
            "the frozen W0 + ΔW, so A and B would get no gradient; call unmerge_lora(model) first"
        )
    model.train()
    return fit(
        lambda idx: F.cross_entropy(model(data.x[idx]), data.y[idx]),
        batch_indices(len(data), batch_size=batch_size, steps=steps, seed=seed),
        OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay),
        steps=steps,
        eval_fn=None if eval_data is None else lambda: evaluate(model, eval_data),
        eval_every=eval_every,
        progress=progress,
        desc=desc,
        leave=leave,
    )


def _postfix(history: History, window: int) -> str:
    text = f"loss {np.mean(history.loss[-window:]):.3g}"
    if history.eval_accuracy:
        text += f", eval accuracy {history.eval_accuracy[-1]:.1%}"
    return text
