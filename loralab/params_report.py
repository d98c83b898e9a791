"""The report of ``loralab params``: the presets table and the memory estimate, as text.

The numbers come from `loralab.counting`; this module only lays them out.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from loralab import counting

__all__ = ["format_presets", "format_params_report", "human_bytes"]

_DECIMAL_UNITS = (1000, ("B", "kB", "MB", "GB", "TB", "PB"))
_BINARY_UNITS = (1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))


def human_bytes(n: int, *, binary: bool = False) -> str:
    """``n`` bytes in decimal (kB, MB, ...) or, with ``binary``, binary units (KiB, MiB, ...)."""
    base, units = _BINARY_UNITS if binary else _DECIMAL_UNITS
    if n < base:
        return f"{n:,} B"
    value = float(n)
    for unit in units[1:]:
        value /= base
        if value < base or unit == units[-1]:
            break
    return f"{value:.2f} {unit}"


def format_presets(*, as_json: bool = False) -> str:
    """The presets of `loralab params --list-presets`: a table and their sources, or JSON."""
    presets = counting.load_presets()
    if as_json:
        rows = {n: {**asdict(s), "num_params": s.num_params()} for n, s in presets.items()}
        return json.dumps(rows, indent=2)
    lines: list[str] = []
    header = (
        "preset",
        "d_model",
        "layers",
        "d_ff",
        "heads",
        "kv",
        "vocab",
        "mlp",
        "params",
        "checkpoint (hub id)",
    )
    rows = [
        (
            name,
            f"{s.d_model:,}",
            str(s.n_layers),
            f"{s.d_ff:,}",
            str(s.n_heads),
            str(s.n_kv_heads),
            f"{s.vocab_size:,}",
            "gated" if s.gated_mlp else "plain",
            f"{s.num_params():,}",
            s.hf_id or "-",
        )
        for name, s in presets.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    lines.append("\nsources:")
    for name, s in presets.items():
        lines.append(f"  {name}: {s.source}")

    return "\n".join(lines)


def format_params_report(shape: counting.TransformerShape, est: counting.MemoryEstimate) -> str:
    """The text report of `loralab params`: the model, LoRA's trainable parameters and adapter
    size, and training memory of full fine-tuning against LoRA."""
    lines: list[str] = []
    by_target = counting.lora_params_by_target(shape, est.r, est.targets)
    lines.append(f"loralab params: {shape.name}")
    lines.append(
        f"  shape:  d_model {shape.d_model:,}, {shape.n_layers} layers, d_ff {shape.d_ff:,}, "
        f"{shape.n_heads} heads ({shape.n_kv_heads} kv), "
        + (f"vocab {shape.vocab_size:,}, " if shape.vocab_size else "vocab not given, ")
        + f"{'gated' if shape.gated_mlp else 'plain'} MLP"
    )
    if not shape.vocab_size:
        lines.append(
            "  note:   no --vocab, so the totals exclude the embeddings (and the output head)"
        )
    if shape.source:
        lines.append(f"  source: {shape.source}")
    lines.append(
        f"  LoRA:   r={est.r} on {', '.join(est.targets)}; {est.dtype} weights, {est.optimizer} "
        f"(optimizer states in {est.state_dtype})"
    )
    lines.append("")
    rows = [("model parameters (total)", f"{est.total_params:,}", "")]
    rows.append(
        (
            "LoRA trainable parameters",
            f"{est.trainable_params:,}",
            f"{100 * est.trainable_fraction:.3g}% of total",
        )
    )
    rows += [(f"  on {t} ({shape.n_layers} layers)", f"{n:,}", "") for t, n in by_target.items()]
    rows.append(
        (
            "adapter size",
            f"{est.adapter_bytes:,} B",
            f"{human_bytes(est.adapter_bytes)} = {human_bytes(est.adapter_bytes, binary=True)}",
        )
    )
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for label, value, note in rows:
        lines.append(f"  {label.ljust(w0)}  {value.rjust(w1)}  {note}".rstrip())
    lines.append("")
    table = [("training memory", "full fine-tuning", "LoRA")]
    for label, attr in (
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer states", "optimizer_states"),
    ):
        table.append(
            (
                f"  {label}",
                human_bytes(getattr(est.full, attr)),
                human_bytes(getattr(est.lora, attr)),
            )
        )
    table.append(("  total", human_bytes(est.full.total), human_bytes(est.lora.total)))
    table.append(
        (
            "  total (binary units)",
            human_bytes(est.full.total, binary=True),
            human_bytes(est.lora.total, binary=True),
        )
    )
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for label, full, lora in table:
        lines.append(
            f"  {label.ljust(widths[0])}  {full.rjust(widths[1])}  {lora.rjust(widths[2])}"
        )
    lines.append(
        f"  LoRA needs {est.lora.total / est.full.total:.1%} of full fine-tuning's memory."
    )
    lines.append(
        f"  Data parallel: gradient all-reduce per step {human_bytes(est.full.gradients)} (full) "
        f"vs {human_bytes(est.lora.gradients)} (LoRA), one {est.dtype} gradient per trainable "
        "parameter; a ring sends 2 (N-1)/N of that per rank."
    )
    lines.append(
        "  Activations are not included "
        "(they depend on batch size, sequence length and checkpointing)."
    )
    return "\n".join(lines)


def format_qlora_memory(qlora: dict) -> str:
    """The lines `loralab params --quant` adds to its report."""
    how = f"{qlora['quant']}{' with double quantization' if qlora['double_quant'] else ''}"
    return (
        f"\n  QLoRA: the frozen base in {how}, {qlora['bits_per_parameter']:.4g} bits per parameter:"
        f"\n    base weights {human_bytes(qlora['base_weights_bytes'])} instead of "
        f"{human_bytes(qlora['base_weights_bytes_unquantized'])}; training memory "
        f"{human_bytes(qlora['memory_qlora_bytes'])} (the adapter, its gradients and optimizer "
        "states as for LoRA; activations excluded)."
    )
