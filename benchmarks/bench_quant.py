"""QLoRA's cost: the frozen base's memory in 4 bits, and a QLoRA step over the same LoRA step on float32.

Four Linear(1024, 1024) layers (ReLU between), batch 128, float32, LoRA r=8 (alpha 16) on every
Linear, MSE loss, Adam; the same weights, adapters and data on both sides, measured alternately in
one process (`loralab.bench.timing`: the median of paired ratios, so a slow moment of a busy machine
hits both sides alike).

- memory: the bytes the frozen base stores (``QuantizedTensor.nbytes``: packed codes, 8-bit
  constants, their scales and mean) over the same weights in float32. Target <= 0.145 with double
  quantization (QLoRA's 4.127 bits / 32 = 0.129).
- time: one QLoRA training step over one LoRA step on the float32 base. Target <= 1.5. The
  difference is the dequantization: W0 is rebuilt from its codes in the forward and again in the
  backward pass of each layer (`loralab.quant.Linear4bitFn`, as bitsandbytes does, so that only
  the codes are held in between); those eight dequantizations are timed on their own and
  reported as a share of the LoRA step.

    python benchmarks/bench_quant.py [--repeats N] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating
from loralab.lora import inject_lora
from loralab.nn import MLP
from loralab.quant import Linear4bit, quantize_model
from loralab.tensor import Tensor
from loralab.training import train_step

WIDTH, N_LAYERS, BATCH, RANK, ALPHA, LR = 1024, 4, 128, 8, 16, 1e-3
MEMORY_TARGET, TIME_TARGET = 0.145, 1.5
LINEAR_NAMES = [str(2 * i) for i in range(N_LAYERS)]


def build(quantized: bool, seed: int = 0) -> MLP:
    """The benchmarked MLP (the same weights for a given seed), 4-bit NF4 base if ``quantized``."""
    model = MLP([WIDTH] * (N_LAYERS + 1), seed=seed)
    if quantized:
        quantize_model(model, dtype="nf4", double_quant=True)
    inject_lora(model, LINEAR_NAMES, r=RANK, alpha=ALPHA, seed=seed)
    for name in LINEAR_NAMES:  # B != 0, so that no side meets a special case
        layer = model.get_submodule(name)
        layer.lora_B.data[...] = np.random.default_rng(seed).uniform(
            -1e-3, 1e-3, layer.lora_B.shape
        )
    return model


def step_fn(model: MLP, x: np.ndarray, target: np.ndarray):
    opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    xt = Tensor(x)
    return lambda: train_step(opt, lambda: F.mse_loss(model(xt), target))


def base_memory_ratio(model: MLP) -> float:
    bases = [m for m in model.modules() if isinstance(m, Linear4bit)]
    stored = sum(b.weight.nbytes for b in bases)
    float32 = sum(4 * b.in_features * b.out_features for b in bases)
    return stored / float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--sample-seconds", type=float, default=0.3)
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    target = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    lora, qlora = build(quantized=False), build(quantized=True)
    bases = [m.base for m in qlora.modules() if isinstance(getattr(m, "base", None), Linear4bit)]
    assert len(bases) == N_LAYERS

    memory = base_memory_ratio(qlora)
    bits = 8 * sum(b.weight.nbytes for b in bases) / sum(b.weight.size for b in bases)
    times = time_alternating(
        {
            "qlora": step_fn(qlora, x, target),
            "lora": step_fn(lora, x, target),
            "dequantize": lambda: [
                b.weight.dequantize(out=b.workspace.get(b.weight.workspace_size))
                for b in bases
                for _pass in ("forward", "backward")
            ],
        },
        repeats=args.repeats,
        sample_seconds=args.sample_seconds,
        clock=CLOCKS[args.clock],
    )
    time_ratio = paired_ratio(times["qlora"], times["lora"])
    dequant_share = paired_ratio(times["dequantize"], times["lora"])
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}

    print(
        f"QLoRA vs LoRA: {N_LAYERS} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, r={RANK}, NF4 + double quant"
    )
    print(
        f"  frozen base memory, 4-bit / float32: {memory:.4f} ({bits:.3f} bits per parameter)  target <= {MEMORY_TARGET}  {'ok' if memory <= MEMORY_TARGET else 'MISSED'}"
    )
    print(
        f"  training step, QLoRA / LoRA:         {time_ratio:.3f} ({ms['qlora']:.1f} ms / {ms['lora']:.1f} ms)  target <= {TIME_TARGET}  {'ok' if time_ratio <= TIME_TARGET else 'MISSED'}"
    )
    print(
        f"  where the difference goes: dequantizing the {N_LAYERS} bases, in the forward and again in the "
        f"backward pass, takes {ms['dequantize']:.1f} ms, {dequant_share:.3f} of a LoRA step"
    )


if __name__ == "__main__":
    main()
