"""A LoRA training step on the small GPT: NumPy engine against the PyTorch twin, on the CPU.

    python benchmarks/bench_gpt.py [--steps 50] [--batch-size 16] [--context 64] [--threads 1]
                                   [--keep-freed-memory]

Both run the same model (the shipped checkpoint's shape, float32, LoRA r=8 on Wq and Wv), the same
batches and Adam, with the same number of BLAS / torch threads; the steps alternate so that noise
from other processes hits both alike. Prints the median step time of each and their ratio
(target: NumPy within 1.2x of torch).

``--keep-freed-memory`` (Linux, glibc) tells malloc to keep freed memory instead of returning it
to the OS. A step allocates tens of MB of activations and frees them all at the end; by default
glibc hands that memory back, and the next step pays a page fault for every 4 KiB it touches
again. NumPy, which makes a new array per intermediate result, pays more of that than torch.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time


def keep_freed_memory() -> None:
    """glibc's mallopt: never trim the heap, never serve large blocks by mmap (both sides alike)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 1 << 25)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads for both")
    parser.add_argument("--keep-freed-memory", action="store_true", help="see the module doc")
    args = parser.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before NumPy loads its BLAS
    if args.keep_freed_memory:
        keep_freed_memory()

    import numpy as np
    import torch

    import loralab.torch.gpt  # noqa: F401  (registers the GPT's converters)
    from loralab import optim
    from loralab.lora import inject_lora
    from loralab.models import get_batch, load_corpus, load_gpt
    from loralab.torch import to_torch
    from loralab.training import train_step

    torch.set_num_threads(args.threads)
    model = inject_lora(load_gpt(), ["q", "v"], r=8, alpha=16, seed=0)
    twin = to_torch(model)
    np_opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t_opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-3)
    data = load_corpus("devil").train
    rng = np.random.default_rng(0)
    batches = [get_batch(data, args.batch_size, args.context, rng) for _ in range(args.steps + 3)]

    def np_step(x, y):
        train_step(np_opt, lambda: model.loss(x, y))

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
    kept = ", freed memory kept" if args.keep_freed_memory else ""
    print(
        f"GPT LoRA step (batch {args.batch_size} x {args.context}, {args.threads} thread(s){kept}): "
        f"numpy {1000 * med['numpy']:.1f} ms, torch {1000 * med['torch']:.1f} ms, ratio {ratio:.2f}"
    )
    return ratio


if __name__ == "__main__":
    main()
