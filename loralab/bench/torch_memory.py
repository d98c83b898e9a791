"""The child process of `loralab.bench.memory.torch_peak`: peak memory of 3 PyTorch steps.

    python -m loralab.bench.torch_memory WIDTH BATCH LORA(0|1) SEED THREADS

Prints one JSON line ``{"peak": bytes}``: the growth of this process's resident set's
high-water mark over three training steps of `loralab.bench.mlp.torch_model` (Linux only: it
reads and resets ``/proc/self``'s counters). Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that freed tensors leave the resident set at once.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Sequence

import numpy as np


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"torch_memory: no {field} in /proc/self/status")


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from loralab.bench.mlp import MLPArrays, torch_model, torch_step

    width, batch, lora, seed, threads = argv if argv is not None else sys.argv[1:]
    width, batch, seed = int(width), int(batch), int(seed)
    torch.set_num_threads(int(threads))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    t = rng.standard_normal((batch, width)).astype(np.float32)
    arrays = MLPArrays.random(width, rng)
    for kind in (False, True):  # load every kernel's code pages first: they are not training memory
        step = torch_step(torch_model(arrays, lora=kind), x, t)
        step()
        step()
    del step
    gc.collect()
    base = _rss("VmRSS")  # includes x, t and the NumPy arrays, which stay alive
    step = torch_step(torch_model(arrays, lora=lora == "1"), x, t)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: the construction's temporaries do not count
    for _ in range(3):
        step()
    print(json.dumps({"peak": _rss("VmHWM") - base}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
