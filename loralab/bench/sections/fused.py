"""Section 4, the fused LoRA op: its hand-derived backward over the same computation through
composed primitive ops (MatMul, Transpose, Add, Mul) of the engine."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from loralab.bench.config import ALPHA, RANK, BenchConfig, Check, Results
from loralab.bench.sections._table import table
from loralab.bench.timing import CLOCKS, paired_ratio
from loralab.lora import lora_linear
from loralab.tensor import Tensor


def composed_lora(x: Tensor, W0: Tensor, b: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """The LoRA layer from primitive ops: ``x @ W0.T + b + ((x @ A.T) @ B.T) * s``."""
    return x @ W0.T + b + ((x @ A.T) @ B.T) * s


def fused_vs_composed(
    shape: tuple[int, ...], rng: np.random.Generator, cfg: BenchConfig
) -> dict[str, Any]:
    """Backward seconds of the fused op and of the composed ops, alternating, for x of ``shape``."""
    width, s, clock = shape[-1], ALPHA / RANK, CLOCKS[cfg.clock]
    bound = 1.0 / math.sqrt(width)

    def u(*sh: int) -> np.ndarray:
        return rng.uniform(-bound, bound, sh).astype(np.float32)

    W0, b = Tensor(u(width, width)), Tensor(u(width))
    A, B = Tensor(u(RANK, width), True), Tensor(0.01 * u(width, RANK), True)
    x = Tensor(rng.standard_normal(shape).astype(np.float32), True)
    dy = rng.standard_normal(shape[:-1] + (width,)).astype(np.float32)
    forwards = {
        "fused": lambda: lora_linear(x, W0, b, A, B, s),
        "composed": lambda: composed_lora(x, W0, b, A, B, s),
    }

    def backward_seconds(name: str, calls: int) -> float:
        total = 0.0
        for _ in range(calls):
            y = forwards[name]()
            t0 = clock()
            y.backward(dy)
            total += clock() - t0
            x.grad = A.grad = B.grad = None
        return total / calls

    for name in forwards:  # warm-up
        backward_seconds(name, 1)
    t0 = time.perf_counter()
    backward_seconds("fused", 1)
    calls = max(1, int(cfg.sample_seconds / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {"fused": [], "composed": []}
    for i in range(cfg.repeats):
        for name in ("fused", "composed") if i % 2 == 0 else ("composed", "fused"):
            times[name].append(backward_seconds(name, calls))
    return {
        "shape": shape,
        "fused_ms": 1e3 * statistics.median(times["fused"]),
        "composed_ms": 1e3 * statistics.median(times["composed"]),
        "ratio": paired_ratio(times["fused"], times["composed"]),
    }


def run(res: Results, log: Callable[[str], None]) -> None:
    """Compare the two backwards for every shape of ``res.config.fused_shapes``."""
    rng = np.random.default_rng(res.config.seed + 3)
    for shape in res.config.fused_shapes:
        log(f"[4] fused LoRA backward, x of shape {shape}")
        row = fused_vs_composed(tuple(shape), rng, res.config)
        res.fused.append(row)
        res.checks.append(
            Check(
                "4",
                f"fused / composed backward, x {tuple(shape)}",
                row["ratio"],
                "<= 0.8",
                row["ratio"] <= 0.8,
            )
        )


def markdown(res: Results) -> list[str]:
    """The section's heading, what the two sides compute, and the table."""
    rows = [
        [
            str(tuple(r["shape"])),
            f"{r['fused_ms']:.3f} ms",
            f"{r['composed_ms']:.3f} ms",
            f"{r['ratio']:.3f}",
        ]
        for r in res.fused
    ]
    return [
        f"### 4. Fused LoRA op: backward over composed primitive ops (r={RANK}, in = out)",
        "",
        "Composed: `x @ W0.T + b + ((x @ A.T) @ B.T) * s` through the engine's MatMul, Transpose, "
        "Add and Mul; fused: `loralab.lora.lora_linear` with the hand-derived backward. x requires a gradient "
        "(an inner layer); W0 and b are frozen. Both backwards skip dW0: the engine's MatMul "
        "forms no gradient for an input that does not need one. Both therefore spend most of "
        "their time in the same dx = dy W0 matmul, and the fused op saves only the elementwise "
        "passes of the composed graph (and, for a batch of sequences, the per-sequence dA and dB "
        "products summed afterwards), so the ratio stays near 1 for a 2-D x.",
        "",
        table(["x shape", "fused backward", "composed backward", "fused / composed"], rows),
        "",
    ]
