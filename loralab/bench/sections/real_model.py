"""Section 7, a real model: LoRA on a GPT-2-124M-shaped model, loralab's NumPy against HF + PEFT.

GPT-2's shapes (12 layers, d = 768, 12 heads, a vocabulary of 50257, 1024 positions: 124M
parameters), random weights (their values change neither the time nor the memory), LoRA r = 8
on ``c_attn`` (PEFT's ``target_modules=["c_attn"]``: Wq, Wk, Wv fused), Adam, float32, one batch
of 4 sequences of 128 tokens, next-token cross-entropy.

- time: one LoRA training step in loralab's engine (`loralab.models.gpt2`) over the same step in
  HF ``transformers`` + ``peft`` on the same weights and batch, both on ONE thread (threadpoolctl
  for NumPy's BLAS, ``torch.set_num_threads(1)``), timed alternately. Target <= 1.0. A step takes
  seconds, so each sample is one step and the section takes at most 5 paired repeats.
- memory: tracemalloc's peak over two training steps of loralab's LoRA and of full fine-tuning
  (weights counted), their ratio next to the bound from the shapes (`real_model_bounds`).
  Target: within 1.10 x the bound.

Without ``transformers`` and ``peft`` the HF side is skipped (and said so); the memory part needs
only NumPy.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from loralab.bench.config import RANK, Check, Results
from loralab.bench.memory import traced_peak
from loralab.bench.sections._table import mib, table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating

MAX_REPEATS = 5
TIME_TARGET, MEMORY_TARGET = 1.0, 1.10
LR = 1e-4


def gpt2_config(shape: tuple[int, ...]) -> dict[str, Any]:
    """An HF GPT-2 config.json dict of ``shape`` = (n_layer, n_embd, n_head, vocab, n_positions)."""
    n_layer, n_embd, n_head, vocab, n_positions = shape
    return {
        "model_type": "gpt2",
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "vocab_size": vocab,
        "n_positions": n_positions,
    }


def real_model_bounds(
    shape: tuple[int, ...], batch: int, seq: int, r: int = RANK, itemsize: int = 4
) -> dict[str, float]:
    """What the shapes predict for LoRA (r on every c_attn) over full fine-tuning, with Adam.

    Weights: the token and position tables, per block 12 d^2 + 13 d (c_attn 3d^2 + 3d, c_proj
    d^2 + d, c_fc 4d^2 + 4d, the MLP's c_proj 4d^2 + d, two LayerNorms 4d), and ln_f (2d); the
    head is tied to the token table. LoRA trains r (d + 3d) numbers per block.
    Activations, the values backward needs, per token, counted as Korthikanti et al. (2022)
    do without dropout: in each block 16 d (c_attn's input d, q and k 2d, v d, c_proj's input
    d, the MLP's input d, the GELU's input 4d and output 4d, the two LayerNorms' inputs 2d) plus
    n_head x seq attention probabilities; then the head's logits and softmax, 2 x vocab.

    Full fine-tuning keeps weights, gradients and Adam's two moments (4 x weights) plus the
    activations; LoRA keeps the frozen weights, 4 x its A and B, and the same activations.
    """
    n_layer, d, n_head, vocab, n_positions = shape
    weights = (vocab * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d) * itemsize
    lora = n_layer * r * (d + 3 * d) * itemsize
    tokens = batch * seq
    activations = tokens * (n_layer * (16 * d + n_head * seq) + 2 * vocab) * itemsize
    return {
        "memory": (weights + 4 * lora + activations) / (4 * weights + activations),
        "weights_bytes": weights,
        "lora_bytes": lora,
        "activation_bytes": activations,
    }


@contextlib.contextmanager
def one_thread(torch: Any) -> Iterator[bool]:
    """NumPy's BLAS and torch on one thread each (yields False when threadpoolctl is missing)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits: Any = contextlib.nullcontext()
        limited = False
    else:
        limits, limited = threadpool_limits(limits=1, user_api="blas"), True
    before = torch.get_num_threads() if torch is not None else None
    with limits:
        if torch is not None:
            torch.set_num_threads(1)
        try:
            yield limited
        finally:
            if torch is not None:
                torch.set_num_threads(before)


def loralab_step(model: Any, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """One Adam step of ``model``'s trainable parameters on next-token cross-entropy."""
    from loralab.optim import Adam

    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step() -> None:
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()

    return step


def hf_side(shape: tuple[int, ...], seed: int) -> tuple[Any, Any, Any] | None:
    """A random HF GPT2LMHeadModel of ``shape`` (no dropout), ``torch`` and ``peft``, or None."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    n_layer, n_embd, n_head, vocab, n_positions = shape
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config), torch, peft


def run(res: Results, log: Callable[[str], None]) -> None:
    """Time loralab's LoRA step against HF + PEFT's, and measure LoRA's and full's peak memory."""
    from loralab.lora import LoraConfig, inject_lora
    from loralab.models.gpt2 import GPT2, GPT2Config, from_hf

    cfg = res.config
    shape, (batch, seq) = cfg.real_shape, cfg.real_tokens
    rng = np.random.default_rng(cfg.seed + 7)
    x = rng.integers(0, shape[3], (batch, seq))
    y = rng.integers(0, shape[3], (batch, seq))
    lora_config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["c_attn"])
    row: dict[str, Any] = {"shape": shape, "batch": batch, "seq": seq}
    hf = hf_side(shape, cfg.seed)
    if hf is None:
        res.notes.append("Section 7: transformers and peft are not installed; HF side skipped.")
    else:
        log("[7] a GPT-2-124M-shaped LoRA step: loralab NumPy against transformers + PEFT")
        hf_model, torch, peft = hf
        state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
        ours = from_hf(gpt2_config(shape), state)
        inject_lora(ours, lora_config, seed=cfg.seed)
        theirs = peft.get_peft_model(
            hf_model,
            peft.LoraConfig(
                r=RANK, lora_alpha=RANK, target_modules=["c_attn"], fan_in_fan_out=True
            ),
        ).train()
        opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=LR)
        tx, ty = torch.as_tensor(x), torch.as_tensor(y)

        def hf_step() -> None:
            opt.zero_grad()
            logits = theirs(tx).logits
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ty.reshape(-1)
            ).backward()
            opt.step()

        with one_thread(torch) as limited:
            times = time_alternating(
                {"loralab": loralab_step(ours, x, y), "hf": hf_step},
                min(cfg.repeats, MAX_REPEATS),
                0.0,  # one step per sample: a step takes seconds
                CLOCKS[cfg.clock],
            )
        row.update(
            loralab_s=statistics.median(times["loralab"]),
            hf_s=statistics.median(times["hf"]),
            time_ratio=paired_ratio(times["loralab"], times["hf"]),
            repeats=len(times["hf"]),
            threads="1" if limited else "NumPy's default (threadpoolctl missing)",
        )
        res.checks.append(
            Check(
                "7",
                "loralab / (transformers + PEFT) LoRA step, GPT-2-124M shape, 1 thread",
                row["time_ratio"],
                f"<= {TIME_TARGET}",
                row["time_ratio"] <= TIME_TARGET,
            )
        )
        del ours, theirs, opt, hf_model, state

    log("[7] peak training memory of LoRA and full fine-tuning, GPT-2-124M shape")

    def build(lora: bool) -> tuple[Callable[[], None], list]:
        model = GPT2(GPT2Config(gpt2_config(shape)))
        if lora:
            inject_lora(model, lora_config, seed=cfg.seed)
        return loralab_step(model, x, y), list(model.parameters())

    bounds = real_model_bounds(shape, batch, seq)
    row["full_peak"] = traced_peak(lambda: build(False))
    row["lora_peak"] = traced_peak(lambda: build(True))
    row["memory_ratio"] = row["lora_peak"] / row["full_peak"]
    row["memory_bound"] = bounds["memory"]
    row["memory_over_bound"] = row["memory_ratio"] / bounds["memory"]
    res.checks.append(
        Check(
            "7",
            "LoRA / full peak memory, GPT-2-124M shape, NumPy (loralab)",
            row["memory_ratio"],
            f"<= {MEMORY_TARGET:.2f} x bound = {MEMORY_TARGET * bounds['memory']:.3f}",
            row["memory_over_bound"] <= MEMORY_TARGET,
            f"bound {bounds['memory']:.3f}",
        )
    )
    res.real_model.append(row)


def markdown(res: Results) -> list[str]:
    """The section's heading, the bound and the table."""
    if not res.real_model:
        return []
    cfg = res.config
    shape, (batch, seq) = cfg.real_shape, cfg.real_tokens
    b = real_model_bounds(shape, batch, seq)
    r = res.real_model[0]
    timing = (
        [
            f"LoRA step, median of {r['repeats']} paired repeats on {r['threads']} thread(s): "
            f"loralab {r['loralab_s']:.2f} s, transformers + PEFT {r['hf_s']:.2f} s, "
            f"ratio {r['time_ratio']:.3f} (target <= {TIME_TARGET}).",
            "",
        ]
        if "time_ratio" in r
        else ["transformers + PEFT not installed: no time comparison.", ""]
    )
    return [
        f"### 7. A real model: GPT-2-124M shape ({shape[0]} layers, d = {shape[1]}, "
        f"{shape[2]} heads, vocabulary {shape[3]}), LoRA r = {RANK} on c_attn, batch {batch} x "
        f"{seq}, float32, Adam",
        "",
        *timing,
        f"Bound from the shapes: {b['memory']:.3f} = (weights + 4 x LoRA + activations) / "
        f"(4 x weights + activations) with weights {mib(b['weights_bytes'])} and activations "
        f"{mib(b['activation_bytes'])}.",
        "",
        table(
            ["full peak", "LoRA peak", "memory ratio", "memory bound", "ratio / bound"],
            [
                [
                    mib(r["full_peak"]),
                    mib(r["lora_peak"]),
                    f"{r['memory_ratio']:.3f}",
                    f"{r['memory_bound']:.3f}",
                    f"{r['memory_over_bound']:.3f}",
                ]
            ],
        ),
        "",
    ]
