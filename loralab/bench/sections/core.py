"""Section 2, LoRA over full fine-tuning: step time and peak memory of LoRA (r=8 on every
Linear) over full fine-tuning of the same MLP, next to the bounds computed from the shapes."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

from loralab.bench.config import N_LAYERS, RANK, Check, Results
from loralab.bench.machine import optional_torch
from loralab.bench.memory import torch_peak, traced_peak
from loralab.bench.mlp import MLPArrays, engine_model, engine_step, torch_model, torch_step
from loralab.bench.sections._table import mib, table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating


def core_bounds(width: int, batch: int, r: int = RANK, itemsize: int = 4) -> dict[str, float]:
    """What the shapes predict for LoRA over full fine-tuning (4 x Linear(width, width), Adam).

    Time: matmul FLOPs. Per layer the forward costs one (batch, width) x (width, width) matmul,
    dx one more (not for the first layer: the data needs no gradient) and dW one more (full
    fine-tuning only); LoRA's own matmuls add 2 r (2 width) batch FLOPs per pass.
    Memory: full fine-tuning keeps weights, gradients and Adam's two moments (4 x weights) plus
    the activations; LoRA keeps the frozen weights, 4 x its small A and B, and the activations
    (each layer's output and its ReLU, 2 x batch x width values per layer).
    """
    mm = 2.0 * batch * width * width
    lora_mm = 2.0 * batch * r * 2 * width
    full_flops = N_LAYERS * 2 * mm + (N_LAYERS - 1) * mm
    lora_flops = N_LAYERS * (mm + 3 * lora_mm) + (N_LAYERS - 1) * (mm + lora_mm)
    weights = N_LAYERS * (width * width + width) * itemsize
    lora_params = N_LAYERS * 2 * r * width * itemsize
    activations = N_LAYERS * 2 * batch * width * itemsize
    return {
        "time": lora_flops / full_flops,
        "memory": (weights + 4 * lora_params + activations) / (4 * weights + activations),
        "weights_bytes": weights,
        "activation_bytes": activations,
    }


def run(res: Results, log: Callable[[str], None]) -> None:
    """Time both methods and measure their peak memory on each backend."""
    cfg, torch = res.config, optional_torch()
    width, batch = cfg.core_width, cfg.batch
    rng = np.random.default_rng(cfg.seed + 1)
    arrays = MLPArrays.random(width, rng)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    t = rng.standard_normal((batch, width)).astype(np.float32)
    bounds = core_bounds(width, batch)
    backends = [("NumPy (loralab)", "numpy")] + ([("PyTorch eager", "torch")] if torch else [])
    for label, kind in backends:
        log(f"[2] LoRA over full fine-tuning, {label}")
        model, step = (engine_model, engine_step) if kind == "numpy" else (torch_model, torch_step)
        times = time_alternating(
            {
                "lora": step(model(arrays, lora=True), x, t),
                "full": step(model(arrays, lora=False), x, t),
            },
            cfg.repeats,
            cfg.sample_seconds,
            CLOCKS[cfg.clock],
        )
        row = {
            "backend": label,
            "full_ms": 1e3 * statistics.median(times["full"]),
            "lora_ms": 1e3 * statistics.median(times["lora"]),
            "time_ratio": paired_ratio(times["lora"], times["full"]),
            "time_bound": bounds["time"],
            "memory_bound": bounds["memory"],
        }
        if kind == "numpy":

            def build(lora: bool):
                model = engine_model(arrays, lora=lora)
                return engine_step(model, x, t), list(model.parameters())

            row["memory_method"] = "tracemalloc peak"
            row["full_peak"] = traced_peak(lambda: build(False))
            row["lora_peak"] = traced_peak(lambda: build(True))
        elif cfg.torch_memory:
            row["memory_method"] = "peak RSS growth, child process"
            threads = torch.get_num_threads()
            row["full_peak"] = torch_peak(width, batch, lora=False, seed=cfg.seed, threads=threads)
            row["lora_peak"] = torch_peak(width, batch, lora=True, seed=cfg.seed, threads=threads)
        res.checks.append(
            Check(
                "2",
                f"LoRA / full step time, {label}",
                row["time_ratio"],
                "<= 0.75",
                row["time_ratio"] <= 0.75,
                f"bound {bounds['time']:.3f}",
            )
        )
        if row.get("full_peak") and row.get("lora_peak"):
            row["memory_ratio"] = row["lora_peak"] / row["full_peak"]
            row["memory_over_bound"] = row["memory_ratio"] / bounds["memory"]
            res.checks.append(
                Check(
                    "2",
                    f"LoRA / full peak memory, {label}",
                    row["memory_ratio"],
                    f"<= 1.10 x bound = {1.1 * bounds['memory']:.3f}",
                    row["memory_over_bound"] <= 1.10,
                    f"bound {bounds['memory']:.3f}",
                )
            )
        elif kind == "torch":
            res.notes.append(
                "PyTorch peak memory not measured "
                + ("(--quick)." if not cfg.torch_memory else "(needs Linux /proc).")
            )
        res.core.append(row)


def markdown(res: Results) -> list[str]:
    """The section's heading, the bounds and the table."""
    cfg = res.config
    b = core_bounds(cfg.core_width, cfg.batch)
    header = [
        "backend",
        "full step",
        "LoRA step",
        "time ratio",
        "time bound",
        "full peak",
        "LoRA peak",
        "memory ratio",
        "memory bound",
        "ratio / bound",
        "memory measured by",
    ]
    rows = [
        [
            r["backend"],
            f"{r['full_ms']:.2f} ms",
            f"{r['lora_ms']:.2f} ms",
            f"{r['time_ratio']:.3f}",
            f"{r['time_bound']:.3f}",
            mib(r.get("full_peak")),
            mib(r.get("lora_peak")),
            f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "n/a",
            f"{r['memory_bound']:.3f}",
            f"{r['memory_over_bound']:.3f}" if "memory_over_bound" in r else "n/a",
            r.get("memory_method", "not measured"),
        ]
        for r in res.core
    ]
    return [
        f"### 2. LoRA over full fine-tuning ({N_LAYERS} x Linear({cfg.core_width}, "
        f"{cfg.core_width}), batch {cfg.batch}, float32, Adam, r={RANK} on every Linear)",
        "",
        f"Bounds from the shapes: time {b['time']:.3f} (matmul FLOPs: LoRA skips dW, and the "
        f"first layer's dx), memory {b['memory']:.3f} = (weights + activations) / (4 x weights + "
        f"activations) with weights {mib(b['weights_bytes'])} and activations "
        f"{mib(b['activation_bytes'])}.",
        "",
        table(header, rows),
        "",
    ]
