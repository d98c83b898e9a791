"""The comparison ``loralab ddp`` prints: N processes against one, LoRA against full fine-tuning."""

import argparse
import json
import statistics
from typing import Any

from loralab.torch.distributed.hook import predicted_allreduce_bytes
from loralab.torch.distributed.launch import train_ddp
from loralab.torch.distributed.rank import train_single
from loralab.torch.distributed.runs import MODELS, RunConfig, build_model

__all__ = ["compare", "run_cli"]


def compare(
    model: str = "mlp",
    *,
    full: bool = False,
    nproc: int = 2,
    steps: int = 5,
    global_batch: int = 16,
    timeout: float = 300.0,
    device: Any = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Run LoRA and full fine-tuning of ``model`` on ``nproc`` processes and on one; compare.

    Returns
    -------
    dict
        ``max_param_diff_vs_single`` (of the LoRA run, or of the full run when ``full``),
        ``allreduce_bytes_per_step_lora`` / ``_full`` (measured by the hook),
        ``predicted_bytes_lora`` / ``_full`` (from shapes), ``trainable_params`` (LoRA's),
        ``total_params`` (the base model's: what full fine-tuning trains), the measured and
        predicted ratios, ``seconds_per_step_lora`` / ``_full`` (medians on rank 0), the bucket
        layout of each and the run's settings.
    """
    runs = {
        mode: RunConfig(
            model=model, full=mode == "full", steps=steps, global_batch=global_batch, seed=seed
        )
        for mode in ("lora", "full")
    }
    results = dict(
        zip(runs, train_ddp(list(runs.values()), nproc=nproc, timeout=timeout, device=device))
    )
    chosen = runs["full" if full else "lora"]
    single = train_single(chosen, device=device)
    lora_model, full_model = build_model(runs["lora"]), build_model(runs["full"])
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in full_model.parameters())
    lora_bytes = results["lora"].allreduce_bytes_per_step
    full_bytes = results["full"].allreduce_bytes_per_step
    return {
        "model": model,
        "mode": chosen.mode,
        "nproc": nproc,
        "steps": steps,
        "global_batch": global_batch,
        "dtype": chosen.dtype,
        "backend": results["lora"].backend,
        "device": results["lora"].device,
        "max_param_diff_vs_single": results[chosen.mode].max_param_diff(single.params),
        "max_replica_diff": max(r.replica_diff for r in results.values()),
        "allreduce_bytes_per_step_lora": lora_bytes,
        "allreduce_bytes_per_step_full": full_bytes,
        "predicted_bytes_lora": predicted_allreduce_bytes(lora_model),
        "predicted_bytes_full": predicted_allreduce_bytes(full_model),
        "trainable_params": trainable,
        "total_params": total,
        "allreduce_ratio": lora_bytes / full_bytes,
        "predicted_ratio": trainable / total,
        "buckets_lora": [bk.tensors for bk in results["lora"].buckets[-1]],
        "buckets_full": [bk.tensors for bk in results["full"].buckets[-1]],
        "seconds_per_step_lora": statistics.median(results["lora"].seconds_per_step),
        "seconds_per_step_full": statistics.median(results["full"].seconds_per_step),
    }


def _print_comparison(c: dict[str, Any]) -> None:
    mode = "full fine-tuning" if c["mode"] == "full" else "LoRA"
    print(
        f"loralab ddp: {c['model']} ({MODELS[c['model']]})\n"
        f"  {c['nproc']} processes ({c['backend']} on {c['device']}), {c['steps']} Adam steps, "
        f"global batch {c['global_batch']} ({c['global_batch'] // c['nproc']} per rank), {c['dtype']}"
    )
    print(
        f"  {mode}: largest parameter difference from one process on the whole batch: "
        f"{c['max_param_diff_vs_single']:.3g}"
    )
    for label, key in (("LoRA", "lora"), ("full", "full")):
        tensors = c[f"buckets_{key}"]
        print(
            f"  bytes all-reduced per step, {label:<4}: {c[f'allreduce_bytes_per_step_{key}']:>12,} "
            f"(predicted from shapes {c[f'predicted_bytes_{key}']:,}; {len(tensors)} bucket(s) "
            f"of {' + '.join(map(str, tensors))} tensors)"
        )
    print(
        f"  ratio LoRA / full: {c['allreduce_ratio']:.4f}; predicted trainable / total = "
        f"{c['trainable_params']:,} / {c['total_params']:,} = {c['predicted_ratio']:.4f}"
    )
    print(
        f"  time per step (median, rank 0): LoRA {1e3 * c['seconds_per_step_lora']:.1f} ms, "
        f"full {1e3 * c['seconds_per_step_full']:.1f} ms"
    )


def run_cli(args: argparse.Namespace) -> int:
    """``loralab ddp``: the work behind the parser that ``loralab.cli`` declares."""
    result = compare(
        args.model,
        full=args.full,
        nproc=args.nproc,
        steps=args.steps,
        global_batch=args.batch,
        timeout=args.timeout,
        device=None if args.device == "auto" else args.device,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_comparison(result)
    return 0
