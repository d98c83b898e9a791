"""Timing two or more sides alternately, and the paired ratio every figure of the suite reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CLOCKS", "time_alternating", "paired_ratio"]

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_alternating(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    sample_seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    rewarm: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each side, ``repeats`` samples each, the sides' order alternating.

    Each sample times as many calls as fill about ``sample_seconds`` (calibrated once per side).
    ``clock`` is wall time by default; the process's CPU time (``time.process_time``) ignores
    the moments a busy machine takes the CPU away, and measures the work exactly when
    everything runs on one thread. ``rewarm``: one untimed call before each sample, so that no
    side pays for fetching back its weights after whatever the side before it left in the CPU's
    caches (the steady state of serving one model batch after batch).
    """
    inner = {}
    for name, fn in sides.items():
        fn()  # warm-up: first-touch of buffers, lazy state (Adam's moments)
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, int(sample_seconds / one))
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            fn, n = sides[name], inner[name]
            if rewarm:
                fn()
            t0 = clock()
            for _ in range(n):
                fn()
            times[name].append((clock() - t0) / n)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
