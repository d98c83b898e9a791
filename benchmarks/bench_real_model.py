"""LoRA on a GPT-2-124M-shaped model: loralab's NumPy step against transformers + PEFT, and memory.

Section 7 of `loralab bench` on its own (`loralab.bench.sections.real_model` says what is
measured): 12 layers, d = 768, vocabulary 50257, LoRA r = 8 on c_attn, batch 4 x 128, Adam, one
thread each; targets: loralab / (transformers + PEFT) <= 1.0, LoRA / full peak memory within
1.10 x the bound from the shapes. A step takes seconds: at most 5 repeats.

    python benchmarks/bench_real_model.py [--repeats N] [--threads N] [--clock wall|cpu]
"""

from loralab.bench import run_sections_main

if __name__ == "__main__":
    run_sections_main(("real_model",), __doc__.splitlines()[0], repeats=5)
