"""Draw the figures of the docs home page: LoRA's block diagram and two panels of computed numbers.

Writes ``docs/assets/figures/lora_block.svg`` (and its copy in ``loralab/data/figures/``, which
tutorials 1 and 5 load from the installed package) and ``docs/assets/figures/lora_at_a_glance.svg``
(committed, shown on the home page and in tutorials 1 and 5; run this script again after
changing it). The output is deterministic: the same code writes the same bytes. Needs numpy and
matplotlib (``pip install -e ".[all]"``).

The block diagram: the input x takes two paths, the frozen W0 and the trainable A then B, scaled
by s = alpha / r; the two are summed into h = W0 x + s B A x.

Left panel: singular values of a random full-rank weight W0 and of a LoRA update
ΔW = (alpha / r) B A with B and A random of rank r: the update's spectrum is zero after r values.
Right panel: trainable parameters of one d x k layer, full fine-tuning (d k) against LoRA
(r (d + k)), for d = k = 4096 (a 7B LLaMA-style attention projection).

Usage::

    python scripts/make_docs_figures.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from loralab.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "assets" / "figures"
# The block diagram also ships in the package, for tutorials run outside the repository
# (loralab.teaching.figure reads it); tests/test_teaching.py checks the two copies are the same.
PACKAGE_DIR = ROOT / "loralab" / "data" / "figures"
FIGURE = "lora_at_a_glance.svg"
BLOCK_FIGURE = "lora_block.svg"


def spectra(d: int = 256, k: int = 256, r: int = 8, alpha: float = 16.0, seed: int = 0):
    """Singular values of W0 (d, k) ~ U(-1/sqrt(k), 1/sqrt(k)) and of ΔW = (alpha/r) B A.

    Returns
    -------
    s_w0 : ndarray of shape (min(d, k),)
    s_dw : ndarray of shape (min(d, k),)
    """
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(k)
    w0 = rng.uniform(-bound, bound, size=(d, k))
    a = rng.uniform(-bound, bound, size=(r, k))
    b = rng.normal(0.0, 0.02, size=(d, r))  # B after some training: no longer zero
    delta_w = (alpha / r) * b @ a
    return np.linalg.svd(w0, compute_uv=False), np.linalg.svd(delta_w, compute_uv=False)


def parameter_counts(d: int = 4096, k: int = 4096, ranks=(1, 2, 4, 8, 16, 32, 64, 128, 256)):
    """Full fine-tuning count d k and LoRA counts r (d + k) for each rank in ``ranks``."""
    ranks = np.asarray(ranks)
    return d * k, ranks, ranks * (d + k)


def _save_svg(fig, dest: Path) -> Path:
    """Write ``fig`` to ``dest`` atomically (mode 0644), without a date, and close it."""
    import matplotlib.pyplot as plt

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(dest, lambda tmp: fig.savefig(tmp, format="svg", metadata={"Date": None}))
    finally:
        plt.close(fig)
    return dest


def draw_block(out_dir: Path = OUT_DIR) -> Path:
    """Draw LoRA's block diagram and write it atomically to ``out_dir / BLOCK_FIGURE``.

    x (k) -> W0 (d x k, frozen) -> W0 x on the upper path; x -> A (r x k) -> B (d x r) -> times
    s = alpha / r on the lower path; the two meet in a sum, h = W0 x + s B A x (d).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Polygon

    plt.rcParams["svg.hashsalt"] = "loralab"
    fig, ax = plt.subplots(figsize=(8.4, 3.4))
    ax.set_xlim(0, 10.5)
    ax.set_ylim(0, 4.2)
    ax.set_axis_off()
    frozen, trainable, ink = "#cfd8dc", "#ffcc80", "#263238"

    def box(x, y, w, h, label, sub, colour):
        ax.add_patch(
            FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=colour, ec=ink, lw=1.2)
        )
        ax.text(x + w / 2, y + h / 2 + 0.14, label, ha="center", va="center", fontsize=13)
        ax.text(x + w / 2, y + h / 2 - 0.24, sub, ha="center", va="center", fontsize=8)

    def arrow(p, q, text=None, where=(0, 0.18)):
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=12, lw=1.2, color=ink))
        if text:
            ax.text(
                (p[0] + q[0]) / 2 + where[0],
                (p[1] + q[1]) / 2 + where[1],
                text,
                ha="center",
                fontsize=8,
            )

    ax.text(0.35, 2.1, "$x$", fontsize=15, ha="center", va="center")
    ax.text(0.35, 1.7, "($k$)", fontsize=8, ha="center")
    box(3.1, 2.8, 2.4, 0.95, "$W_0$", "$d \\times k$, frozen", frozen)
    # A: a wide, short trapezoid (k -> r); B: a short, wide one (r -> d)
    ax.add_patch(
        Polygon([(2.0, 0.25), (2.0, 1.55), (3.3, 1.15), (3.3, 0.65)], fc=trainable, ec=ink, lw=1.2)
    )
    ax.text(2.6, 0.9, "$A$", fontsize=13, ha="center", va="center")
    ax.text(2.65, 0.0, "$r \\times k$, random init", fontsize=8, ha="center")
    ax.add_patch(
        Polygon([(4.2, 0.65), (4.2, 1.15), (5.5, 1.55), (5.5, 0.25)], fc=trainable, ec=ink, lw=1.2)
    )
    ax.text(4.9, 0.9, "$B$", fontsize=13, ha="center", va="center")
    ax.text(4.85, 0.0, "$d \\times r$, zero init", fontsize=8, ha="center")
    box(6.3, 0.5, 1.3, 0.8, "$\\times s$", "$s = \\alpha / r$", "white")
    ax.add_patch(Circle((8.6, 2.1), 0.32, fc="white", ec=ink, lw=1.2))
    ax.text(8.6, 2.1, "+", fontsize=16, ha="center", va="center")

    arrow((0.6, 2.3), (3.05, 3.25))
    arrow((0.6, 1.9), (1.95, 0.9))
    arrow((5.55, 3.25), (8.35, 2.3), "$W_0 x$", (0.1, 0.2))
    arrow((3.3, 0.9), (4.15, 0.9), "$Ax$ ($r$)", (0, 0.15))
    arrow((5.5, 0.9), (6.25, 0.9))
    arrow((7.65, 0.9), (8.4, 1.85), "$sBAx$", (-0.45, 0.05))
    arrow((8.95, 2.1), (9.9, 2.1))
    ax.text(10.1, 2.1, "$h$", fontsize=15, ha="left", va="center")
    ax.text(9.45, 1.55, "$h = W_0 x + s\\,BAx$\n($d$)", fontsize=8, ha="center", va="top")
    ax.text(3.9, 1.85, "trainable: $r(d + k)$ numbers", fontsize=8, ha="center", color="#e65100")
    return _save_svg(fig, out_dir / BLOCK_FIGURE)


def draw(out_dir: Path = OUT_DIR) -> Path:
    """Draw the two computed panels and write them atomically to ``out_dir / FIGURE``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = (
        "loralab"  # stable element ids: the file only changes with the data
    )
    r = 8
    s_w0, s_dw = spectra(r=r)
    full, ranks, lora = parameter_counts()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    idx = np.arange(1, len(s_w0) + 1)
    floor = 1e-6 * s_w0[0]  # below this a singular value is zero up to rounding
    ax1.semilogy(idx, s_w0, label=r"pretrained $W_0$ (random, full rank)")
    ax1.semilogy(
        idx, np.maximum(s_dw, floor), label=rf"LoRA update $\Delta W = (\alpha/r)BA$, $r={r}$"
    )
    ax1.axvline(r, color="grey", linestyle=":", linewidth=1)
    ax1.set_ylim(floor / 2, 2 * max(s_w0[0], s_dw[0]))
    ax1.annotate(
        "zero (rounding) after $i = r$",
        (3 * r, floor),
        xytext=(0, 6),
        textcoords="offset points",
        fontsize=8,
    )
    ax1.set_xlabel("index $i$ of the singular value")
    ax1.set_ylabel(r"singular value $\sigma_i$")
    ax1.set_title("A LoRA update has rank $r$ (256 x 256 layer)")
    ax1.legend(fontsize=8)

    ax2.loglog(ranks, lora, marker="o", label=r"LoRA: $r(d+k)$")
    ax2.axhline(full, color="C3", linestyle="--", label=r"full fine-tuning: $dk$")
    for rr, n in zip(ranks, lora, strict=True):
        if rr in (1, 8, 64):
            ax2.annotate(
                f"{n / full:.2%}", (rr, n), textcoords="offset points", xytext=(-12, 8), fontsize=8
            )
    ax2.set_xlabel("rank $r$")
    ax2.set_ylabel("trainable parameters")
    ax2.set_title("One 4096 x 4096 projection")
    ax2.legend(fontsize=8, loc="lower right")

    return _save_svg(fig, out_dir / FIGURE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    block = draw_block(args.out)
    print(f"wrote {block}")
    if args.out == OUT_DIR:
        print(f"wrote {atomic_write(PACKAGE_DIR / BLOCK_FIGURE, block.read_bytes())}")
    print(f"wrote {draw(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
