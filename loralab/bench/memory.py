"""Peak training memory: tracemalloc for NumPy, a child process's resident set for PyTorch.

NumPy reports its buffers to ``tracemalloc``, so `traced_peak` sees every array a step keeps or
makes. tracemalloc cannot see torch's allocations; `torch_peak` instead runs the steps in a child
process (`loralab.bench.torch_memory`) and reads the growth of its peak resident set.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["traced_peak", "torch_peak"]


def traced_peak(build: Callable[[], tuple[Callable[[], Any], list]], steps: int = 2) -> int:
    """tracemalloc's peak over ``steps`` training steps, counting the model's weights.

    ``build()`` makes the model (untraced, so the initialisation's temporaries do not count) and
    returns ``(step, parameters)``; the parameters are then copied under tracing so that they
    are counted once.
    """
    gc.collect()
    step, params = build()
    tracemalloc.start()
    try:
        for p in params:
            p.data = p.data.copy()
        gc.collect()
        tracemalloc.reset_peak()
        for _ in range(steps):
            step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def torch_peak(width: int, batch: int, *, lora: bool, seed: int, threads: int) -> int | None:
    """Growth of a child process's peak resident memory over 3 PyTorch steps (Linux only).

    The child's ``malloc`` maps every block of 64 KiB or more on its own
    (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and its
    high-water mark follows the live tensors; kernels run once beforehand so that their code
    pages are not counted. None when it cannot be measured here.
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    args = [str(width), str(batch), "1" if lora else "0", str(seed), str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-m", "loralab.bench.torch_memory", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if out.returncode != 0:
        return None
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])
