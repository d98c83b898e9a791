"""Numbers stated in the docs guides, recomputed by the package (small and fast).

Each test reads the sentence from its guide (whitespace normalised) and computes the number the
sentence states with loralab itself, so that a guide and the code cannot drift apart unnoticed.
The QLoRA guide's bits per parameter and the math guide's GPT-3 count are checked in
``tests/test_docs.py``; these are the rest.
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction
from pathlib import Path

import numpy as np

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"


def guide(name: str) -> str:
    """The guide's text with every run of whitespace (line breaks included) made one space."""
    return " ".join((GUIDES / name).read_text(encoding="utf-8").split())


def test_math_guide_scalings_and_defaults_are_the_layers():
    """'With alpha = 8: s = 8 at r = 1, s = 1 at r = 8, s = 1/8 at r = 64'; PEFT's defaults."""
    from loralab.lora import LoraConfig, LoRALinear
    from loralab.nn import Linear

    text = guide("math.md")
    config = LoraConfig()
    assert (config.r, config.lora_alpha) == (8, 8)
    assert f"`LoraConfig()` has $r = {config.r}$ and `lora_alpha` $= {config.lora_alpha}$" in text
    said = []
    for r in (1, 8, 64):
        layer = LoRALinear(Linear(64, 64, seed=0), r=r, seed=0)  # the default alpha
        s = Fraction(layer.scaling).limit_denominator(1000)
        assert s == Fraction(config.lora_alpha, r)
        said.append(f"$s = {s}$ at $r = {r}$")
    assert f"With $\\alpha = {config.lora_alpha}$: " + ", ".join(said) in text


def test_math_guide_kaiming_bound_is_one_over_sqrt_k():
    """'gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), which gives 1/sqrt(k)': the bound A is drawn in."""
    from loralab.lora import LoRALinear
    from loralab.nn import Linear

    text = guide("math.md")
    assert "\\sqrt{2 / (1 + a^2)} = \\sqrt{1/3}" in text and "which gives $1/\\sqrt{k}$" in text
    gain = math.sqrt(2 / (1 + math.sqrt(5) ** 2))
    assert math.isclose(gain, math.sqrt(1 / 3))
    k = 400
    assert math.isclose(gain * math.sqrt(3 / k), 1 / math.sqrt(k))
    A = LoRALinear(Linear(k, 32, seed=0, dtype=np.float64), r=16, seed=0).lora_A.data
    assert np.abs(A).max() <= 1 / math.sqrt(k)
    assert np.abs(A).max() > 0.95 / math.sqrt(k)  # 6,400 uniform draws reach near the bound


def test_qlora_guide_levels_offset_and_block_size():
    """NF4's delta = 0.9677083 = 929/960 to seven digits; int4's k/7; 64 per block, 0.5 bits."""
    from loralab.quant import (
        INT4_VALUES,
        INT8_VALUES,
        NF4_VALUES,
        bits_per_parameter,
        normal_float_levels,
        quantize,
    )

    text = guide("qlora.md")
    offset = inspect.signature(normal_float_levels).parameters["offset"].default
    assert f"$\\delta = {offset}$" in text
    assert 1 - Fraction(1, 2) * (Fraction(1, 32) + Fraction(1, 30)) == Fraction(929, 960)
    assert round(929 / 960, 7) == offset  # "to the seven digits given"
    assert np.allclose(NF4_VALUES, normal_float_levels(), atol=1e-7)
    assert len(NF4_VALUES) == 16 and NF4_VALUES.min() == -1 and NF4_VALUES.max() == 1
    assert np.count_nonzero(NF4_VALUES > 0) == 8 and np.count_nonzero(NF4_VALUES < 0) == 7

    assert "$k/7$ for $k = -7 \\dots 7$" in text and "$k/127$" in text
    assert np.allclose(np.sort(INT4_VALUES), np.arange(-7, 8) / 7)
    assert np.allclose(np.sort(INT8_VALUES), np.arange(-127, 128) / 127)

    block = inspect.signature(quantize).parameters["block_size"].default
    assert f"blocks of `block_size` values ({block} by default)" in text
    assert f"its own {block - 1} neighbours" in text
    assert f"$32/{block} = {32 / block:g}$ bits per parameter on top of the 4" in text
    assert bits_per_parameter("nf4") == 4 + 32 / block


def test_embedding_guide_parameter_count_comment():
    """'4 * (96 + 64) for tok_emb, 4 * (64 + 64) for each of 4 Linear layers', run as written."""
    from loralab.lora import count_parameters, inject_lora
    from loralab.models import GPT

    text = guide("embedding_lora.md")
    assert "# 4 * (96 + 64) for tok_emb, 4 * (64 + 64) for each of 4 Linear layers" in text
    gpt = GPT(96, context_length=32, d_model=64, n_layers=2, n_heads=4, seed=0)
    inject_lora(gpt, ["tok_emb", "q", "v"], r=4, alpha=8, seed=0)
    assert count_parameters(gpt)[0] == 4 * (96 + 64) + 4 * 4 * (64 + 64)


def test_distributed_guide_ring_and_zero_arithmetic():
    """A ring sends 2(N-1)/N of the payload; 16 bytes per parameter; ZeRO-3 sends 1.5x DDP."""
    from loralab.counting import ring_allreduce_bytes

    text = guide("distributed.md")
    assert "sends \\(\\frac{2(N-1)}{N}\\) times the payload per rank" in text
    assert "each trained parameter costs 16 bytes" in text and "1.5 times DDP's bytes" in text
    psi = 10**9
    for n in (2, 8, 64):
        ddp = ring_allreduce_bytes(2 * psi, n)  # fp16 gradients
        assert ddp == 2 * (n - 1) * 2 * psi // n
        gather = (n - 1) * 2 * psi / n  # one all-gather (or reduce-scatter) of 2 psi bytes
        assert math.isclose((2 * gather + gather) / ddp, 1.5)  # weights twice, gradients once
    assert 2 + 2 + 4 + 4 + 4 == 16  # fp16 weight and gradient; fp32 master, m and v


def test_variants_guide_loraplus_default_and_rslora_factor():
    """'loraplus_param_groups defaults to 16'; 'its 16-fold smaller s' from r = 4 to r = 64."""
    from loralab.lora import LoRALinear, loraplus_param_groups
    from loralab.nn import Linear

    text = guide("variants.md")
    ratio = inspect.signature(loraplus_param_groups).parameters["loraplus_lr_ratio"].default
    assert f"`loraplus_param_groups` defaults to {ratio:g}." in text

    def scaling(r, rs):
        return LoRALinear(Linear(64, 64, seed=0), r=r, use_rslora=rs, seed=0).scaling

    fold = scaling(4, False) / scaling(64, False)
    assert (
        "from \\(r = 4\\) to \\(r = 64\\)" in text
        and f"its {fold:.0f}-fold smaller \\(s\\)" in text
    )
    assert math.isclose(fold, 16) and math.isclose(scaling(4, True) / scaling(64, True), 4)


def test_conventions_guide_shapes():
    """'layer.lora_A.shape, layer.lora_B.shape  # (4, 64), (32, 4)', run as written."""
    from loralab.lora import LoRALinear
    from loralab.nn import Linear

    text = guide("conventions.md")
    assert "layer = LoRALinear(Linear(64, 32, seed=0), r=4, alpha=8, seed=1)" in text
    assert "layer.lora_A.shape, layer.lora_B.shape # (4, 64), (32, 4)" in text
    layer = LoRALinear(Linear(64, 32, seed=0), r=4, alpha=8, seed=1)
    assert (layer.lora_A.shape, layer.lora_B.shape) == ((4, 64), (32, 4))


def test_instructors_guide_grading_defaults(capsys):
    """'--timeout S ... (default 120', '--time-limit S ... (default 5', '--memory-limit MB ... (default 8192'."""
    import contextlib

    from loralab.exercises._feedback import TIME_LIMIT
    from loralab.exercises.grade import MEMORY_LIMIT_MB, main

    with contextlib.suppress(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    cell = int(help_text.split("seconds per cell (default ")[1].split(")")[0])
    text = guide("instructors.md")
    assert f"`--timeout S`, the seconds allowed per cell (default {cell};" in text
    assert f"(default {TIME_LIMIT:g}: an endless loop" in text
    assert f"the memory one student's kernel may map (default {MEMORY_LIMIT_MB};" in text
    assert f"default {MEMORY_LIMIT_MB}" in help_text
