"""Section 3, inference: merged LoRA over the base model, and unmerged LoRA over the base."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from loralab.bench.config import N_LAYERS, RANK, Check, Results
from loralab.bench.machine import optional_torch
from loralab.bench.mlp import MLPArrays, engine_model, torch_model
from loralab.bench.sections._table import table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating
from loralab.tensor import no_grad


def _forward(model: Any, x: Any, no_grad_context: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        with no_grad_context():
            model(x)

    return run


def run(res: Results, log: Callable[[str], None]) -> None:
    """Time the three models' forward passes, alternating, on each backend."""
    cfg, torch = res.config, optional_torch()
    width, batch = cfg.core_width, cfg.batch
    rng = np.random.default_rng(cfg.seed + 2)
    arrays = MLPArrays.random(width, rng)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    flops = 1.0 + RANK * 2 * width / (width * width)  # (2dk + 2r(d + k)) / 2dk with d = k
    log("[3] inference: merged and unmerged LoRA over the base model")
    models = {
        "base": engine_model(arrays, lora=False),
        "merged": engine_model(arrays, lora=True, merged=True),
        "unmerged": engine_model(arrays, lora=True),
    }
    for m in models.values():
        m.eval()
    backends = [("NumPy (loralab)", {k: _forward(m, x, no_grad) for k, m in models.items()})]
    if torch is not None:
        xt = torch.from_numpy(x)
        twins = {
            "base": torch_model(arrays, lora=False),
            "merged": torch_model(arrays, lora=True, merged=True),
            "unmerged": torch_model(arrays, lora=True),
        }
        backends.append(
            ("PyTorch eager", {k: _forward(m.eval(), xt, torch.no_grad) for k, m in twins.items()})
        )
    for label, sides in backends:
        times = time_alternating(sides, cfg.repeats, cfg.sample_seconds, CLOCKS[cfg.clock])
        row = {
            "backend": label,
            "base_ms": 1e3 * statistics.median(times["base"]),
            "merged_over_base": paired_ratio(times["merged"], times["base"]),
            "unmerged_over_base": paired_ratio(times["unmerged"], times["base"]),
            "flop_ratio": flops,
        }
        res.inference.append(row)
        res.checks.append(
            Check(
                "3",
                f"merged / base inference, {label}",
                row["merged_over_base"],
                "1.00 within noise (<= 1.05)",
                abs(row["merged_over_base"] - 1.0) <= 0.05,
            )
        )
        res.checks.append(
            Check(
                "3",
                f"unmerged / base inference, {label}",
                row["unmerged_over_base"],
                "report",
                None,
                f"FLOPs ratio {flops:.4f}",
            )
        )


def markdown(res: Results) -> list[str]:
    """The section's heading, the FLOPs note and the table."""
    cfg = res.config
    rows = [
        [
            r["backend"],
            f"{r['base_ms']:.3f} ms",
            f"{r['merged_over_base']:.3f}",
            f"{r['unmerged_over_base']:.3f}",
            f"{r['flop_ratio']:.4f}",
        ]
        for r in res.inference
    ]
    return [
        f"### 3. Inference ({N_LAYERS} x Linear({cfg.core_width}, {cfg.core_width}), "
        f"batch {cfg.batch}, no gradient)",
        "",
        "Unmerged LoRA adds 2r(d + k) FLOPs per row to the base's 2dk, plus two more matmul "
        "calls and an addition per layer; merging folds ΔW into W0, so it costs nothing.",
        "",
        table(["backend", "base forward", "merged / base", "unmerged / base", "FLOPs ratio"], rows),
        "",
    ]
