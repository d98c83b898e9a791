"""The core benchmark: LoRA (r=8 on every Linear) over full fine-tuning (section 2 of `loralab bench`).

Four Linear(1024, 1024) layers, batch 128, float32, Adam: training-step time and tracemalloc's
peak memory of LoRA over full fine-tuning, measured side by side, printed with the bounds
computed from the shapes (time about 2/3: no dW matmul; memory about (weights + activations) /
(4 x weights + activations): no gradient or Adam state for W0). Targets: time ratio <= 0.75,
memory ratio <= 1.10 x its bound. PyTorch's columns appear when torch is installed.

    python benchmarks/bench_core.py [--repeats N] [--threads N] [--clock wall|cpu]
"""

from loralab.bench import run_sections_main

if __name__ == "__main__":
    run_sections_main(("core",), __doc__.splitlines()[0], repeats=21)
