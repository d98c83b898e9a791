"""QLoRA's cost: the frozen base's memory in 4 bits, and a QLoRA step over a LoRA step on float32.

Section 6 of `loralab bench` on its own (`loralab.bench.sections.qlora` says what is measured):
four Linear(1024, 1024) layers, batch 128, LoRA r = 8 on every Linear, NF4 with double
quantization; targets: base memory <= 0.145 of float32, step time <= 1.5 x LoRA's.

    python benchmarks/bench_quant.py [--repeats N] [--threads N] [--clock wall|cpu]
"""

from loralab.bench import run_sections_main

if __name__ == "__main__":
    run_sections_main(("qlora",), __doc__.splitlines()[0], repeats=15)
