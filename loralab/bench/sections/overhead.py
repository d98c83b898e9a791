"""Section 1, autograd overhead: a LoRA training step through loralab's engine over the same
step written by hand in NumPy, and over PyTorch eager with the same number of threads."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

from loralab.bench.config import N_LAYERS, RANK, Check, Results
from loralab.bench.machine import optional_torch
from loralab.bench.mlp import (
    HandStep,
    MLPArrays,
    engine_model,
    engine_step,
    torch_model,
    torch_step,
)
from loralab.bench.sections._table import table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating

TARGETS = {256: 1.15, 2048: 1.05}  # engine / hand NumPy at these widths


def run(res: Results, log: Callable[[str], None]) -> None:
    """Time the three sides at every width of ``res.config.widths``."""
    cfg, torch = res.config, optional_torch()
    rng = np.random.default_rng(cfg.seed)
    for width in cfg.widths:
        log(f"[1] autograd overhead, width {width}")
        arrays = MLPArrays.random(width, rng)
        x = rng.standard_normal((cfg.batch, width)).astype(np.float32)
        t = rng.standard_normal((cfg.batch, width)).astype(np.float32)
        sides = {
            "engine": engine_step(engine_model(arrays, lora=True), x, t),
            "hand": HandStep(arrays, x, t),
        }
        if torch is not None:
            sides["torch"] = torch_step(torch_model(arrays, lora=True), x, t)
        times = time_alternating(sides, cfg.repeats, cfg.sample_seconds, CLOCKS[cfg.clock])
        row = {
            "width": width,
            "engine_ms": 1e3 * statistics.median(times["engine"]),
            "hand_ms": 1e3 * statistics.median(times["hand"]),
            "engine_over_hand": paired_ratio(times["engine"], times["hand"]),
        }
        target = TARGETS.get(width)
        res.checks.append(
            Check(
                "1",
                f"engine / hand NumPy, width {width}",
                row["engine_over_hand"],
                f"<= {target}" if target else "",
                row["engine_over_hand"] <= target if target else None,
            )
        )
        if torch is not None:
            row["torch_ms"] = 1e3 * statistics.median(times["torch"])
            row["engine_over_torch"] = paired_ratio(times["engine"], times["torch"])
            row["hand_over_torch"] = paired_ratio(times["hand"], times["torch"])
            res.checks.append(
                Check(
                    "1",
                    f"engine / PyTorch eager, width {width}",
                    row["engine_over_torch"],
                    "<= 1.0",
                    row["engine_over_torch"] <= 1.0,
                )
            )
        res.overhead.append(row)


def markdown(res: Results) -> list[str]:
    """The section's heading and table."""
    out = [
        f"### 1. Autograd overhead (LoRA r={RANK} training step, {N_LAYERS} x Linear(w, w), "
        f"batch {res.config.batch}, float32, Adam)",
        "",
    ]
    has_torch = any("torch_ms" in r for r in res.overhead)
    header = ["width", "loralab engine", "hand NumPy", "engine / hand"]
    if has_torch:
        header += ["PyTorch eager", "engine / torch", "hand / torch"]
    rows = []
    for r in res.overhead:
        row = [
            str(r["width"]),
            f"{r['engine_ms']:.3f} ms",
            f"{r['hand_ms']:.3f} ms",
            f"{r['engine_over_hand']:.3f}",
        ]
        if has_torch:
            row += [
                f"{r['torch_ms']:.3f} ms",
                f"{r['engine_over_torch']:.3f}",
                f"{r['hand_over_torch']:.3f}",
            ]
        rows.append(row)
    notes = [
        "",
        "The PyTorch side is the engine model's twin (`loralab.torch.to_torch`) trained with plain "
        "autograd, so both sides skip dW0 and do the same matrix products. At the larger widths "
        "those products are nearly all of the step, and the *hand / torch* column shows that even "
        "hand-written NumPy then runs at PyTorch's speed, not faster: what remains is one BLAS "
        "(OpenBLAS) against another (MKL), not the engine's overhead (*engine / hand* near 1).",
        "",
    ]
    return [*out, table(header, rows), *notes]
