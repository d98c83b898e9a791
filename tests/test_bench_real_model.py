"""Section 7 of the benchmark (a GPT-2-124M-shaped model): its bound and its output, not its speed."""

import math

import numpy as np
import pytest

from loralab.bench import BenchConfig, run_bench
from loralab.bench.sections.real_model import gpt2_config, real_model_bounds
from loralab.models.gpt2 import GPT2, GPT2Config


def test_the_bounds_count_the_weights_of_the_model_they_describe():
    shape = (2, 32, 4, 97, 16)
    model = GPT2(GPT2Config(gpt2_config(shape)))
    b = real_model_bounds(shape, batch=2, seq=8, r=4, itemsize=4)
    assert b["weights_bytes"] == sum(p.data.nbytes for p in model.parameters())
    assert b["lora_bytes"] == 2 * 4 * (32 + 96) * 4  # A (4, 32) and B (96, 4) per c_attn
    activations = 16 * (2 * (16 * 32 + 4 * 8) + 2 * 97) * 4
    assert b["activation_bytes"] == activations
    w, lo = b["weights_bytes"], b["lora_bytes"]
    assert math.isclose(b["memory"], (w + 4 * lo + activations) / (4 * w + activations))


def test_gpt2_124m_weights_are_124m_parameters():
    b = real_model_bounds((12, 768, 12, 50257, 1024), batch=4, seq=128)
    assert b["weights_bytes"] // 4 == 124_439_808  # GPT-2 small, as transformers counts it


def test_the_quick_section_reports_its_ratios(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "results.md"
    res = run_bench(BenchConfig.tiny(), out, sections=("real_model",), log=lambda s: None)
    assert "### 7. A real model" in out.read_text()
    (row,) = res.real_model
    assert row["time_ratio"] > 0 and row["loralab_s"] > 0 and row["hf_s"] > 0
    assert 0 < row["memory_ratio"] < 1  # LoRA keeps less than full fine-tuning
    assert row["lora_peak"] < row["full_peak"]
    names = [c.name for c in res.checks]
    assert any(n.startswith("loralab / (transformers + PEFT)") for n in names)
    assert any(n.startswith("LoRA / full peak memory") for n in names)
    assert np.isfinite(row["memory_over_bound"])
