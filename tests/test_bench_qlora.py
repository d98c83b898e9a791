"""Section 6 of the benchmark (QLoRA): its output and its memory ratio, not its speed."""

import numpy as np

from loralab.bench import BenchConfig, run_bench
from loralab.bench.sections.qlora import bases, build


def test_both_sides_start_from_the_same_model():
    lora, qlora = build(32, False), build(32, True)
    assert len(bases(qlora)) == 4 and not bases(lora)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    gap = np.abs(qlora(x).data - lora(x).data).max()
    assert 0 < gap < 0.2 * np.abs(lora(x).data).max()  # the 4-bit rounding, nothing more


def test_the_quick_section_reports_its_ratios(tmp_path):
    out = tmp_path / "results.md"
    res = run_bench(BenchConfig.tiny(), out, sections=("qlora",), log=lambda s: None)
    text = out.read_text()
    assert "### 6. QLoRA" in text
    (row,) = res.qlora
    # 32 x 32 weights in blocks of 64: 4 bits + the double-quantized constants, as the formula
    assert 4 < row["bits"] < 4.5
    memory = next(c for c in res.checks if c.name.startswith("4-bit / float32"))
    assert memory.value == row["memory"] == row["bits"] / 32
    assert any(c.name.startswith("QLoRA / LoRA training step") and c.value > 0 for c in res.checks)
