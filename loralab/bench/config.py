"""What one run of the suite measures (`BenchConfig`) and what it found (`Results`, `Check`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchConfig", "Check", "Results", "DEFAULT_OUT", "N_LAYERS", "RANK", "ALPHA", "LR"]

DEFAULT_OUT = Path("docs/benchmarks/results.md")
N_LAYERS = 4  # Linear(width, width) layers of every benchmarked MLP
RANK = 8  # LoRA's r on every Linear
ALPHA = 16.0  # LoRA's alpha: scaling alpha / r = 2
LR = 1e-3  # Adam's learning rate


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeats of one run of the suite (``quick`` shrinks everything for the tests)."""

    widths: tuple[int, ...] = (64, 256, 1024, 2048)
    batch: int = 128
    core_width: int = 1024
    fused_shapes: tuple[tuple[int, ...], ...] = ((128, 256), (128, 1024), (16, 128, 1024))
    mixed_batch: int = 256  # section 5: rows of the mixed batch
    mixed_ks: tuple[int, ...] = (1, 4, 16, 64, 256)  # section 5: numbers of adapters
    # section 7: GPT-2-124M's (n_layer, n_embd, n_head, vocab, n_positions), and (batch, tokens)
    real_shape: tuple[int, ...] = (12, 768, 12, 50257, 1024)
    real_tokens: tuple[int, int] = (4, 128)
    repeats: int = 21
    sample_seconds: float = 0.08
    torch_memory: bool = True
    seed: int = 0
    quick: bool = False
    threads: int | None = None  # BLAS and torch threads; None: NumPy's current count
    clock: str = "wall"  # "wall" (time.perf_counter) or "cpu" (time.process_time)

    @classmethod
    def tiny(cls) -> BenchConfig:
        """The ``--quick`` sizes: seconds, for checking the output, not the speed."""
        return cls(
            widths=(16, 32),
            batch=8,
            core_width=32,
            fused_shapes=((8, 32), (2, 4, 32)),
            mixed_batch=16,
            mixed_ks=(1, 4),
            real_shape=(2, 32, 4, 97, 16),
            real_tokens=(2, 8),
            repeats=3,
            sample_seconds=0.005,
            torch_memory=False,
            quick=True,
        )


@dataclass
class Check:
    """One measured ratio and, where the project set one, its target."""

    section: str
    name: str
    value: float
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Results:
    """Every section's rows (one dict per measured size or backend), the checks and notes."""

    config: BenchConfig
    machine: dict[str, str]
    overhead: list[dict[str, Any]] = field(default_factory=list)
    core: list[dict[str, Any]] = field(default_factory=list)
    inference: list[dict[str, Any]] = field(default_factory=list)
    fused: list[dict[str, Any]] = field(default_factory=list)
    mixed: list[dict[str, Any]] = field(default_factory=list)
    mixed_ranks: list[dict[str, Any]] = field(default_factory=list)  # section 5, ranks differ
    mixed_profile: list[dict[str, Any]] = field(default_factory=list)  # section 5, per part
    qlora: list[dict[str, Any]] = field(default_factory=list)
    real_model: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
