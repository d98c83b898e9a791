"""Section 5, one base serving many adapters: a mixed batch against the other ways to serve it.

A batch of ``mixed_batch`` requests spread round-robin over K adapters (r = 8 on each of the
four Linear layers) is served four ways, alternating, with no gradient:

- **base**: the base model alone (the floor: what serving costs without adapters);
- **mixed**: `loralab.lora.mixed_batch`, the base once on the whole batch and the grouped op
  (`loralab.lora.grouped`) for the K low-rank parts;
- **naive**: a loop over the adapters, each on its own rows (K smaller batches through the
  whole model; the active adapter switched by setting the layers' active list, as inference
  needs no requires_grad change);
- **merge-swap**: per adapter, merge it into W0, run its rows, unmerge (K merges of every layer
  per batch; only for K <= 16, it grows too slow to repeat beyond);

and, when torch and PEFT are installed, loralab's NumPy mixed batch against PEFT's mixed-batch
forward (``model(x, adapter_names=...)``) on the torch twin, same threads.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from loralab.bench.config import ALPHA, RANK, Check, Results
from loralab.bench.machine import optional_torch
from loralab.bench.mlp import LINEAR_NAMES, MLPArrays, engine_model
from loralab.bench.sections._table import table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating
from loralab.lora import inject_lora, lora_layers, merge_lora, mixed_batch, unmerge_lora
from loralab.tensor import no_grad

TARGET_K = 16  # the K at which the targets apply
MERGE_SWAP_MAX_K = 16


def adapters_model(arrays: MLPArrays, k: int, rng: np.random.Generator) -> Any:
    """The base MLP with K adapters ``t0 .. t{K-1}`` (r = RANK) on every Linear, B nonzero."""
    model = engine_model(arrays, lora=False)
    for i in range(k):
        inject_lora(model, LINEAR_NAMES, r=RANK, alpha=ALPHA, seed=i, adapter_name=f"t{i}")
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            B = layer.adapter(name).lora_B
            B.data = (0.01 * rng.standard_normal(B.shape)).astype(B.dtype)
    return model.eval()


def _activate(model: Any, name: str) -> None:
    for _, layer in lora_layers(model):
        layer.active_adapter_names = [name]


def sides(model: Any, base: Any, x: np.ndarray, names: list[str], k: int) -> dict[str, Callable]:
    """The ways to serve the batch ``x`` (n, width) whose row i asks for adapter ``names[i]``.

    Each side, called, returns its output of shape (n, width) (``base``: the base model's).
    """
    groups = [(f"t{j}", np.flatnonzero(np.array(names) == f"t{j}")) for j in range(k)]
    out_width = x.shape[1]

    def run_base() -> np.ndarray:
        with no_grad():
            return base(x).data

    def run_mixed() -> np.ndarray:
        with no_grad(), mixed_batch(model, names):
            return model(x).data

    def run_naive() -> np.ndarray:
        y = np.empty((x.shape[0], out_width), dtype=x.dtype)
        with no_grad():
            for name, rows in groups:
                _activate(model, name)
                y[rows] = model(x[rows]).data
        return y

    def run_merge_swap() -> np.ndarray:
        y = np.empty((x.shape[0], out_width), dtype=x.dtype)
        with no_grad():
            for name, rows in groups:
                _activate(model, name)
                merge_lora(model)
                y[rows] = model(x[rows]).data
                unmerge_lora(model)
        return y

    out = {"base": run_base, "mixed": run_mixed, "naive": run_naive}
    if k <= MERGE_SWAP_MAX_K:
        out["merge_swap"] = run_merge_swap
    return out


def peft_side(base: Any, k: int, x: np.ndarray, names: list[str]) -> Callable | None:
    """PEFT's mixed-batch forward on the torch twin with K adapters; None without torch or PEFT."""
    torch = optional_torch()
    try:
        import peft
    except ImportError:
        return None
    if torch is None:
        return None
    from loralab.torch import to_torch

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LINEAR_NAMES))
    pm = peft.get_peft_model(to_torch(base), config, adapter_name="t0")
    for i in range(1, k):
        pm.add_adapter(f"t{i}", config)
    pm.eval()
    xt = torch.from_numpy(x)

    def run() -> None:
        with torch.no_grad():
            pm(xt, adapter_names=names)

    return run


def run(res: Results, log: Callable[[str], None]) -> None:
    """Time the ways of serving a mixed batch for each K, alternating."""
    cfg = res.config
    width, batch = cfg.core_width, cfg.mixed_batch
    rng = np.random.default_rng(cfg.seed + 5)
    arrays = MLPArrays.random(width, rng)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    base = engine_model(arrays, lora=False).eval()
    log(f"[5] serving K adapters in one batch of {batch}: K = {list(cfg.mixed_ks)}")
    for k in cfg.mixed_ks:
        names = [f"t{i % k}" for i in range(batch)]
        model = adapters_model(arrays, k, rng)
        timed = sides(model, base, x, names, k)
        peft_run = peft_side(base, k, x, names)
        if peft_run is not None:
            timed["peft"] = peft_run
        times = time_alternating(timed, cfg.repeats, cfg.sample_seconds, CLOCKS[cfg.clock])
        row: dict[str, Any] = {"K": k, "batch": batch}
        for side, t in times.items():
            row[f"{side}_us_per_row"] = 1e6 * statistics.median(t) / batch
        row["mixed_over_base"] = paired_ratio(times["mixed"], times["base"])
        row["naive_over_mixed"] = paired_ratio(times["naive"], times["mixed"])
        if "merge_swap" in times:
            row["merge_swap_over_mixed"] = paired_ratio(times["merge_swap"], times["mixed"])
        if "peft" in times:
            row["numpy_over_peft"] = paired_ratio(times["mixed"], times["peft"])
        res.mixed.append(row)
    _checks(res)


def _checks(res: Results) -> None:
    target_k = TARGET_K if any(r["K"] == TARGET_K for r in res.mixed) else res.mixed[-1]["K"]
    row = next(r for r in res.mixed if r["K"] == target_k)
    res.checks.append(
        Check(
            "5",
            f"mixed batch / base forward, K = {target_k}",
            row["mixed_over_base"],
            "<= 1.25",
            row["mixed_over_base"] <= 1.25,
        )
    )
    res.checks.append(
        Check("5", f"naive loop / mixed batch, K = {target_k}", row["naive_over_mixed"], "report")
    )
    if "merge_swap_over_mixed" in row:
        res.checks.append(
            Check(
                "5",
                f"merge-swap / mixed batch, K = {target_k}",
                row["merge_swap_over_mixed"],
                "report",
            )
        )
    if "numpy_over_peft" in row:
        res.checks.append(
            Check(
                "5",
                f"loralab NumPy / PEFT mixed batch, K = {target_k}",
                row["numpy_over_peft"],
                "<= 1.0",
                row["numpy_over_peft"] <= 1.0,
            )
        )


def _fmt(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def markdown(res: Results) -> list[str]:
    """The section's heading, what each side is, and the table."""
    if not res.mixed:
        return []
    cfg = res.config
    rows = [
        [
            str(r["K"]),
            f"{r['base_us_per_row']:.1f} us",
            f"{r['mixed_us_per_row']:.1f} us",
            _fmt(r, "mixed_over_base"),
            _fmt(r, "naive_over_mixed"),
            _fmt(r, "merge_swap_over_mixed"),
            _fmt(r, "numpy_over_peft"),
        ]
        for r in res.mixed
    ]
    return [
        f"### 5. One base, K adapters in one batch (4 x Linear({cfg.core_width}, "
        f"{cfg.core_width}), batch {cfg.mixed_batch}, r = {RANK}, no gradient)",
        "",
        "Rows spread round-robin over K adapters. mixed: the base once for the whole batch plus the "
        "grouped op (one small product pair per adapter); naive: a loop over adapters, each on its "
        f"rows; merge-swap: merge, run the adapter's rows, unmerge (K <= {MERGE_SWAP_MAX_K}); PEFT: "
        "its mixed-batch forward on the torch twin.",
        "",
        table(
            [
                "K",
                "base per row",
                "mixed per row",
                "mixed / base",
                "naive / mixed",
                "merge-swap / mixed",
                "NumPy / PEFT",
            ],
            rows,
        ),
        "",
    ]
