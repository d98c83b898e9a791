"""Section 6 of the benchmark (QLoRA): its output and its memory ratio, not its speed."""

import math

import numpy as np
import pytest

from loralab.bench import BenchConfig, run_bench
from loralab.bench.sections.qlora import bases, build
from loralab.quant import DOUBLE_QUANT_BLOCK_SIZE, bits_per_parameter


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
    # The large-tensor limit 4 + 8/64 + 32/(64*256), plus what one small tensor pays on top: a
    # whole float32 scale for its ceil(n_blocks / 256) groups of constants (the formula counts
    # n_blocks / 256 of one) and the float32 mean of the constants.
    n = BenchConfig.tiny().core_width ** 2
    n_blocks = math.ceil(n / 64)
    groups = math.ceil(n_blocks / DOUBLE_QUANT_BLOCK_SIZE)
    overhead = (32 * (groups - n_blocks / DOUBLE_QUANT_BLOCK_SIZE) + 32) / n
    expected = bits_per_parameter("nf4", block_size=64, double_quant=True) + overhead
    assert row["bits"] == pytest.approx(expected, rel=1e-12)
    memory = next(c for c in res.checks if c.name.startswith("4-bit / float32"))
    assert memory.value == row["memory"] == pytest.approx(expected / 32, rel=1e-12)
    assert any(c.name.startswith("QLoRA / LoRA training step") and c.value > 0 for c in res.checks)
