"""Tests for loralab.params_report: the text of `loralab params` (the CLI's own tests run it end to end)."""

from loralab import counting
from loralab.params_report import format_params_report, format_presets, human_bytes


def test_human_bytes_switches_units_at_the_base():
    assert human_bytes(999) == "999 B"
    assert human_bytes(1000) == "1.00 kB"
    assert human_bytes(1023, binary=True) == "1,023 B"
    assert human_bytes(3 * 1024**2 // 2, binary=True) == "1.50 MiB"
    assert human_bytes(5 * 1000**6) == "5000.00 PB"  # the largest unit keeps growing


def test_report_states_the_estimate_it_formats():
    shape = counting.get_preset(next(iter(counting.load_presets())))
    est = counting.memory_estimate(shape, 8, "q,v", dtype="fp16", optimizer="adam")
    text = format_params_report(shape, est)
    assert text.splitlines()[0] == f"loralab params: {shape.name}"
    assert f"{est.trainable_params:,}" in text and f"{est.total_params:,}" in text
    assert f"{est.lora.total / est.full.total:.1%} of full fine-tuning's memory" in text


def test_presets_table_lists_every_preset_and_its_source():
    text = format_presets()
    for name, shape in counting.load_presets().items():
        assert any(line.startswith(name) for line in text.splitlines())
        assert f"  {name}: {shape.source}" in text
