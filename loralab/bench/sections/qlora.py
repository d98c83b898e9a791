"""Section 6, QLoRA: the frozen base's memory in 4 bits, and a QLoRA step over the same LoRA step.

Four Linear(width, width) layers (ReLU between), float32, LoRA (r = 8) on every Linear, MSE loss,
Adam; the same weights, adapters and data on both sides, timed alternately in one process.

- memory: the bytes the frozen base stores (``QuantizedTensor.nbytes``: packed codes, 8-bit
  constants, their scales and mean) over the same weights in float32. Target <= 0.145 with double
  quantization (QLoRA's 4.127 bits / 32 = 0.129).
- time: one QLoRA training step over one LoRA step on the float32 base. Target <= 1.5. The
  difference is the dequantization: W0 is rebuilt from its codes in the forward and again in the
  backward pass of each layer (`loralab.quant.Linear4bitFn`, as bitsandbytes does, so that only
  the codes are held in between); those dequantizations are timed on their own and reported as a
  share of the LoRA step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

from loralab.bench.config import ALPHA, N_LAYERS, RANK, Check, Results
from loralab.bench.mlp import LINEAR_NAMES, engine_step
from loralab.bench.sections._table import table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating
from loralab.lora import inject_lora
from loralab.nn import MLP
from loralab.quant import Linear4bit, quantize_model

MEMORY_TARGET, TIME_TARGET = 0.145, 1.5


def build(width: int, quantized: bool, seed: int = 0) -> MLP:
    """The benchmarked MLP (the same weights for a given seed), NF4 base if ``quantized``."""
    model = MLP([width] * (N_LAYERS + 1), seed=seed)
    if quantized:
        quantize_model(model, dtype="nf4", double_quant=True)
    inject_lora(model, LINEAR_NAMES, r=RANK, alpha=ALPHA, seed=seed)
    for name in LINEAR_NAMES:  # B != 0, so that no side meets a special case
        layer = model.get_submodule(name)
        shape = layer.lora_B.shape
        layer.lora_B.data[...] = np.random.default_rng(seed).uniform(-1e-3, 1e-3, shape)
    return model


def bases(model: MLP) -> list[Linear4bit]:
    """The model's 4-bit bases, in module order."""
    return [m for _, m in model.named_modules() if isinstance(m, Linear4bit)]


def run(res: Results, log: Callable[[str], None]) -> None:
    """Measure the base's memory ratio and the QLoRA/LoRA step-time ratio."""
    cfg = res.config
    width, batch = cfg.core_width, cfg.batch
    rng = np.random.default_rng(cfg.seed + 6)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    target = rng.standard_normal((batch, width)).astype(np.float32)
    log("[6] QLoRA: a 4-bit NF4 base under LoRA against the float32 base")
    lora, qlora = build(width, False, cfg.seed), build(width, True, cfg.seed)
    four_bit = bases(qlora)
    stored = sum(b.weight.nbytes for b in four_bit)
    values = sum(b.in_features * b.out_features for b in four_bit)
    memory = stored / (4 * values)

    def dequantize_all() -> None:
        for b in four_bit:
            for _pass in ("forward", "backward"):
                b.weight.dequantize(out=b.workspace.get(b.weight.workspace_size))

    times = time_alternating(
        {
            "qlora": engine_step(qlora, x, target),
            "lora": engine_step(lora, x, target),
            "dequantize": dequantize_all,
        },
        cfg.repeats,
        cfg.sample_seconds,
        CLOCKS[cfg.clock],
    )
    row = {
        "bits": 8 * stored / values,
        "memory": memory,
        "lora_ms": 1e3 * statistics.median(times["lora"]),
        "qlora_over_lora": paired_ratio(times["qlora"], times["lora"]),
        "dequant_share": paired_ratio(times["dequantize"], times["lora"]),
    }
    res.qlora.append(row)
    res.checks.append(
        Check(
            "6",
            "4-bit / float32 frozen-base memory (NF4, double quant)",
            memory,
            f"<= {MEMORY_TARGET}",
            memory <= MEMORY_TARGET,
        )
    )
    res.checks.append(
        Check(
            "6",
            "QLoRA / LoRA training step time, NumPy (loralab)",
            row["qlora_over_lora"],
            f"<= {TIME_TARGET}",
            row["qlora_over_lora"] <= TIME_TARGET,
        )
    )


def markdown(res: Results) -> list[str]:
    """The section's heading, where the time goes, and the table."""
    cfg = res.config
    rows = [
        [
            f"{r['bits']:.3f}",
            f"{r['memory']:.4f}",
            f"{r['lora_ms']:.2f} ms",
            f"{r['qlora_over_lora']:.3f}",
            f"{r['dequant_share']:.3f}",
        ]
        for r in res.qlora
    ]
    return [
        f"### 6. QLoRA ({N_LAYERS} x Linear({cfg.core_width}, {cfg.core_width}), batch "
        f"{cfg.batch}, r = {RANK}, NF4 with double quantization)",
        "",
        "The base's memory is what `loralab.quant` really stores (packed 4-bit codes and the "
        "double-quantized constants). A QLoRA step pays for dequantizing W0 in the forward and "
        "again in the backward pass of every layer, so that only the codes are held between them; "
        "the last column is that work alone, as a fraction of a LoRA step.",
        "",
        table(
            [
                "bits / parameter",
                "base memory, 4-bit / float32",
                "LoRA step",
                "QLoRA / LoRA step",
                "dequantization / LoRA step",
            ],
            rows,
        ),
        "",
    ]
