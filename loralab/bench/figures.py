"""The suite's two figures (matplotlib, optional): overhead against width, and every ratio."""

from __future__ import annotations

from pathlib import Path

from loralab.bench.config import Results
from loralab.fileio import atomic_write

__all__ = ["write_figures"]


def write_figures(res: Results, directory: Path) -> list[str]:
    """PNG figures in ``directory`` (next to the results); [] and a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        res.notes.append("matplotlib is not installed: no figures were drawn.")
        return []

    def save(fig, name: str) -> str:
        return _save(plt, fig, directory / name)

    widths = [r["width"] for r in res.overhead]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(
        widths, [r["engine_over_hand"] for r in res.overhead], "o-", label="engine / hand NumPy"
    )
    if any("engine_over_torch" in r for r in res.overhead):
        ax.plot(
            widths, [r["engine_over_torch"] for r in res.overhead], "s-", label="engine / PyTorch"
        )
        ax.plot(widths, [r["hand_over_torch"] for r in res.overhead], "^--", label="hand / PyTorch")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("width")
    ax.set_ylabel("step time ratio")
    ax.set_title("Autograd overhead: LoRA training step")
    ax.legend()
    fig.tight_layout()
    names = [save(fig, "overhead.png")]

    checks = [c for c in res.checks if c.section in ("2", "3", "4")]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(checks) + 1.2))
    colors = ["tab:green" if c.met else "tab:red" if c.met is False else "tab:gray" for c in checks]
    ax.barh(range(len(checks)), [c.value for c in checks], color=colors)
    ax.set_yticks(range(len(checks)), [c.name for c in checks], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("ratio (green: target met, red: missed, gray: no target)")
    ax.set_title("LoRA vs full fine-tuning, inference, fused backward")
    fig.tight_layout()
    names.append(save(fig, "ratios.png"))

    if res.mixed:
        names.append(mixed_batch_figure(res, directory))
    return names


def mixed_batch_figure(res: Results, directory: Path) -> str:
    """Section 5's figure, mixed_batch.png: serving time per row against K, with the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["K"] for r in res.mixed]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for side, style in [
        ("base", "k--"),
        ("mixed", "o-"),
        ("grouped_once", "o--"),
        ("naive", "s-"),
        ("merge_swap", "^-"),
        ("peft", "d:"),
    ]:
        pts = [(r["K"], r[f"{side}_us_per_row"]) for r in res.mixed if f"{side}_us_per_row" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=side.replace("_", " "))
    if all("bound" in r for r in res.mixed):  # the FLOP bound: the base times 1 + r(d+k)/(dk)
        bound = [r["base_us_per_row"] * r["bound"] for r in res.mixed]
        ax.plot(ks, bound, color="tab:green", lw=2.5, alpha=0.5, label="FLOP bound")
    for key, style, label in [
        ("bytes_over_base", "x:", "base + one read of the adapters"),
        ("in_place_over_base", "s:", "base + that read in place"),
        ("plain_over_base", "+-.", "plain NumPy (no engine)"),
    ]:  # the measured floors, as times per row at the base's speed
        pts = [(r["K"], r["base_us_per_row"] * r[key]) for r in res.mixed if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, color="tab:gray", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("adapters in the batch (K)")
    ax.set_ylabel("time per row (us)")
    ax.set_title("One base, K adapters: serving one mixed batch")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(plt, fig, directory / "mixed_batch.png")


def _save(plt, fig, path: Path) -> str:
    """Write ``fig`` to ``path`` as PNG (atomically), close it and return the file's name."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path.name
