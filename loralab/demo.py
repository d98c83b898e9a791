"""``loralab demo``: see LoRA work in under a minute, on a CPU, with NumPy only.

A small MLP pre-trained on the handwritten digits (loaded from the checkpoint that ships with
loralab) is adapted to a shifted task, the same digits turned a quarter turn, on which it is much
worse. Full fine-tuning, the output layer alone, and LoRA at ranks 1, 4 and 8 on every Linear
layer each train from the same pre-trained weights on the same batches. The demo prints what each
method trains, its peak training memory, its step time, its accuracy and what it saves to disk,
draws the learning curves, and, when PyTorch is installed, replays the adapted model against its
PyTorch twin.

The checkpoint, its pre-training and its loading live in `loralab.models.digits`; it is
regenerated, bit for bit, by::

    python -m loralab.demo --regenerate-checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab._deprecated import moved_attribute
from loralab._validate import boolean, non_negative_int, one_of, positive_int
from loralab.bench.memory import traced_peak
from loralab.datasets import SHIFTS, Dataset, load_digits, shift_digits
from loralab.fileio import atomic_write
from loralab.lora import count_parameters, inject_lora, save_adapter
from loralab.models.digits import (
    DIGITS_SIZES,
    digits_split,
    load_digits_mlp,
    regenerate_digits_checkpoint,
)
from loralab.nn import MLP
from loralab.training import batch_indices, evaluate, train_classifier, train_step

__all__ = ["DemoConfig", "DemoError", "DemoResult", "MethodResult", "run_demo", "format_table"]

# The Linear layers of MLP(DIGITS_SIZES), as torch.nn.Sequential names them; the last is the head.
LINEARS = ("0", "2", "4")
HEAD = "4"
BATCH = 64
# The float32 agreement the README states (tests/test_torch_equivalence.py's bound, 50 Adam steps)
FLOAT32_BOUND = 1e-5
# What the demo does with alpha and why, in the words of docs/guides/math.md (section Scaling);
# tests/test_teaching.py checks that the two tell the same story.
ALPHA_NOTE = (
    "LoRA uses alpha = 2r, a common recipe: the scaling alpha / r is then 2 at every rank, so "
    "the ranks are compared at one scaling and one learning rate. That removes the paper's "
    "normalisation: the paper fixes alpha at the first r it tries, so alpha / r shrinks as r "
    "grows (the math guide, section Scaling, compares the two)"
)


class DemoError(Exception):
    """A problem the user can fix (e.g. an ``--out`` folder that cannot be written)."""


@dataclass(frozen=True)
class DemoConfig:
    """Options of one demo run.

    Attributes
    ----------
    seed : int
        Seeds the adapters' initial values and the order of the training batches.
    out : Path
        Folder for the adapters, the fully fine-tuned weights and ``demo.png``.
    quick : bool
        A few seconds: fewer steps and evaluations (used by the tests).
    shift : str
        The shifted task, see :func:`loralab.datasets.shift_digits`.
    ranks : tuple of int
        LoRA ranks to compare (at most 10: the output layer has 10 rows).
    equivalence : bool
        Replay the adapted model against its PyTorch twin when torch is installed.
    """

    seed: int = 0
    out: Path = Path("loralab-demo")
    quick: bool = False
    shift: str = "rotate90"
    ranks: tuple[int, ...] = (1, 4, 8)
    equivalence: bool = True

    def __post_init__(self) -> None:
        where = "DemoConfig"
        non_negative_int("seed", self.seed, where)
        boolean("quick", self.quick, where)
        boolean("equivalence", self.equivalence, where)
        one_of("shift", self.shift, SHIFTS, where)
        if not isinstance(self.ranks, (tuple, list)):
            raise TypeError(f"{where}: ranks must be a tuple of ints, got {self.ranks!r}")
        if not self.ranks:
            raise ValueError(f"{where}: ranks must hold at least one rank, got {self.ranks!r}")
        for r in self.ranks:
            # r <= min(in, out) of every adapted Linear; the output layer's 10 rows are the least.
            if positive_int("ranks", r, where) > DIGITS_SIZES[-1]:
                raise ValueError(
                    f"{where}: rank {r} exceeds {DIGITS_SIZES[-1]} (the output layer has "
                    f"{DIGITS_SIZES[-1]} rows)"
                )
        object.__setattr__(self, "ranks", tuple(self.ranks))

    @property
    def steps(self) -> int:
        return 40 if self.quick else 600

    @property
    def eval_every(self) -> int:
        return 10 if self.quick else 25


@dataclass
class MethodResult:
    """What one adaptation method trained, cost and achieved."""

    method: str
    trainable: int
    total: int
    peak_bytes: int
    step_seconds: float
    accuracy: float
    saved_bytes: int
    saved_path: Path
    steps: list[int] = field(default_factory=list)  # evaluation steps, 0 = before training
    test_accuracy: list[float] = field(default_factory=list)  # at those steps
    train_loss: list[float] = field(default_factory=list)  # of every training step


@dataclass
class DemoResult:
    """What `run_demo` measured: the base model before adaptation, then each method."""

    base_accuracy: float  # the pre-trained model on the original digits' test split
    base_shifted_accuracy: float  # ... and on the shifted test split
    methods: list[MethodResult]
    figure: Path | None
    equivalence: float | None
    notes: list[str]


# ----- adapting -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Method:
    name: str
    lr: float
    prepare: Callable[[MLP, int], MLP]  # (pre-trained model, seed) -> model to train
    rank: int | None = None  # LoRA's r, None for the other methods


def _full(model: MLP, seed: int) -> MLP:
    return model


def _head(model: MLP, seed: int) -> MLP:
    model.requires_grad_(False)
    model.get_submodule(HEAD).requires_grad_(True)
    return model


def _lora(r: int) -> Callable[[MLP, int], MLP]:
    def prepare(model: MLP, seed: int) -> MLP:
        # alpha = 2r: see ALPHA_NOTE (and docs/guides/math.md, section Scaling).
        return inject_lora(model, list(LINEARS), r=r, alpha=2 * r, seed=seed)

    return prepare


def _methods(config: DemoConfig) -> list[_Method]:
    return [
        _Method("full fine-tuning", 1e-3, _full),
        _Method("head only", 3e-3, _head),
        *(_Method(f"LoRA r={r}", 3e-3, _lora(r), r) for r in config.ranks),
    ]


def _save(method: _Method, model: MLP, out: Path) -> Path:
    """What the method must keep: the adapter (LoRA), the head, or every weight."""
    if method.rank is not None:
        return (
            Path(save_adapter(model, out / f"adapter_r{method.rank}")) / "adapter_model.safetensors"
        )
    from safetensors.numpy import save_file

    if method.name == "head only":
        path = out / "head.safetensors"
        state = {k: v for k, v in model.state_dict().items() if k.startswith(f"{HEAD}.")}
    else:
        path = out / "full_finetuned.safetensors"
        state = model.state_dict()
    return atomic_write(path, lambda tmp: save_file(state, tmp))


def _adapt(
    method: _Method, config: DemoConfig, train: Dataset, test: Dataset, progress: bool
) -> tuple[MethodResult, MLP]:
    base, _ = load_digits_mlp()
    model = method.prepare(base, config.seed)
    trainable, total = count_parameters(model)
    history = train_classifier(
        model,
        train,
        steps=config.steps,
        lr=method.lr,
        batch_size=BATCH,
        seed=config.seed,
        eval_data=test,
        eval_every=config.eval_every,
        progress=progress,
        desc=f"{method.name:>16}",
        leave=True,
    )

    def build_for_memory() -> tuple[Callable[[], float], list]:
        m = method.prepare(load_digits_mlp()[0], config.seed)
        opt = optim.Adam([p for p in m.parameters() if p.requires_grad], lr=method.lr)
        x, y = train.x[:BATCH], train.y[:BATCH]
        return lambda: train_step(opt, lambda: F.cross_entropy(m(x), y)), list(m.parameters())

    saved = _save(method, model, config.out)
    result = MethodResult(
        method=method.name,
        trainable=trainable,
        total=total,
        peak_bytes=traced_peak(build_for_memory, steps=3),
        step_seconds=statistics.median(history.step_seconds),
        accuracy=history.eval_accuracy[-1],
        saved_bytes=saved.stat().st_size,
        saved_path=saved,
        steps=history.eval_step,
        test_accuracy=history.eval_accuracy,
        train_loss=history.loss,
    )
    return result, model


# ----- reporting -------------------------------------------------------------------------------------
def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_table(results: Sequence[MethodResult]) -> str:
    """The demo's table: one row per method."""
    header = (
        "method",
        "trainable params",
        "% of total",
        "peak train memory",
        "step time",
        "test accuracy",
        "saved to disk",
    )
    rows = [
        (
            r.method,
            f"{r.trainable:,}",
            f"{100 * r.trainable / r.total:.2f}%",
            _kib(r.peak_bytes),
            f"{1e3 * r.step_seconds:.2f} ms",
            f"{r.accuracy:.1%}",
            _kib(r.saved_bytes),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for j, row in enumerate((header, *rows)):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


_SMOOTH = 10  # steps averaged in the figure's loss curves: one batch's loss is noisy


def _figure(result: DemoResult, shift: str, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result.methods:
        ax_acc.plot(r.steps, r.test_accuracy, label=r.method)
        k = min(_SMOOTH, len(r.train_loss))
        mean_loss = np.convolve(r.train_loss, np.ones(k) / k, mode="valid")
        ax_loss.plot(np.arange(k, len(r.train_loss) + 1), mean_loss, label=r.method)
    ax_acc.axhline(
        result.base_shifted_accuracy, color="gray", ls="--", lw=1, label="pre-trained model"
    )
    ax_acc.set(xlabel="step", ylabel="test accuracy", title=f"Accuracy on the {shift} digits")
    ax_loss.set(
        xlabel="step",
        ylabel="training loss (cross-entropy)",
        title=f"Training loss, mean of the last {_SMOOTH} steps",
    )
    ax_loss.set_yscale("log")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def _equivalence(model: MLP, train: Dataset, seed: int) -> dict[str, float]:
    """Largest relative difference between copies of the adapted model and their PyTorch twins
    over 5 training steps, in float64 (round-off only) and in float32.

    Adam divides each gradient entry by its own running size, so where a gradient is near zero
    float32 round-off can flip a whole step of size lr: float32 differences of 1e-4 to 1e-2 are
    round-off, not a bug (SGD on the same batches stays near 1e-6)."""
    import torch

    from loralab.torch import check_equivalence, to_numpy, to_torch

    batches = [
        (train.x[idx], train.y[idx])
        for idx in batch_indices(len(train), batch_size=BATCH, steps=5, seed=seed)
    ]
    found = {}
    for name, dtype in (("float64", np.float64), ("float32", np.float32)):
        # a copy in that dtype: the demo's own model stays as it is
        copy = to_numpy(to_torch(model, dtype=getattr(torch, name)))
        typed = [(x.astype(dtype), y) for x, y in batches]
        report = check_equivalence(copy, to_torch(copy), typed, steps=5, lr=3e-3)
        found[name] = report.max_difference
        found[f"{name} first step"] = max(report.loss[0], report.output[0], report.grad[0])
    return found


def _log_equivalence(
    result: DemoResult, model: MLP, train: Dataset, config: DemoConfig, log: Callable[[str], None]
) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        log(
            "PyTorch is not installed: the equivalence check is skipped (to run it: "
            'pip install -e ".[torch]" in the repository, or the built wheel with [torch]).'
        )
        return
    found = _equivalence(model, train, config.seed)
    result.equivalence = found["float64"]
    first = found["float32 first step"]
    why = (
        "this run stays within it."
        if found["float32"] <= FLOAT32_BOUND
        else f"here the first step's loss, outputs and gradients agree within {first:.2e} "
        f"({'inside' if first <= FLOAT32_BOUND else 'outside'} it), then Adam's update "
        "m / sqrt(v) enlarges float32 round-off wherever a gradient of this trained model is "
        "close to zero (float64, round-off alone, is the check)."
    )
    log(
        f"PyTorch twin of the adapted LoRA r={config.ranks[-1]} model, 5 more training steps side "
        f"by side: largest relative difference {found['float64']:.2e} in float64, "
        f"{found['float32']:.2e} in float32. The README's {FLOAT32_BOUND:.0e} for float32 is the "
        f"tests' bound on small random models; {why}"
    )


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DemoError(f"cannot write to --out {str(out)!r}: {e.strerror or e}") from None


def run_demo(
    config: DemoConfig, *, log: Callable[[str], None] = print, progress: bool = True
) -> DemoResult:
    """Run the demo, print its report through ``log`` and return the numbers.

    Raises
    ------
    DemoError
        When ``config.out`` cannot be written.
    """
    _check_out(config.out)
    t_start = time.perf_counter()
    with _one_blas_thread():
        result = _run(config, log, progress)
    log(f"Done in {time.perf_counter() - t_start:.1f} s.")
    return result


def _one_blas_thread():
    """One BLAS thread (via threadpoolctl, when installed) for the demo's small matrices.

    A (64, 256) x (256, 256) matmul is too small to share: waking a second thread costs more
    than it saves, and on a busy machine a multi-threaded BLAS waits for descheduled threads
    (measured here under load: 37-225 ms per step with 2 threads, 0.3-0.9 ms with 1).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run(config: DemoConfig, log: Callable[[str], None], progress: bool) -> DemoResult:
    notes = []
    train0, test0 = digits_split(load_digits())
    train, test = shift_digits(train0, config.shift), shift_digits(test0, config.shift)
    base, from_checkpoint = load_digits_mlp()
    if not from_checkpoint:
        notes.append("the shipped checkpoint is missing: pre-trained the model here")
    base_acc, shifted_acc = evaluate(base, test0)[1], evaluate(base, test)[1]
    _, total = count_parameters(base)
    log(
        f"Pre-trained MLP {list(DIGITS_SIZES)} ({total:,} parameters, "
        f"{'shipped checkpoint' if from_checkpoint else 'pre-trained just now'}): "
        f"{base_acc:.1%} on the digits' test split, {shifted_acc:.1%} on the same digits "
        f"{config.shift}: the shifted task."
    )
    log(
        f"Adapting it with {len(train)} {config.shift} training images, {config.steps} steps of "
        f"Adam, batch {BATCH}, seed {config.seed}. {ALPHA_NOTE}:"
    )
    results, models = [], {}
    for method in _methods(config):
        r, models[method.name] = _adapt(method, config, train, test, progress)
        results.append(r)
    result = DemoResult(base_acc, shifted_acc, results, None, None, notes)
    log("")
    log(format_table(results))
    log("")
    log(
        "trainable params: what the optimizer updates; peak train memory: tracemalloc's peak over "
        "a training step (weights, gradients, Adam state, activations); saved to disk: the LoRA "
        "adapter, the head, or every weight for full fine-tuning."
    )
    log(f"Saved under {config.out}/ (LoRA adapters in HF PEFT's format).")
    result.figure = _figure(result, config.shift, config.out / "demo.png")
    if result.figure is None:
        log("matplotlib is not installed: no figure (pip install matplotlib).")
    else:
        log(f"Figure (accuracy and loss against steps): {result.figure}")
    if config.equivalence:
        _log_equivalence(result, models[f"LoRA r={config.ranks[-1]}"], train, config, log)
    for note in notes:
        log(f"note: {note}")
    return result


# ----- python -m loralab.demo [--regenerate-checkpoint] ------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the shipped checkpoint (``--regenerate-checkpoint``) or run the default demo."""
    parser = argparse.ArgumentParser(prog="python -m loralab.demo", description=__doc__)
    parser.add_argument(
        "--regenerate-checkpoint",
        action="store_true",
        help=f"pre-train MLP{list(DIGITS_SIZES)} on the digits and write the shipped checkpoint",
    )
    parser.add_argument("--path", type=Path, help="where to write it (default: inside the package)")
    args = parser.parse_args(argv)
    if args.regenerate_checkpoint:
        path, accuracy = regenerate_digits_checkpoint(args.path)
        print(f"wrote {path} (test accuracy {accuracy:.1%})")
        return 0
    try:
        run_demo(DemoConfig())
    except DemoError as e:
        print(f"python -m loralab.demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if not TYPE_CHECKING:  # mypy would otherwise accept any attribute of loralab.demo

    def __getattr__(name: str) -> Any:
        """0.1's ``load_pretrained``, ``pretrain``, ``CHECKPOINT`` and ``SIZES`` (now in
        `loralab.models.digits`), with a DeprecationWarning; removed in 0.3."""
        return moved_attribute(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
