"""A small training loop for classifiers, shared by the tutorials and the demo.

Every trainable parameter (``requires_grad=True``) of the model is handed to the optimizer, so
the same loop does full fine-tuning, LoRA (after `loralab.lora.inject_lora` froze the
base) and head-only training: what trains is decided by what is frozen, not by the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab.datasets import Dataset
from loralab.nn import Module
from loralab.tensor import no_grad

__all__ = ["History", "batch_indices", "evaluate", "train_classifier", "OPTIMIZERS"]

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
    ``seed``), so a run is reproducible.

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
        Also how often the progress bar's postfix is updated: the mean training loss of the last
        ``eval_every`` steps and, with ``eval_data``, the latest accuracy on it.
    progress : bool, default True
        Show a tqdm progress bar (on stderr).
    desc : str
        The progress bar's label.
    leave : bool, default False
        Keep the finished bar on screen (with its final postfix) instead of clearing it.

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
    if (
        isinstance(eval_every, bool)
        or not isinstance(eval_every, (int, np.integer))
        or eval_every <= 0
    ):
        raise ValueError(f"train_classifier: eval_every must be a positive int, got {eval_every!r}")
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
    history = History()

    def record(step: int) -> None:
        if eval_data is not None:
            loss, acc = evaluate(model, eval_data)
            history.eval_step.append(step)
            history.eval_loss.append(loss)
            history.eval_accuracy.append(acc)

    record(0)
    model.train()
    bar = None
    if progress:
        from tqdm.std import tqdm

        bar = tqdm(total=steps, desc=desc, mininterval=0.5, leave=leave)
    try:
        batches = batch_indices(len(data), batch_size=batch_size, steps=steps, seed=seed)
        for step, idx in enumerate(batches, start=1):
            start = time.perf_counter()
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.step_seconds.append(time.perf_counter() - start)
            history.loss.append(float(loss.item()))
            if step % eval_every == 0 or step == steps:
                record(step)
                if bar is not None:
                    bar.set_postfix_str(_postfix(history, eval_every), refresh=False)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return history


def _postfix(history: History, window: int) -> str:
    text = f"loss {np.mean(history.loss[-window:]):.3g}"
    if history.eval_accuracy:
        text += f", eval accuracy {history.eval_accuracy[-1]:.1%}"
    return text
