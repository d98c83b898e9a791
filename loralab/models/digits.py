"""The digits MLP that ships with loralab: its shape, its pre-training and its checkpoint.

An ``MLP(DIGITS_SIZES)`` (8x8 pixels -> two hidden layers of 256 -> 10 digits) trained on the
handwritten digits' training split, deterministically (seed ``PRETRAIN_SEED`` for the split, the
initial weights and the batches). `loralab demo` adapts it to a shifted task. The shipped file is
regenerated, bit for bit on one machine, by::

    python -m loralab.demo --regenerate-checkpoint
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from loralab.datasets import Dataset, load_digits, train_test_split
from loralab.fileio import atomic_write
from loralab.nn import MLP
from loralab.training import evaluate, train_classifier

__all__ = [
    "DIGITS_SIZES",
    "DIGITS_CHECKPOINT",
    "digits_split",
    "digits_checkpoint_path",
    "pretrain_digits_mlp",
    "load_digits_mlp",
    "save_digits_mlp",
    "regenerate_digits_checkpoint",
]

DIGITS_SIZES = (64, 256, 256, 10)  # 8x8 pixels -> two hidden layers -> 10 digits
DIGITS_CHECKPOINT = "checkpoints/digits_mlp.safetensors"  # inside the package's data folder
PRETRAIN_SEED = 0  # the split, the initial weights and the batches of the pre-training
TEST_FRACTION = 0.25  # of the digits, held out from the pre-training
PRETRAIN_STEPS = 1500
PRETRAIN_LR = 2e-3
PRETRAIN_BATCH = 64
REGENERATE_COMMAND = "python -m loralab.demo --regenerate-checkpoint"


def digits_split(data: Dataset) -> tuple[Dataset, Dataset]:
    """The fixed (train, test) split of pre-training: test images were never trained on."""
    return train_test_split(data, TEST_FRACTION, seed=PRETRAIN_SEED)


def digits_checkpoint_path() -> Path:
    """Where the shipped checkpoint lives inside the installed package."""
    return Path(str(resources.files("loralab.data").joinpath(DIGITS_CHECKPOINT)))


def pretrain_digits_mlp(*, progress: bool = False) -> tuple[MLP, float]:
    """Train ``MLP(DIGITS_SIZES)`` on the digits' training split, deterministically.

    Adam, lr ``PRETRAIN_LR``, ``PRETRAIN_STEPS`` steps of ``PRETRAIN_BATCH`` images, seed
    ``PRETRAIN_SEED``.

    Returns
    -------
    (model, test_accuracy) : tuple of MLP and float
    """
    train, test = digits_split(load_digits())
    model = MLP(DIGITS_SIZES, seed=PRETRAIN_SEED)
    train_classifier(
        model,
        train,
        steps=PRETRAIN_STEPS,
        lr=PRETRAIN_LR,
        batch_size=PRETRAIN_BATCH,
        seed=PRETRAIN_SEED,
        progress=progress,
        desc="pre-training",
        leave=True,
    )
    return model, evaluate(model, test)[1]


def save_digits_mlp(model: MLP, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's weights as safetensors, atomically (no pickle)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, np.ndarray] = model.state_dict()
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_digits_mlp(path: str | Path | None = None) -> tuple[MLP, bool]:
    """The pre-trained digits MLP from the shipped checkpoint (or ``path``).

    When the file is missing, the model is pre-trained here instead (a few seconds).

    Returns
    -------
    (model, from_checkpoint) : tuple of MLP and bool
    """
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else digits_checkpoint_path()
    model = MLP(DIGITS_SIZES, seed=PRETRAIN_SEED)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model, True
    return pretrain_digits_mlp()[0], False


def regenerate_digits_checkpoint(path: str | Path | None = None) -> tuple[Path, float]:
    """Pre-train the digits MLP and write it, with a note of how it was made, to ``path``.

    ``path`` defaults to the shipped checkpoint. Returns the path and the test accuracy.
    """
    model, accuracy = pretrain_digits_mlp(progress=True)
    metadata = {
        "model": f"loralab.nn.MLP({list(DIGITS_SIZES)}, activation='relu')",
        "data": (
            f"loralab.datasets.load_digits(), train_test_split({TEST_FRACTION}, "
            f"seed={PRETRAIN_SEED}), train part"
        ),
        "training": (
            f"loralab.training.train_classifier: Adam lr={PRETRAIN_LR}, {PRETRAIN_STEPS} steps "
            f"of batch {PRETRAIN_BATCH}, seed {PRETRAIN_SEED}"
        ),
        "test_accuracy": f"{accuracy:.4f}",
        "regenerate": REGENERATE_COMMAND,
    }
    path = Path(path) if path is not None else digits_checkpoint_path()
    return save_digits_mlp(model, path, metadata), accuracy
