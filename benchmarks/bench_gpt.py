"""A LoRA training step on the small GPT: NumPy engine against the PyTorch twin, on the CPU.

    python benchmarks/bench_gpt.py [--steps 30] [--batch-size 16] [--context 64] [--threads 1]

Both run the same model (the shipped checkpoint's shape, float32, LoRA r=8 on Wq and Wv), the same
batches and Adam; the steps alternate so that noise from other processes hits both alike. Prints
the median step time of each and their ratio (target: NumPy within 1.2x of torch).
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads for both")
    args = parser.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))  # before NumPy loads its BLAS

    import numpy as np
    import torch

    import loralab.torch.gpt  # noqa: F401  (registers the GPT's converters)
    from loralab import optim
    from loralab.lora import inject_lora
    from loralab.models import get_batch, load_corpus, load_pretrained
    from loralab.torch import to_torch

    torch.set_num_threads(args.threads)
    model = inject_lora(load_pretrained(), ["q", "v"], r=8, alpha=16, seed=0)
    twin = to_torch(model)
    np_opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t_opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-3)
    data = load_corpus("devil").train
    rng = np.random.default_rng(0)
    batches = [get_batch(data, args.batch_size, args.context, rng) for _ in range(args.steps + 3)]

    def np_step(x, y):
        loss = model.loss(x, y)
        np_opt.zero_grad()
        loss.backward()
        np_opt.step()

    def torch_step(x, y):
        loss = twin.loss(torch.from_numpy(x), torch.from_numpy(y))
        t_opt.zero_grad()
        loss.backward()
        t_opt.step()

    times = {"numpy": [], "torch": []}
    for i, (x, y) in enumerate(batches):
        for name, step in (("numpy", np_step), ("torch", torch_step)):
            start = time.perf_counter()
            step(x, y)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio = med["numpy"] / med["torch"]
    print(
        f"GPT LoRA step (batch {args.batch_size} x {args.context}, {args.threads} thread(s)): "
        f"numpy {1000 * med['numpy']:.1f} ms, torch {1000 * med['torch']:.1f} ms, ratio {ratio:.2f}"
    )
    return ratio


if __name__ == "__main__":
    main()
