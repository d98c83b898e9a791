"""What a run is: the shipped model it fine-tunes (LoRA or full), its batches, its settings."""

from dataclasses import dataclass

import numpy as np
import torch

from loralab._validate import boolean, non_negative_int, one_of, positive_int, positive_number
from loralab.datasets import load_digits, shift_digits
from loralab.models import get_batch, load_corpus, load_gpt
from loralab.models.digits import load_digits_mlp
from loralab.torch.convert import to_torch
from loralab.torch.inject import inject_lora

__all__ = ["MODELS", "RunConfig", "build_model", "global_batches"]

#: The shipped models a run can fine-tune, and the task each is adapted to.
MODELS = {
    "mlp": "the digits MLP (64-256-256-10) on the digits turned a quarter turn; LoRA on every Linear",
    "gpt": "the Genesis GPT (2 blocks, d = 64) on The Devil's Dictionary; LoRA on q and v",
}
_LORA_TARGETS = {"mlp": ["0", "2", "4"], "gpt": ["q", "v"]}
_FAULTS = (None, "raise", "hang")


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: the same on one process and on N.

    Parameters
    ----------
    model : {"mlp", "gpt"}
        A shipped pre-trained model, see `MODELS`.
    full : bool
        Full fine-tuning (every parameter trains) instead of LoRA.
    r, alpha : int, float
        LoRA's rank and scale (ΔW = (alpha / r) B A); ignored when ``full``.
    steps : int
        Adam steps.
    global_batch : int
        Examples per step over all ranks (for the GPT: windows of ``context`` characters); each
        of N ranks takes a contiguous shard of ``global_batch / N``, so N must divide it.
    context : int
        Characters per window (GPT only).
    lr : float, optional
        Adam's learning rate; None: 1e-2 for LoRA, 1e-3 for full fine-tuning (which moves every
        weight, so takes smaller steps).
    seed : int
        The adapters' initial values and the batches (a ``numpy.random.Generator``).
    dtype : {"float64", "float32"}
        Float64 makes N processes agree with one to round-off.
    bucket_cap_mb : float
        DDP's bucket size in MB (its default is 25): smaller buckets, more all-reduce calls.
    fault : {None, "raise", "hang"}
        For the tests and the tutorial: make rank ``fault_rank`` raise, or hang, at its first
        step, to see how a failure is reported and how the timeout ends a hang.
    fault_rank : int
    """

    model: str = "mlp"
    full: bool = False
    r: int = 4
    alpha: float = 8.0
    steps: int = 5
    global_batch: int = 16
    context: int = 32
    lr: float | None = None
    seed: int = 0
    dtype: str = "float64"
    bucket_cap_mb: float = 25.0
    fault: str | None = None
    fault_rank: int = 1

    def __post_init__(self) -> None:
        where = "RunConfig"
        one_of("model", self.model, MODELS, where)
        boolean("full", self.full, where)
        for name in ("r", "steps", "global_batch", "context"):
            positive_int(name, getattr(self, name), where)
        for name in ("alpha", "bucket_cap_mb") + (() if self.lr is None else ("lr",)):
            positive_number(name, getattr(self, name), where)
        for name in ("seed", "fault_rank"):
            non_negative_int(name, getattr(self, name), where)
        one_of("dtype", self.dtype, ("float64", "float32"), where)
        one_of("fault", self.fault, _FAULTS, where)

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default for the mode."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.full else 1e-2

    @property
    def mode(self) -> str:
        """``"full"`` or ``"lora"``."""
        return "full" if self.full else "lora"


def build_model(run: RunConfig) -> torch.nn.Module:
    """The twin that ``run`` trains, on the CPU: the pre-trained base, then LoRA or all trainable.

    LoRA: `loralab.torch.inject_lora` on the targets of `MODELS` with ``seed`` (B = 0, so the
    model starts equal to its base), every other parameter frozen. Full: every parameter trains.
    """
    base = load_digits_mlp()[0] if run.model == "mlp" else load_gpt()
    twin = to_torch(base, dtype=run.dtype)
    if run.full:
        for p in twin.parameters():
            p.requires_grad_(True)
    else:
        inject_lora(twin, _LORA_TARGETS[run.model], r=run.r, alpha=run.alpha, seed=run.seed)
    return twin


def global_batches(run: RunConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``run.steps`` global batches (x, y), the same in every process (drawn from ``seed``).

    MLP: x (global_batch, 64) rotated digits, y (global_batch,) labels. GPT: x and y
    (global_batch, context) character ids, y shifted by one.
    """
    rng = np.random.default_rng(run.seed)
    if run.model == "mlp":
        data = shift_digits(load_digits(dtype=run.dtype), "rotate90")
        picks = [rng.integers(0, len(data), size=run.global_batch) for _ in range(run.steps)]
        return [(data.x[i], data.y[i]) for i in picks]
    ids = load_corpus("devil").train
    return [get_batch(ids, run.global_batch, run.context, rng) for _ in range(run.steps)]
