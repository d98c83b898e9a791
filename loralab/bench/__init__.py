"""The benchmark suite behind ``loralab bench``: every figure is a ratio measured side by side.

Each comparison runs its sides alternately in one process (A, B, B, A, A, B, ...) and reports the
median over the repeats of the paired ratio A_i / B_i, so a slow moment of a noisy machine hits
both sides alike. The suite measures, on MLPs of four Linear layers, batch 128, float32, Adam:

1. autograd overhead: a LoRA training step through loralab's engine over the same step written
   by hand in plain NumPy (the fused op's ``lora_forward``/``lora_backward``, no graph), and
   over PyTorch eager on the CPU with the same number of threads;
2. LoRA (r=8 on every Linear) over full fine-tuning at width 1024: step time and peak memory,
   next to the bounds computed from the shapes;
3. inference: merged LoRA over the base model, and unmerged over base;
4. the fused LoRA op's backward over the same computation through composed primitive ops.

Peak memory is ``tracemalloc``'s peak for NumPy (NumPy reports its buffers to it) and the growth
of the resident set's high-water mark in a child process for PyTorch (tracemalloc cannot see
torch's allocations). torch, matplotlib and threadpoolctl are optional.

The rooms: `config` (what a run measures and found), `machine`, `timing` (alternating sides,
paired ratios), `memory` (and its child process `torch_memory`), `mlp` (the benchmarked model:
engine, hand-written NumPy, PyTorch), `sections` (one module per section: measurement and its
Markdown), `report` (the whole Markdown), `figures`, `suite` (`run_bench`).
"""

from loralab.bench.config import DEFAULT_OUT, BenchConfig, Check, Results
from loralab.bench.machine import machine_info
from loralab.bench.suite import run_bench, run_sections_main
from loralab.bench.timing import CLOCKS

__all__ = [
    "BenchConfig",
    "Check",
    "Results",
    "run_bench",
    "run_sections_main",
    "machine_info",
    "DEFAULT_OUT",
    "CLOCKS",
]
