"""Tests for `loralab params` and the CLI skeleton (loralab.cli)."""

import json
import subprocess
import sys

import pytest

from loralab import counting
from loralab.cli import main


def run_json(capsys, *argv):
    assert main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("r", "expected"), [(1, 4_718_592), (4, 18_874_368), (8, 37_748_736)])
def test_gpt3_paper_numbers(capsys, r, expected):
    out = run_json(capsys, "--preset", "gpt3-175b", "--r", str(r), "--targets", "q,v")
    assert out["trainable_params"] == expected
    assert out["adapter_bytes"] == 2 * expected  # fp16 by default


def test_human_output(capsys):
    assert main(["params", "--preset", "gpt3-175b", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "18,874,368" in out
    assert "37,748,736 B" in out and "36.00 MiB" in out and "37.75 MB" in out
    for row in ("weights", "gradients", "optimizer states", "full fine-tuning", "LoRA"):
        assert row in out
    assert "Activations are not included" in out


def test_json_keys_match_counting(capsys):
    out = run_json(
        capsys,
        "--preset",
        "llama2-70b",
        "--r",
        "16",
        "--targets",
        "q,k,v,o",
        "--dtype",
        "bf16",
        "--optimizer",
        "sgd",
    )
    expected = counting.memory_estimate(
        counting.get_preset("llama2-70b"), 16, ("q", "k", "v", "o"), dtype="bf16", optimizer="sgd"
    ).to_dict()
    for key in (
        "trainable_params",
        "total_params",
        "trainable_fraction",
        "adapter_bytes",
        "memory_full_bytes",
        "memory_lora_bytes",
        "memory_breakdown_bytes",
    ):
        assert out[key] == expected[key]
    assert out["model"] == "llama2-70b"
    assert out["memory_breakdown_bytes"]["full"]["optimizer_states"] == 0


def test_explicit_shape_hand_computed(capsys):
    out = run_json(
        capsys,
        "--d-model",
        "8",
        "--layers",
        "2",
        "--d-ff",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--vocab",
        "10",
        "--r",
        "2",
        "--targets",
        "q,v",
    )
    # Per layer: q (8, 8) -> 2 * (8 + 8) = 32; v (4, 8) -> 2 * (8 + 4) = 24; two layers.
    assert out["trainable_params"] == 2 * (32 + 24)


def test_gated_flag_allows_gate(capsys):
    out = run_json(
        capsys,
        "--d-model",
        "8",
        "--layers",
        "1",
        "--d-ff",
        "16",
        "--heads",
        "2",
        "--vocab",
        "4",
        "--gated-mlp",
        "--r",
        "1",
        "--targets",
        "gate",
    )
    assert out["trainable_params"] == 1 * (16 + 8)


def test_list_presets(capsys):
    assert main(["params", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in counting.load_presets():
        assert name in out
    assert "Brown et al. 2020" in out


def test_list_presets_names_the_hub_checkpoint_of_each_real_model(capsys):
    assert main(["params", "--list-presets"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert rows["gpt2"].endswith("openai-community/gpt2")
    assert rows["llama3-8b"].endswith("meta-llama/Meta-Llama-3-8B")
    assert rows["gpt3-175b"].endswith("-")  # never released
    assert counting.get_preset("llama2-7b").hf_id == "meta-llama/Llama-2-7b-hf"


def test_list_presets_json(capsys):
    assert main(["params", "--list-presets", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(counting.load_presets())
    assert out["gpt2"]["num_params"] == counting.get_preset("gpt2").num_params()
    assert out["gpt2"]["hf_id"] == "openai-community/gpt2"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "gpt5"], "known presets: gpt2, gpt2-medium, gpt2-large, gpt3-175b"),
        (["--preset", "gpt2", "--r", "0"], "--r must be a positive integer, got 0"),
        (["--preset", "gpt2", "--r", "-4"], "--r must be a positive integer, got -4"),
        (["--preset", "gpt2", "--r", "two"], "invalid int value: 'two'"),
        (
            ["--preset", "gpt2", "--targets", "q,w_v"],
            "valid targets for gpt2: q, k, v, o, up, down",
        ),
        (["--preset", "gpt2", "--targets", "gate"], "gate needs a gated MLP"),
        (["--d-model", "8", "--layers", "2"], "missing --d-ff, --heads"),
        (["--preset", "gpt2", "--r", "769"], "r=769 exceeds d_model=768"),
        (
            ["--d-model", "8", "--layers", "1", "--d-ff", "16", "--heads", "2", "--r", "9"],
            "r=9 exceeds d_model=8",
        ),
        ([], "give --preset NAME or a full shape"),
        (["--preset", "gpt2", "--heads", "4"], "not both"),
        (["--preset", "gpt2", "--dtype", "int8"], "invalid choice: 'int8'"),
        (
            ["--d-model", "10", "--layers", "1", "--d-ff", "4", "--heads", "3", "--vocab", "5"],
            "d_model=10 must be divisible by n_heads=3",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["params", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("loralab params: error: ")
    assert message in lines[0]


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "params" in capsys.readouterr().err


def test_unknown_subcommand(capsys):
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_exits_0(capsys):
    assert main(["params", "--help"]) == 0
    assert "--list-presets" in capsys.readouterr().out


def test_python_dash_m_loralab():
    proc = subprocess.run(
        [sys.executable, "-m", "loralab", "params", "--preset", "gpt2", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_params"] == counting.get_preset("gpt2").num_params()


SHAPE = ["--d-model", "8", "--layers", "2", "--d-ff", "32", "--heads", "2", "--kv-heads", "1"]


def test_explicit_shape_without_vocab_excludes_embeddings(capsys):
    out = run_json(capsys, *SHAPE, "--r", "2", "--targets", "q,v")
    with_vocab = run_json(capsys, *SHAPE, "--vocab", "10", "--r", "2", "--targets", "q,v")
    assert out["trainable_params"] == with_vocab["trainable_params"]
    shape = counting.TransformerShape(d_model=8, n_layers=2, d_ff=32, n_heads=2, n_kv_heads=1)
    assert out["total_params"] == shape.num_params()
    assert with_vocab["total_params"] - out["total_params"] == 2 * 10 * 8  # embedding + head
    assert out["embeddings_included"] is False
    assert with_vocab["embeddings_included"] is True


def test_human_output_says_embeddings_are_excluded_without_vocab(capsys):
    assert main(["params", *SHAPE, "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "vocab not given" in out
    assert "totals exclude the embeddings" in out
    assert main(["params", *SHAPE, "--vocab", "10", "--r", "2"]) == 0
    assert "exclude the embeddings" not in capsys.readouterr().out


def test_rank_equal_to_d_model_is_allowed(capsys):
    out = run_json(capsys, *SHAPE, "--r", "8", "--targets", "q")
    assert out["trainable_params"] == 2 * 8 * (8 + 8)


def test_counting_refuses_a_rank_above_d_model():
    shape = counting.get_preset("gpt2")
    with pytest.raises(ValueError, match="r=769 exceeds d_model=768"):
        counting.lora_params_for_model(shape, 769)
