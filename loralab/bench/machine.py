"""The machine a run measured: CPU, NumPy's BLAS and threads, PyTorch when installed."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["machine_info", "numpy_threads", "blas_threads", "optional_torch"]


def optional_torch() -> Any:
    """The ``torch`` module, or None when PyTorch is not installed (its columns are skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numpy_threads() -> int:
    """Threads NumPy's BLAS uses: threadpoolctl's answer if installed, else the usual variables."""
    try:
        from threadpoolctl import threadpool_info

        counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        if counts:
            return int(counts[0])
    except ImportError:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def _numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        config = blas.get("openblas configuration", "")
        return f"{blas.get('name', '?')} {blas.get('version', '')}" + (
            f" ({config})" if config else ""
        )
    except Exception:  # older NumPy has no dict mode
        return "unknown (numpy.show_config() prints it)"


def machine_info() -> dict[str, str]:
    """CPU, threads and BLAS of NumPy (and of PyTorch when it is installed)."""
    info = {
        "CPU": _cpu_model(),
        "logical CPUs": str(os.cpu_count()),
        "Python": platform.python_version(),
        "NumPy": f"{np.__version__}, BLAS {_numpy_blas()}, {numpy_threads()} threads",
    }
    torch = optional_torch()
    if torch is None:
        info["PyTorch"] = "not installed (PyTorch columns skipped)"
    else:
        blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
        info["PyTorch"] = f"{torch.__version__}, {blas}, {torch.get_num_threads()} threads"
    return info


def blas_threads(threads: int | None) -> contextlib.AbstractContextManager:
    """Context limiting NumPy's BLAS to ``threads`` (needs threadpoolctl); no change when None."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ValueError(
            "run_bench: setting the thread count needs threadpoolctl (pip install threadpoolctl), "
            "or set OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before starting Python"
        ) from None
    return threadpool_limits(limits=threads, user_api="blas")
