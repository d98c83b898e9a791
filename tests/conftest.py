"""Shared test settings: one BLAS/torch thread per test worker.

``pytest -n 2`` runs two workers on this 2-core machine; letting each also start two BLAS or torch
threads oversubscribes the cores and makes tiny matmuls hundreds of times slower.
"""

import getpass
import os
import shutil
import tempfile

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# torch's compiler cache (created when peft or transformers import torch._inductor) goes into a
# folder of this worker's own, removed when it ends: the suite leaves nothing in the temporary folder.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="loralab-tests-inductor-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_CACHE)
# torch puts its precompiled C++ headers in <temp>/torchinductor_<user> whatever the variable says:
# removed at the end too, unless it was there before the tests (someone's own cache).
_TORCH_HEADERS = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
_TORCH_HEADERS_WERE_THERE = os.path.exists(_TORCH_HEADERS)

try:
    import torch
except ImportError:  # the core suite runs without torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)


_SESSION_START = []


def pytest_sessionstart(session):
    import time

    _SESSION_START.append(time.time())


def pytest_terminal_summary(terminalreporter):
    """Print the docs chain's report (notebook run times, build time, page count) when it ran."""
    from pathlib import Path

    report = Path(__file__).resolve().parents[1] / "artifacts" / "docs-report.txt"
    if report.is_file() and report.stat().st_mtime >= _SESSION_START[0]:
        terminalreporter.section("notebooks and docs")
        terminalreporter.write(report.read_text())


def pytest_unconfigure(config):
    shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
    if not _TORCH_HEADERS_WERE_THERE:
        shutil.rmtree(_TORCH_HEADERS, ignore_errors=True)
