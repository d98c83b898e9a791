"""Draw the figures of the docs home page from computed numbers.

Writes ``docs/assets/figures/lora_at_a_glance.svg`` (committed; run this script again after
changing it). Needs numpy and matplotlib (``pip install -e ".[all]"``).

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
FIGURE = "lora_at_a_glance.svg"


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


def draw(out_dir: Path = OUT_DIR) -> Path:
    """Draw the figure and write it atomically to ``out_dir / FIGURE``; return its path."""
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

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / FIGURE
    try:
        atomic_write(dest, lambda tmp: fig.savefig(tmp, format="svg", metadata={"Date": None}))
    finally:
        plt.close(fig)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    print(f"wrote {draw(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
