"""A small training loop for classifiers, shared by the tutorials and the demo.

Every trainable parameter (``requires_grad=True``) of the model is handed to the optimizer, so
the same loop does full fine-tuning, LoRA (after `loralab.lora.inject_lora` froze the
base) and head-only training: what trains is decided by what is frozen, not by the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab.datasets import Dataset
from loralab.nn import Module
from loralab.tensor import no_grad

__all__ = ["History", "evaluate", "train_classifier", "OPTIMIZERS"]

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}


@dataclass
class History:
    """What `train_classifier` recorded.

    Attributes
    ----------
    loss : list of float
        Training loss of every step (one mini-batch each).
    eval_step : list of int
        Steps (1-based; 0 is before training) at which ``eval_data`` was evaluated.
    eval_loss, eval_accuracy : list of float
        Loss and accuracy on ``eval_data`` at those steps.
    seconds : float
        Wall time of the training steps (evaluation excluded).
    """

    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def step_time(self) -> float:
        """Mean seconds per training step."""
        return self.seconds / max(len(self.loss), 1)


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
) -> History:
    """Train every parameter of ``model`` that requires a gradient, with cross-entropy loss.

    Mini-batches are drawn without replacement from a shuffled order (reshuffled each epoch) by a
    generator seeded with ``seed``, so a run is reproducible.

    Parameters
    ----------
    model : Module
        Maps x of shape (batch, features) to logits of shape (batch, classes); trained in place.
    data : Dataset
        x of shape (n, features), integer labels y of shape (n,).
    steps : int
        Number of optimizer steps (> 0).
    lr : float
        Learning rate.
    batch_size : int, default 64
    seed : int, default 0
        Seed of the batch order.
    optimizer : {"adam", "adamw", "sgd"}
    weight_decay : float, default 0
    eval_data : Dataset, optional
        Evaluated (loss and accuracy) before training, every ``eval_every`` steps and at the end.
    eval_every : int, default 50
    progress : bool, default True
        Show a tqdm progress bar.
    desc : str
        The progress bar's label.

    Returns
    -------
    History
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"train_classifier: steps must be a positive int, got {steps!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size <= 0
    ):
        raise ValueError(f"train_classifier: batch_size must be a positive int, got {batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"train_classifier: optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}"
        )
    if len(data.x) != len(data.y):
        raise ValueError(
            f"train_classifier: data.x has {len(data.x)} rows but data.y has {len(data.y)}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_classifier: the model has no parameter with requires_grad=True")
    opt = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    history = History()

    def record(step: int) -> None:
        if eval_data is not None:
            loss, acc = evaluate(model, eval_data)
            history.eval_step.append(step)
            history.eval_loss.append(loss)
            history.eval_accuracy.append(acc)

    record(0)
    model.train()
    order, pos = rng.permutation(len(data)), 0
    bar = range(1, steps + 1)
    if progress:
        from tqdm.std import tqdm

        bar = tqdm(bar, desc=desc, mininterval=0.5, leave=False)
    for step in bar:
        start = time.perf_counter()
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(data)), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.seconds += time.perf_counter() - start
        history.loss.append(float(loss.item()))
        if step % eval_every == 0 and step != steps:
            record(step)
    record(steps)
    return history
