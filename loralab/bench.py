"""The benchmark suite behind ``loralab bench``: every figure is a ratio measured side by side.

Each comparison runs its sides alternately in one process (A, B, B, A, A, B, ...) and reports the
median over the repeats of the paired ratio A_i / B_i, so a slow moment of a noisy machine hits
both sides alike. The suite measures, on MLPs of four Linear layers, batch 128, float32, Adam:

1. autograd overhead: a LoRA training step through loralab's engine over the same step written
   by hand in plain NumPy (the fused op's ``lora_forward``/``lora_backward``, a hand Adam), and
   over PyTorch eager on the CPU with the same number of threads;
2. LoRA (r=8 on every Linear) over full fine-tuning at width 1024: step time and peak memory,
   next to the bounds computed from the shapes;
3. inference: merged LoRA over the base model, and unmerged over base;
4. the fused LoRA op's backward over the same computation through composed primitive ops.

Peak memory is ``tracemalloc``'s peak for NumPy (NumPy reports its buffers to it) and the growth
of the resident set's high-water mark in a child process for PyTorch (tracemalloc cannot see
torch's allocations). torch, matplotlib and threadpoolctl are optional.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loralab import functional as F
from loralab import optim
from loralab.lora import inject_lora, merge_lora
from loralab.lora.functional import lora_backward, lora_forward
from loralab.nn import MLP
from loralab.tensor import Tensor, no_grad

__all__ = ["BenchConfig", "Check", "run_bench", "machine_info", "DEFAULT_OUT"]

DEFAULT_OUT = Path("docs/benchmarks/results.md")
N_LAYERS = 4
RANK = 8
ALPHA = 16.0
LR = 1e-3


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeats of one run of the suite (``quick`` shrinks everything for the tests)."""

    widths: tuple[int, ...] = (64, 256, 1024, 2048)
    batch: int = 128
    core_width: int = 1024
    fused_shapes: tuple[tuple[int, ...], ...] = ((128, 256), (128, 1024), (16, 128, 1024))
    repeats: int = 21
    sample_seconds: float = 0.08
    torch_memory: bool = True
    seed: int = 0
    quick: bool = False
    threads: int | None = None  # BLAS and torch threads; None: NumPy's current count
    clock: str = "wall"  # "wall" (time.perf_counter) or "cpu" (time.process_time)

    @classmethod
    def tiny(cls) -> BenchConfig:
        """The ``--quick`` sizes: seconds, for checking the output, not the speed."""
        return cls(
            widths=(16, 32),
            batch=8,
            core_width=32,
            fused_shapes=((8, 32), (2, 4, 32)),
            repeats=3,
            sample_seconds=0.005,
            torch_memory=False,
            quick=True,
        )


@dataclass
class Check:
    """One measured ratio and, where the issues set one, its target."""

    section: str
    name: str
    value: float
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Results:
    config: BenchConfig
    machine: dict[str, str]
    overhead: list[dict[str, Any]] = field(default_factory=list)
    core: list[dict[str, Any]] = field(default_factory=list)
    inference: list[dict[str, Any]] = field(default_factory=list)
    fused: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----- machine --------------------------------------------------------------------------------------
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


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def machine_info() -> dict[str, str]:
    """CPU, threads and BLAS of NumPy (and of PyTorch when it is installed)."""
    info = {
        "CPU": _cpu_model(),
        "logical CPUs": str(os.cpu_count()),
        "Python": platform.python_version(),
        "NumPy": f"{np.__version__}, BLAS {_numpy_blas()}, {numpy_threads()} threads",
    }
    torch = _torch()
    if torch is None:
        info["PyTorch"] = "not installed (PyTorch columns skipped)"
    else:
        blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
        info["PyTorch"] = f"{torch.__version__}, {blas}, {torch.get_num_threads()} threads"
    return info


# ----- timing -----------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_alternating(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    sample_seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each side, ``repeats`` samples each, the sides' order alternating.

    Each sample times as many calls as fill about ``sample_seconds`` (calibrated once per side).
    ``clock`` is wall time by default; the process's CPU time (``time.process_time``) ignores
    the moments a busy machine takes the CPU away, and measures the work exactly when
    everything runs on one thread.
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
            t0 = clock()
            for _ in range(n):
                fn()
            times[name].append((clock() - t0) / n)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# ----- one MLP, four ways ----------------------------------------------------------------------------
@dataclass
class MLPArrays:
    """Weights of an MLP of ``N_LAYERS`` Linear(width, width) layers with LoRA factors.

    W[i] (width, width), b[i] (width,), A[i] (r, width), B[i] (width, r); B is small but nonzero
    so that no side meets a special case.
    """

    W: list[np.ndarray]
    b: list[np.ndarray]
    A: list[np.ndarray]
    B: list[np.ndarray]

    @classmethod
    def random(cls, width: int, rng: np.random.Generator, r: int = RANK) -> MLPArrays:
        bound = 1.0 / math.sqrt(width)
        u = lambda *shape: rng.uniform(-bound, bound, shape).astype(np.float32)
        return cls(
            [u(width, width) for _ in range(N_LAYERS)],
            [u(width) for _ in range(N_LAYERS)],
            [u(r, width) for _ in range(N_LAYERS)],
            [0.01 * u(width, r) for _ in range(N_LAYERS)],
        )


def _names() -> list[str]:
    return [str(2 * i) for i in range(N_LAYERS)]  # MLP's Linear layers: "0", "2", "4", "6"


def engine_model(arrays: MLPArrays, *, lora: bool, merged: bool = False) -> MLP:
    """loralab's MLP with these weights; LoRA (r=8, alpha=16) on every Linear if ``lora``."""
    width = arrays.W[0].shape[0]
    model = MLP([width] * (N_LAYERS + 1), seed=0)
    state = {}
    for name, W, b in zip(_names(), arrays.W, arrays.b, strict=True):
        state[f"{name}.weight"], state[f"{name}.bias"] = W, b
    model.load_state_dict(state)
    if lora:
        inject_lora(model, _names(), r=arrays.A[0].shape[0], alpha=ALPHA, seed=0)
        for i, name in enumerate(_names()):
            layer = model.get_submodule(name)
            layer.lora_A.data[...] = arrays.A[i]
            layer.lora_B.data[...] = arrays.B[i]
        if merged:
            merge_lora(model)
    return model


def engine_step(model: MLP, x: np.ndarray, target: np.ndarray) -> Callable[[], None]:
    """One training step (zero_grad, forward, MSE loss, backward, Adam) through the engine."""
    opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    xt = Tensor(x)

    def step() -> None:
        opt.zero_grad()
        F.mse_loss(model(xt), target).backward()
        opt.step()

    return step


class HandStep:
    """The same LoRA step by hand: the fused op's NumPy pair, ReLU, MSE and Adam, no graph.

    ``HandStep(arrays, x, target)()`` takes one step; ``params`` holds A_0..A_3 then B_0..B_3.
    """

    def __init__(self, arrays: MLPArrays, x: np.ndarray, target: np.ndarray):
        self.W = [w.copy() for w in arrays.W]
        self.b = [v.copy() for v in arrays.b]
        self.params = [a.copy() for a in arrays.A] + [v.copy() for v in arrays.B]
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.s = ALPHA / arrays.A[0].shape[0]
        self.x, self.target, self.t = x, target, 0

    def __call__(self) -> None:
        n, W, b, P = N_LAYERS, self.W, self.b, self.params
        caches, masks = [], []
        h = self.x
        for i in range(n):
            y, cache = lora_forward(h, W[i], b[i], P[i], P[n + i], self.s)
            caches.append(cache)
            if i < n - 1:
                mask = y > 0
                masks.append(mask)
                h = y * mask
            else:
                h = y
        dy = (h - self.target) * np.float32(2.0 / h.size)
        grads = [None] * (2 * n)
        for i in reversed(range(n)):
            dx, grads[i], grads[n + i], _ = lora_backward(dy, caches[i], need_dx=i > 0)
            if i > 0:
                dy = dx * masks[i - 1]
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.t += 1
        step_size = LR / (1.0 - b1**self.t)
        root = math.sqrt(1.0 - b2**self.t)
        for p, g, m, v in zip(P, grads, self.m, self.v, strict=True):
            m += (g - m) * (1.0 - b1)
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v) / root
            denom += eps
            p -= step_size * (m / denom)


def torch_model(arrays: MLPArrays, *, lora: bool, merged: bool = False):
    """The same MLP in plain ``torch.nn``; LoRA written as PEFT does: base(x) + s B(A(x))."""
    torch = _torch()
    nn = torch.nn
    s = ALPHA / arrays.A[0].shape[0]

    class LoRALinear(nn.Module):
        def __init__(self, base, A, B):
            super().__init__()
            self.base = base.requires_grad_(False)
            self.lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False)
            self.lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False)
            with torch.no_grad():
                self.lora_A.weight.copy_(torch.from_numpy(A))
                self.lora_B.weight.copy_(torch.from_numpy(B))

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x)) * s

    layers = []
    for i in range(N_LAYERS):
        W, b = arrays.W[i], arrays.b[i]
        if merged:
            W = W + s * (arrays.B[i] @ arrays.A[i])
        base = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(W))
            base.bias.copy_(torch.from_numpy(b))
        layers.append(LoRALinear(base, arrays.A[i], arrays.B[i]) if lora else base)
        if i < N_LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def torch_step(model, x: np.ndarray, target: np.ndarray) -> Callable[[], None]:
    """One eager PyTorch training step with ``torch.optim.Adam`` on the trainable parameters."""
    torch = _torch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xt), tt).backward()
        opt.step()

    return step


# ----- bounds from the shapes ---------------------------------------------------------------------------
def core_bounds(width: int, batch: int, r: int = RANK, itemsize: int = 4) -> dict[str, float]:
    """What the shapes predict for LoRA over full fine-tuning (4 x Linear(width, width), Adam).

    Time: matmul FLOPs. Per layer the forward costs one (batch, width) x (width, width) matmul,
    dx one more (not for the first layer: the data needs no gradient) and dW one more (full
    fine-tuning only); LoRA's own matmuls add 2 r (2 width) batch FLOPs per pass.
    Memory: full fine-tuning keeps weights, gradients and Adam's two moments (4 x weights) plus
    the activations; LoRA keeps the frozen weights, 4 x its small A and B, and the activations
    (each layer's output and its ReLU, 2 x batch x width values per layer).
    """
    mm = 2.0 * batch * width * width
    lora_mm = 2.0 * batch * r * 2 * width
    full_flops = N_LAYERS * 2 * mm + (N_LAYERS - 1) * mm
    lora_flops = N_LAYERS * (mm + 3 * lora_mm) + (N_LAYERS - 1) * (mm + lora_mm)
    weights = N_LAYERS * (width * width + width) * itemsize
    lora_params = N_LAYERS * 2 * r * width * itemsize
    activations = N_LAYERS * 2 * batch * width * itemsize
    return {
        "time": lora_flops / full_flops,
        "memory": (weights + 4 * lora_params + activations) / (4 * weights + activations),
        "weights_bytes": weights,
        "activation_bytes": activations,
    }


def traced_peak(build: Callable[[], Callable[[], None]], steps: int = 2) -> int:
    """tracemalloc's peak over ``steps`` training steps, counting the model's weights.

    ``build`` makes the model (untraced, so the initialisation's temporaries do not count) and
    returns a ``step``; the parameters are then copied under tracing so they are counted once.
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


_TORCH_MEMORY_CHILD = """
import gc, json, sys
import numpy as np
import torch
from loralab import bench
width, batch, lora, seed, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
rng = np.random.default_rng(seed)
x = rng.standard_normal((batch, width)).astype(np.float32)
t = rng.standard_normal((batch, width)).astype(np.float32)
arrays = bench.MLPArrays.random(width, rng)
for kind in (False, True):  # load every kernel's code pages first: they are not training memory
    step = bench.torch_step(bench.torch_model(arrays, lora=kind), x, t)
    step(); step()
del step
gc.collect()
base = rss("VmRSS")  # includes x, t and the NumPy arrays, which stay alive
model = bench.torch_model(arrays, lora=lora)
step = bench.torch_step(model, x, t)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark: the construction's temporaries do not count
for _ in range(3):
    step()
print(json.dumps({"peak": rss("VmHWM") - base}))
"""


def torch_peak(width: int, batch: int, *, lora: bool, seed: int, threads: int) -> int | None:
    """Growth of a child process's peak resident memory over 3 PyTorch steps (Linux only).

    The child's ``malloc`` maps every block of 64 KiB or more on its own
    (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and its
    high-water mark follows the live tensors; kernels run once beforehand so that their code
    pages are not counted.
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    args = [str(width), str(batch), "1" if lora else "0", str(seed), str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _TORCH_MEMORY_CHILD, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if out.returncode != 0:
        return None
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


# ----- the four sections ---------------------------------------------------------------------------------
def bench_overhead(res: Results, log: Callable[[str], None]) -> None:
    cfg, torch = res.config, _torch()
    rng = np.random.default_rng(cfg.seed)
    for width in cfg.widths:
        log(f"[1] autograd overhead, width {width}")
        arrays = MLPArrays.random(width, rng)
        x = rng.standard_normal((cfg.batch, width)).astype(np.float32)
        t = rng.standard_normal((cfg.batch, width)).astype(np.float32)
        sides = {
            "engine": engine_step(engine_model(arrays, lora=True), x, t),
            "hand": HandStep(arrays, x, t),
        }
        if torch is not None:
            sides["torch"] = torch_step(torch_model(arrays, lora=True), x, t)
        times = time_alternating(sides, cfg.repeats, cfg.sample_seconds, CLOCKS[cfg.clock])
        row = {
            "width": width,
            "engine_ms": 1e3 * statistics.median(times["engine"]),
            "hand_ms": 1e3 * statistics.median(times["hand"]),
            "engine_over_hand": paired_ratio(times["engine"], times["hand"]),
        }
        target = {256: 1.15, 2048: 1.05}.get(width)
        res.checks.append(
            Check(
                "1",
                f"engine / hand NumPy, width {width}",
                row["engine_over_hand"],
                f"<= {target}" if target else "",
                row["engine_over_hand"] <= target if target else None,
            )
        )
        if torch is not None:
            row["torch_ms"] = 1e3 * statistics.median(times["torch"])
            row["engine_over_torch"] = paired_ratio(times["engine"], times["torch"])
            row["hand_over_torch"] = paired_ratio(times["hand"], times["torch"])
            res.checks.append(
                Check(
                    "1",
                    f"engine / PyTorch eager, width {width}",
                    row["engine_over_torch"],
                    "<= 1.0",
                    row["engine_over_torch"] <= 1.0,
                )
            )
        res.overhead.append(row)


def bench_core(res: Results, log: Callable[[str], None]) -> None:
    cfg, torch = res.config, _torch()
    width, batch = cfg.core_width, cfg.batch
    rng = np.random.default_rng(cfg.seed + 1)
    arrays = MLPArrays.random(width, rng)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    t = rng.standard_normal((batch, width)).astype(np.float32)
    bounds = core_bounds(width, batch)
    backends = [("NumPy (loralab)", "numpy")] + ([("PyTorch eager", "torch")] if torch else [])
    for label, kind in backends:
        log(f"[2] LoRA over full fine-tuning, {label}")
        if kind == "numpy":
            make = lambda lora: engine_step(engine_model(arrays, lora=lora), x, t)
        else:
            make = lambda lora: torch_step(torch_model(arrays, lora=lora), x, t)
        times = time_alternating(
            {"lora": make(True), "full": make(False)},
            cfg.repeats,
            cfg.sample_seconds,
            CLOCKS[cfg.clock],
        )
        row = {
            "backend": label,
            "full_ms": 1e3 * statistics.median(times["full"]),
            "lora_ms": 1e3 * statistics.median(times["lora"]),
            "time_ratio": paired_ratio(times["lora"], times["full"]),
            "time_bound": bounds["time"],
            "memory_bound": bounds["memory"],
        }
        if kind == "numpy":

            def build(lora: bool):
                model = engine_model(arrays, lora=lora)
                return engine_step(model, x, t), list(model.parameters())

            row["memory_method"] = "tracemalloc peak"
            row["full_peak"] = traced_peak(lambda: build(False))
            row["lora_peak"] = traced_peak(lambda: build(True))
        elif cfg.torch_memory:
            row["memory_method"] = "peak RSS growth, child process"
            threads = torch.get_num_threads()
            row["full_peak"] = torch_peak(width, batch, lora=False, seed=cfg.seed, threads=threads)
            row["lora_peak"] = torch_peak(width, batch, lora=True, seed=cfg.seed, threads=threads)
        res.checks.append(
            Check(
                "2",
                f"LoRA / full step time, {label}",
                row["time_ratio"],
                "<= 0.75",
                row["time_ratio"] <= 0.75,
                f"bound {bounds['time']:.3f}",
            )
        )
        if row.get("full_peak") and row.get("lora_peak"):
            row["memory_ratio"] = row["lora_peak"] / row["full_peak"]
            row["memory_over_bound"] = row["memory_ratio"] / bounds["memory"]
            res.checks.append(
                Check(
                    "2",
                    f"LoRA / full peak memory, {label}",
                    row["memory_ratio"],
                    f"<= 1.10 x bound = {1.1 * bounds['memory']:.3f}",
                    row["memory_over_bound"] <= 1.10,
                    f"bound {bounds['memory']:.3f}",
                )
            )
        elif kind == "torch":
            res.notes.append(
                "PyTorch peak memory not measured "
                + ("(--quick)." if not cfg.torch_memory else "(needs Linux /proc).")
            )
        res.core.append(row)


def bench_inference(res: Results, log: Callable[[str], None]) -> None:
    cfg, torch = res.config, _torch()
    width, batch = cfg.core_width, cfg.batch
    rng = np.random.default_rng(cfg.seed + 2)
    arrays = MLPArrays.random(width, rng)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    flops = 1.0 + RANK * 2 * width / (width * width)  # (2dk + 2r(d + k)) / 2dk with d = k
    log("[3] inference: merged and unmerged LoRA over the base model")
    models = {
        "base": engine_model(arrays, lora=False),
        "merged": engine_model(arrays, lora=True, merged=True),
        "unmerged": engine_model(arrays, lora=True),
    }
    for m in models.values():
        m.eval()

    def forward(model):
        def run():
            with no_grad():
                model(x)

        return run

    backends = [("NumPy (loralab)", {k: forward(m) for k, m in models.items()})]
    if torch is not None:
        xt = torch.from_numpy(x)

        def tforward(model):
            def run():
                with torch.no_grad():
                    model(xt)

            return run

        backends.append(
            (
                "PyTorch eager",
                {
                    "base": tforward(torch_model(arrays, lora=False)),
                    "merged": tforward(torch_model(arrays, lora=False, merged=True)),
                    "unmerged": tforward(torch_model(arrays, lora=True)),
                },
            )
        )
    for label, sides in backends:
        times = time_alternating(sides, cfg.repeats, cfg.sample_seconds, CLOCKS[cfg.clock])
        row = {
            "backend": label,
            "base_ms": 1e3 * statistics.median(times["base"]),
            "merged_over_base": paired_ratio(times["merged"], times["base"]),
            "unmerged_over_base": paired_ratio(times["unmerged"], times["base"]),
            "flop_ratio": flops,
        }
        res.inference.append(row)
        res.checks.append(
            Check(
                "3",
                f"merged / base inference, {label}",
                row["merged_over_base"],
                "1.00 within noise (<= 1.05)",
                abs(row["merged_over_base"] - 1.0) <= 0.05,
            )
        )
        res.checks.append(
            Check(
                "3",
                f"unmerged / base inference, {label}",
                row["unmerged_over_base"],
                "report",
                None,
                f"FLOPs ratio {flops:.4f}",
            )
        )


def composed_lora(x, W0, b, A, B, s):
    """The LoRA layer from primitive ops: ``x @ W0.T + b + ((x @ A.T) @ B.T) * s``."""
    return x @ W0.T + b + ((x @ A.T) @ B.T) * s


def _fused_vs_composed(
    shape: tuple[int, ...], rng: np.random.Generator, cfg: BenchConfig
) -> dict[str, Any]:
    """Backward seconds of the fused op and of the composed ops, alternating, for x of ``shape``."""
    width, s, clock = shape[-1], ALPHA / RANK, CLOCKS[cfg.clock]
    bound = 1.0 / math.sqrt(width)

    def u(*sh):
        return rng.uniform(-bound, bound, sh).astype(np.float32)

    W0, b = Tensor(u(width, width)), Tensor(u(width))
    A, B = Tensor(u(RANK, width), True), Tensor(0.01 * u(width, RANK), True)
    x = Tensor(rng.standard_normal(shape).astype(np.float32), True)
    dy = rng.standard_normal(shape[:-1] + (width,)).astype(np.float32)
    forwards = {
        "fused": lambda: F.lora_linear(x, W0, b, A, B, s),
        "composed": lambda: composed_lora(x, W0, b, A, B, s),
    }

    def backward_seconds(name: str, calls: int) -> float:
        total = 0.0
        for _ in range(calls):
            y = forwards[name]()
            t0 = clock()
            y.backward(dy)
            total += clock() - t0
            x.grad = A.grad = B.grad = None
        return total / calls

    for name in forwards:  # warm-up
        backward_seconds(name, 1)
    t0 = time.perf_counter()
    backward_seconds("fused", 1)
    calls = max(1, int(cfg.sample_seconds / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {"fused": [], "composed": []}
    for i in range(cfg.repeats):
        for name in ("fused", "composed") if i % 2 == 0 else ("composed", "fused"):
            times[name].append(backward_seconds(name, calls))
    return {
        "shape": shape,
        "fused_ms": 1e3 * statistics.median(times["fused"]),
        "composed_ms": 1e3 * statistics.median(times["composed"]),
        "ratio": paired_ratio(times["fused"], times["composed"]),
    }


def bench_fused(res: Results, log: Callable[[str], None]) -> None:
    rng = np.random.default_rng(res.config.seed + 3)
    for shape in res.config.fused_shapes:
        log(f"[4] fused LoRA backward, x of shape {shape}")
        row = _fused_vs_composed(tuple(shape), rng, res.config)
        res.fused.append(row)
        res.checks.append(
            Check(
                "4",
                f"fused / composed backward, x {tuple(shape)}",
                row["ratio"],
                "<= 0.8",
                row["ratio"] <= 0.8,
            )
        )


# ----- output ---------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**20:.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _met(c: Check) -> str:
    return "" if c.met is None else ("yes" if c.met else "**no**")


def _command(cfg: BenchConfig) -> str:
    """The ``loralab bench`` command line that gives this configuration."""
    flags = " --quick" if cfg.quick else ""
    default_repeats = (BenchConfig.tiny() if cfg.quick else BenchConfig()).repeats
    flags += f" --repeats {cfg.repeats}" if cfg.repeats != default_repeats else ""
    flags += f" --threads {cfg.threads}" if cfg.threads else ""
    flags += f" --clock {cfg.clock}" if cfg.clock != "wall" else ""
    flags += f" --seed {cfg.seed}" if cfg.seed else ""
    return f"loralab bench{flags}"


def to_markdown(res: Results, figures: list[str]) -> str:
    """The results as the markdown that the docs' Benchmarks page inlines."""
    cfg = res.config
    out = [
        f"Measured by `{_command(cfg)}` "
        f"on {time.strftime('%Y-%m-%d')}; each ratio is the median of {cfg.repeats} paired, "
        "alternating repeats.",
        "",
        "### Machine",
        "",
        _table(["", ""], [[k, v] for k, v in res.machine.items()]),
        "",
        "### Summary",
        "",
        _table(
            ["section", "ratio", "measured", "target", "met"],
            [[c.section, c.name, f"{c.value:.3f}", c.target, _met(c)] for c in res.checks],
        ),
        "",
        f"### 1. Autograd overhead (LoRA r={RANK} training step, {N_LAYERS} x Linear(w, w), "
        f"batch {cfg.batch}, float32, Adam)",
        "",
    ]
    has_torch = any("torch_ms" in r for r in res.overhead)
    header = ["width", "loralab engine", "hand NumPy", "engine / hand"]
    if has_torch:
        header += ["PyTorch eager", "engine / torch", "hand / torch"]
    rows = []
    for r in res.overhead:
        row = [
            str(r["width"]),
            f"{r['engine_ms']:.3f} ms",
            f"{r['hand_ms']:.3f} ms",
            f"{r['engine_over_hand']:.3f}",
        ]
        if has_torch:
            row += [
                f"{r['torch_ms']:.3f} ms",
                f"{r['engine_over_torch']:.3f}",
                f"{r['hand_over_torch']:.3f}",
            ]
        rows.append(row)
    out += [_table(header, rows), ""]
    b = core_bounds(cfg.core_width, cfg.batch)
    out += [
        f"### 2. LoRA over full fine-tuning ({N_LAYERS} x Linear({cfg.core_width}, "
        f"{cfg.core_width}), batch {cfg.batch}, float32, Adam, r={RANK} on every Linear)",
        "",
        f"Bounds from the shapes: time {b['time']:.3f} (matmul FLOPs: LoRA skips dW, and the "
        f"first layer's dx), memory {b['memory']:.3f} = (weights + activations) / (4 x weights + "
        f"activations) with weights {_mib(b['weights_bytes'])} and activations "
        f"{_mib(b['activation_bytes'])}.",
        "",
        _table(
            [
                "backend",
                "full step",
                "LoRA step",
                "time ratio",
                "time bound",
                "full peak",
                "LoRA peak",
                "memory ratio",
                "memory bound",
                "ratio / bound",
                "memory measured by",
            ],
            [
                [
                    r["backend"],
                    f"{r['full_ms']:.2f} ms",
                    f"{r['lora_ms']:.2f} ms",
                    f"{r['time_ratio']:.3f}",
                    f"{r['time_bound']:.3f}",
                    _mib(r.get("full_peak")),
                    _mib(r.get("lora_peak")),
                    f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "n/a",
                    f"{r['memory_bound']:.3f}",
                    f"{r['memory_over_bound']:.3f}" if "memory_over_bound" in r else "n/a",
                    r.get("memory_method", "not measured"),
                ]
                for r in res.core
            ],
        ),
        "",
        f"### 3. Inference ({N_LAYERS} x Linear({cfg.core_width}, {cfg.core_width}), "
        f"batch {cfg.batch}, no gradient)",
        "",
        "Unmerged LoRA adds 2r(d + k) FLOPs per row to the base's 2dk, plus two more matmul "
        "calls and an addition per layer; merging folds ΔW into W0, so it costs nothing.",
        "",
        _table(
            ["backend", "base forward", "merged / base", "unmerged / base", "FLOPs ratio"],
            [
                [
                    r["backend"],
                    f"{r['base_ms']:.3f} ms",
                    f"{r['merged_over_base']:.3f}",
                    f"{r['unmerged_over_base']:.3f}",
                    f"{r['flop_ratio']:.4f}",
                ]
                for r in res.inference
            ],
        ),
        "",
        f"### 4. Fused LoRA op: backward over composed primitive ops (r={RANK}, in = out)",
        "",
        "Composed: `x @ W0.T + b + ((x @ A.T) @ B.T) * s` through the engine's MatMul, Transpose, "
        "Add and Mul; fused: `F.lora_linear` with the hand-derived backward. x requires a gradient "
        "(an inner layer); W0 and b are frozen. Both backwards skip dW0: the engine's MatMul "
        "forms no gradient for an input that does not need one. Both therefore spend most of "
        "their time in the same dx = dy W0 matmul, and the fused op saves only the elementwise "
        "passes of the composed graph (and, for a batch of sequences, the per-sequence dA and dB "
        "products summed afterwards), so the ratio stays near 1 for a 2-D x.",
        "",
        _table(
            ["x shape", "fused backward", "composed backward", "fused / composed"],
            [
                [
                    str(tuple(r["shape"])),
                    f"{r['fused_ms']:.3f} ms",
                    f"{r['composed_ms']:.3f} ms",
                    f"{r['ratio']:.3f}",
                ]
                for r in res.fused
            ],
        ),
        "",
    ]
    if res.notes:
        out += ["Notes:", ""] + [f"- {n}" for n in res.notes] + [""]
    out += [f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in figures]
    return "\n".join(out).rstrip() + "\n"


def write_figures(res: Results, directory: Path) -> list[str]:
    """PNG figures next to the results; [] (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        res.notes.append("matplotlib is not installed: no figures were drawn.")
        return []
    names = []
    widths = [r["width"] for r in res.overhead]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(
        widths, [r["engine_over_hand"] for r in res.overhead], "o-", label="engine / hand NumPy"
    )
    if any("engine_over_torch" in r for r in res.overhead):
        ax.plot(
            widths, [r["engine_over_torch"] for r in res.overhead], "s-", label="engine / PyTorch"
        )
        ax.plot(widths, [r["hand_over_torch"] for r in res.overhead], "^--", label="hand / PyTorch")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("width")
    ax.set_ylabel("step time ratio")
    ax.set_title("Autograd overhead: LoRA training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "overhead.png", dpi=110)
    plt.close(fig)
    names.append("overhead.png")

    checks = [c for c in res.checks if c.section in ("2", "3", "4")]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(checks) + 1.2))
    colors = ["tab:green" if c.met else "tab:red" if c.met is False else "tab:gray" for c in checks]
    ax.barh(range(len(checks)), [c.value for c in checks], color=colors)
    ax.set_yticks(range(len(checks)), [c.name for c in checks], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("ratio (green: target met, red: missed, gray: no target)")
    ax.set_title("LoRA vs full fine-tuning, inference, fused backward")
    fig.tight_layout()
    fig.savefig(directory / "ratios.png", dpi=110)
    plt.close(fig)
    names.append("ratios.png")
    return names


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the docs build reads it
    os.replace(tmp, path)


SECTIONS = {
    "overhead": lambda res, log: bench_overhead(res, log),
    "core": lambda res, log: bench_core(res, log),
    "inference": lambda res, log: bench_inference(res, log),
    "fused": lambda res, log: bench_fused(res, log),
}


def run_bench(
    config: BenchConfig,
    out: Path | str | None = DEFAULT_OUT,
    *,
    sections: tuple[str, ...] = tuple(SECTIONS),
    log: Callable[[str], None] = print,
) -> Results:
    """Run the suite (or some ``sections``), print the results and return them.

    Unless ``out`` is None, the markdown goes to ``out`` and the figures next to it (the
    figures only for the whole suite). PyTorch, when installed, runs with as many threads as
    NumPy's BLAS (``config.threads``, or NumPy's current count).
    """
    if config.clock not in CLOCKS:
        raise ValueError(f"run_bench: clock must be one of {list(CLOCKS)}, got {config.clock!r}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"run_bench: unknown sections {unknown}; known: {list(SECTIONS)}")
    out = None if out is None else Path(out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    with blas_threads(config.threads):
        torch = _torch()
        if torch is not None:
            torch.set_num_threads(numpy_threads())
        res = Results(config, machine_info())
        res.machine["clock"] = (
            "wall time (time.perf_counter)"
            if config.clock == "wall"
            else "CPU time of the process (time.process_time)"
        )
        for key, value in res.machine.items():
            log(f"{key}: {value}")
        for name in sections:
            SECTIONS[name](res, log)
    whole = tuple(sections) == tuple(SECTIONS)
    figures = write_figures(res, out.parent) if out is not None and whole else []
    text = to_markdown(res, figures)
    log("")
    log(text)
    if out is not None:
        _atomic_write_text(out, text)
        log(f"wrote {out}" + "".join(f" and {out.parent / f}" for f in figures))
    return res


def blas_threads(threads: int | None):
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
