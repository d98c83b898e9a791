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

import numpy as np

from loralab import optim
from loralab.models.data import CharTokenizer, get_batch, load_corpus
from loralab.models.gpt import CHECKPOINT, GPT

__all__ = ["pretrain", "MODEL_CONFIG", "main"]

MODEL_CONFIG = {"context_length": 64, "d_model": 64, "n_layers": 2, "n_heads": 4}


def pretrain(
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
    params = list(model.parameters())
    opt = optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    steps_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc=f"pre-training on {corpus}")
    for step in steps_iter:
        opt.param_groups[0]["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        x, y = get_batch(data.train, batch_size, model.context_length, rng)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress and step % 100 == 0:
            steps_iter.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped checkpoint")
    args = parser.parse_args(argv)
    model = pretrain(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = args.out
    if out is None:
        out = Path(str(resources.files("loralab.data").joinpath("checkpoints"))) / CHECKPOINT
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
