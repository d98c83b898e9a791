"""Pre-train the shipped GPT checkpoint on Genesis: ``python -m loralab.models.pretrain``.

Deterministic from ``--seed`` (model initialisation and batches both come from it), so the command
regenerates ``loralab/data/checkpoints/gpt_genesis.safetensors`` (on one machine bit for bit;
across machines up to BLAS round-off). Takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from loralab import optim
from loralab.models.data import CharTokenizer, get_batch, load_corpus
from loralab.models.gpt import GPT, GPT_CHECKPOINT
from loralab.training import fit

__all__ = ["pretrain_gpt", "MODEL_CONFIG", "main"]

MODEL_CONFIG: dict[str, Any] = {"context_length": 64, "d_model": 64, "n_layers": 2, "n_heads": 4}


def pretrain_gpt(
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 4e-3,
    seed: int = 0,
    corpus: str = "genesis",
    progress: bool = True,
) -> GPT:
    """Train a fresh GPT (``MODEL_CONFIG``) on ``corpus`` with Adam and a cosine learning-rate decay.

    Returns
    -------
    GPT, in evaluation mode.
    """
    data = load_corpus(corpus)
    model = GPT(CharTokenizer().vocab_size, **MODEL_CONFIG, seed=seed)
    rng = np.random.default_rng(seed)
    batches = (get_batch(data.train, batch_size, model.context_length, rng) for _ in range(steps))
    model.train()
    fit(
        lambda batch: model.loss(*batch),
        batches,
        optim.Adam(list(model.parameters()), lr=lr),
        steps=steps,
        lr_schedule=lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps)),
        eval_every=100,
        progress=progress,
        desc=f"pre-training on {corpus}",
        leave=True,
    )
    model.eval()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped checkpoint")
    args = parser.parse_args(argv)
    model = pretrain_gpt(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = args.out
    if out is None:
        out = Path(str(resources.files("loralab.data").joinpath(GPT_CHECKPOINT)))
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (
        "python -m loralab.models.pretrain "
        f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --seed {args.seed}"
    )
    model.save(out, metadata={"command": command, "corpus": "genesis"})
    for name in ("genesis", "devil"):
        print(f"validation loss on {name}: {model.evaluate(load_corpus(name).val):.4f} nats/char")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
