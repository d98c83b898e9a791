"""``loralab params --quant nf4 [--double-quant]``: QLoRA's memory arithmetic for a real model."""

import json

import pytest

from loralab.cli import main

# LLaMA 65B (Touvron et al. 2023, Table 2), the QLoRA paper's example
LLAMA_65B = ["--d-model", "8192", "--layers", "80", "--d-ff", "22016", "--heads", "64"]
LLAMA_65B += ["--vocab", "32000", "--gated-mlp"]


def run_json(capsys, *args):
    assert main(["params", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_double_quant_gives_the_papers_4127_bits(capsys):
    report = run_json(capsys, *LLAMA_65B, "--quant", "nf4", "--double-quant")
    qlora = report["qlora"]
    n = report["total_params"]
    assert round(n / 1e9) == 65
    assert qlora["bits_per_parameter"] == 4 + 8 / 64 + 32 / (64 * 256)
    assert qlora["base_weights_bytes"] == round(n * qlora["bits_per_parameter"] / 8)
    assert qlora["base_weights_bytes_unquantized"] == 2 * n  # fp16
    lora = report["memory_breakdown_bytes"]["lora"]
    adapter = lora["total"] - 2 * n
    assert qlora["memory_qlora_bytes"] == qlora["base_weights_bytes"] + adapter


def test_without_double_quant_the_constants_cost_half_a_bit(capsys):
    qlora = run_json(capsys, "--preset", "llama2-7b", "--quant", "nf4")["qlora"]
    assert qlora["bits_per_parameter"] == 4.5 and qlora["double_quant"] is False


def test_the_text_report_says_it(capsys):
    from loralab.params_report import human_bytes

    qlora = run_json(capsys, *LLAMA_65B, "--quant", "nf4", "--double-quant")["qlora"]
    assert main(["params", *LLAMA_65B, "--quant", "nf4", "--double-quant"]) == 0
    out = capsys.readouterr().out
    assert "nf4 with double quantization, 4.127 bits per parameter" in out
    assert f"base weights {human_bytes(qlora['base_weights_bytes'])} instead of" in out


def test_no_quant_no_qlora_entry(capsys):
    assert "qlora" not in run_json(capsys, "--preset", "gpt2")


@pytest.mark.parametrize("args", [["--double-quant"], ["--quant", "nf3"]])
def test_bad_flags_are_refused(capsys, args):
    assert main(["params", "--preset", "gpt2", *args]) == 2
    assert "quant" in capsys.readouterr().err


def test_the_llama_65b_preset_gives_the_papers_arithmetic(capsys):
    """The preset differs from the explicit shape above only by its RMSNorm (one vector per norm,
    where the explicit shape's LayerNorm has two): 2 x 80 + 1 norms of 8192."""
    explicit = run_json(capsys, *LLAMA_65B, "--quant", "nf4", "--double-quant")
    preset = run_json(capsys, "--preset", "llama-65b", "--quant", "nf4", "--double-quant")
    n = preset["total_params"]
    assert explicit["total_params"] - n == (2 * 80 + 1) * 8192
    bits = preset["qlora"]["bits_per_parameter"]
    assert preset["qlora"]["base_weights_bytes"] == round(n * bits / 8)
    assert round(preset["qlora"]["base_weights_bytes"] / 1e9, 1) == 33.7  # 65.3e9 x 4.127 / 8
