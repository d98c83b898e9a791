"""The core benchmark: LoRA (r=8 on every Linear) over full fine-tuning (section 2 of `loralab bench`).

Four Linear(1024, 1024) layers, batch 128, float32, Adam: training-step time and tracemalloc's
peak memory of LoRA over full fine-tuning, measured side by side, printed with the bounds
computed from the shapes (time about 2/3: no dW matmul; memory about (weights + activations) /
(4 x weights + activations): no gradient or Adam state for W0). Targets: time ratio <= 0.75,
memory ratio <= 1.10 x its bound. PyTorch's columns appear when torch is installed.

    python benchmarks/bench_core.py [--repeats N] [--threads N] [--clock wall|cpu]
"""

import argparse
import dataclasses

from loralab import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--clock", choices=tuple(bench.CLOCKS), default="wall")
    args = parser.parse_args()
    config = dataclasses.replace(
        bench.BenchConfig(), repeats=args.repeats, threads=args.threads, clock=args.clock
    )
    bench.run_bench(config, None, sections=("core",))


if __name__ == "__main__":
    main()
