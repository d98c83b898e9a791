"""Section 5 of `loralab bench` alone: one base serving K adapters in one mixed batch.

A batch of 256 rows spread round-robin over K = 1, 4, 16, 64, 256 adapters (r = 8 on four
Linear(1024, 1024) layers, and one batch mixing ranks 4, 8, 16, 32), served as a mixed batch
(rows as they arrive, and grouped by adapter once before the model), by a loop over adapters,
by merge-swap and by PEFT's mixed-batch forward; each ratio beside the FLOP bound
1 + r (d + k) / (d k) and the floor measured alone; then the profile of one layer, part by
part, the way the grouped op ran before issue 21 and now. Prints; writes nothing.

    python benchmarks/bench_mixed_batch.py [--repeats N] [--threads N] [--clock wall|cpu]
"""

from loralab.bench import run_sections_main

if __name__ == "__main__":
    run_sections_main(("mixed_batch",), __doc__.splitlines()[0], repeats=21)
