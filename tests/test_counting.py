"""Tests for loralab.counting: LoRA parameter counts and training-memory estimates."""

import json

import numpy as np
import pytest

from loralab.counting import (
    DTYPE_BYTES,
    TARGETS,
    TransformerShape,
    full_param_count,
    get_preset,
    load_presets,
    lora_param_count,
    lora_params_by_target,
    lora_params_for_model,
    memory_estimate,
    ring_allreduce_bytes,
)

PRESET_NAMES = [
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt3-175b",
    "llama-65b",
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "mistral-7b",
]


@pytest.mark.parametrize(("d", "k", "r"), [(1, 1, 1), (16, 4, 2), (3, 7, 5)])
def test_lora_param_count_is_size_of_B_plus_A(d, k, r):
    B, A = np.zeros((d, r)), np.zeros((r, k))
    assert lora_param_count(d, k, r) == B.size + A.size
    assert full_param_count(d, k) == np.zeros((d, k)).size


@pytest.mark.parametrize("r", [0, -3])
def test_nonpositive_rank_is_a_value_error(r):
    with pytest.raises(
        ValueError, match=f"^lora_param_count: r must be a positive integer, got {r}$"
    ):
        lora_param_count(8, 8, r)
    with pytest.raises(
        ValueError, match=f"lora_params_by_target: r must be a positive integer, got {r}"
    ):
        lora_params_for_model(get_preset("gpt2"), r)


@pytest.mark.parametrize("r", [2.5, True, "4"])
def test_non_integer_rank_is_a_type_error(r):
    with pytest.raises(TypeError, match="^lora_param_count: r must be a positive integer"):
        lora_param_count(8, 8, r)
    with pytest.raises(TypeError, match="r must be a positive integer"):
        memory_estimate(get_preset("gpt2"), r)


def test_full_param_count_and_ring_allreduce_check_their_arguments():
    assert full_param_count(np.int64(3), 4) == 12
    with pytest.raises(ValueError, match="^full_param_count: k must be a positive integer, got 0$"):
        full_param_count(3, 0)
    with pytest.raises(TypeError, match="^full_param_count: d must be a positive integer, got 3.0"):
        full_param_count(3.0, 4)
    assert ring_allreduce_bytes(0, 2) == 0
    for kwargs, error, message in [
        ({"world_size": 0}, ValueError, "world_size must be a positive integer, got 0"),
        ({"world_size": 2.0}, TypeError, "world_size must be a positive integer, got 2.0"),
        ({"payload_bytes": -8}, ValueError, "payload_bytes must be an integer >= 0, got -8"),
        ({"payload_bytes": 8.5}, TypeError, "payload_bytes must be an integer >= 0, got 8.5"),
    ]:
        with pytest.raises(error, match=f"^ring_allreduce_bytes: {message}"):
            ring_allreduce_bytes(**{"payload_bytes": 1000, "world_size": 4, **kwargs})


def test_numpy_integers_are_accepted():
    assert lora_param_count(np.int64(4), np.int32(4), np.int64(2)) == 16


# The LoRA paper (Hu et al. 2021), GPT-3 175B with W_q and W_v adapted: Table 4 and Section 4.2.
@pytest.mark.parametrize(("r", "expected"), [(1, 4_718_592), (4, 18_874_368), (8, 37_748_736)])
def test_gpt3_175b_matches_the_lora_paper(r, expected):
    assert lora_params_for_model(get_preset("gpt3-175b"), r, targets=("q", "v")) == expected


def test_gpt3_adapter_checkpoint_is_36_mib_in_fp16():
    est = memory_estimate(get_preset("gpt3-175b"), 4, ("q", "v"), dtype="fp16")
    assert est.adapter_bytes == 18_874_368 * 2 == 36 * 2**20


def test_gpt3_lora_memory_is_about_the_papers_350_gb():
    # The paper: with LoRA, training GPT-3 175B needs 350 GB (the fp16 weights) instead of 1.2 TB.
    est = memory_estimate(get_preset("gpt3-175b"), 4, ("q", "v"), dtype="fp16", optimizer="adam")
    assert est.lora.total == pytest.approx(350e9, rel=0.01)


def test_hand_computed_small_model():
    # d_model 8, 2 heads -> head_dim 4; 1 kv head -> kv_dim 4. r = 2, targets q and v.
    shape = TransformerShape(d_model=8, n_layers=2, d_ff=32, n_heads=2, n_kv_heads=1, vocab_size=10)
    q_per_layer = 2 * (8 + 8)  # W0 of q is (8, 8): A (2, 8) + B (8, 2) = 32
    v_per_layer = 2 * (8 + 4)  # W0 of v is (4, 8): A (2, 8) + B (4, 2) = 24
    assert lora_params_by_target(shape, 2, ("q", "v")) == {
        "q": 2 * q_per_layer,
        "v": 2 * v_per_layer,
    }
    assert lora_params_for_model(shape, 2, ("q", "v")) == 2 * (32 + 24) == 112


def test_hand_computed_total_params_gpt_style():
    shape = TransformerShape(
        d_model=8,
        n_layers=2,
        d_ff=32,
        n_heads=2,
        vocab_size=10,
        context_length=4,
        learned_positions=True,
        tied_embeddings=True,
        bias=True,
        norm="layernorm",
    )
    attention = 4 * (8 * 8 + 8)  # q, k, v, o with biases
    mlp = (32 * 8 + 32) + (8 * 32 + 8)  # up and down with biases
    norms = 2 * (8 + 8)  # two LayerNorms, weight and bias
    embeddings = 10 * 8 + 4 * 8  # tokens (tied with the head) and learned positions
    assert shape.num_params() == embeddings + 2 * (attention + mlp + norms) + (8 + 8)


def test_hand_computed_total_params_llama_style():
    shape = TransformerShape(
        d_model=8,
        n_layers=3,
        d_ff=12,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=10,
        gated_mlp=True,
        norm="rmsnorm",
    )
    attention = 8 * 8 + 4 * 8 + 4 * 8 + 8 * 8  # kv_dim = 2 * (8 / 4) = 4
    mlp = 3 * 12 * 8  # gate, up, down
    norms = 2 * 8
    assert shape.num_params() == 2 * 10 * 8 + 3 * (attention + mlp + norms) + 8


def test_gqa_shapes_of_k_and_v():
    llama70 = get_preset("llama2-70b")
    assert (llama70.n_kv_heads, llama70.head_dim, llama70.kv_dim) == (8, 128, 1024)
    shapes = llama70.linear_shapes()
    assert shapes["k"] == shapes["v"] == (1024, 8192)
    assert shapes["q"] == shapes["o"] == (8192, 8192)
    assert lora_params_for_model(llama70, 8, ("k",)) == 80 * 8 * (8192 + 1024)
    for name in ("llama3-8b", "mistral-7b"):
        assert get_preset(name).linear_shapes()["v"] == (1024, 4096)
    assert get_preset("llama2-7b").kv_dim == 4096


def test_all_targets_of_a_gated_model():
    shape = get_preset("llama3-8b")
    by_target = lora_params_by_target(shape, 16, TARGETS)
    assert list(by_target) == list(TARGETS)
    assert by_target["gate"] == by_target["up"] == by_target["down"] == 32 * 16 * (4096 + 14336)
    assert sum(by_target.values()) == lora_params_for_model(shape, 16, "q,k,v,o,gate,up,down")


def test_gate_on_a_plain_mlp_lists_valid_targets():
    with pytest.raises(ValueError, match=r"valid targets for gpt2: q, k, v, o, up, down"):
        lora_params_for_model(get_preset("gpt2"), 4, ("q", "gate"))


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match=r"unknown \['w_q'\]"):
        lora_params_for_model(get_preset("llama2-7b"), 4, ("q", "w_q"))


@pytest.mark.parametrize("targets", [(), ("q", "q")])
def test_empty_or_repeated_targets(targets):
    with pytest.raises(ValueError, match="targets="):
        lora_params_for_model(get_preset("gpt2"), 4, targets)


def test_presets_load_from_package_data():
    presets = load_presets()
    assert list(presets) == PRESET_NAMES
    for name, shape in presets.items():
        assert shape.name == name
        assert shape.source
        assert shape.published_params > 0


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_totals_are_near_published_sizes(name):
    shape = get_preset(name)
    assert shape.num_params() == pytest.approx(shape.published_params, rel=0.05)


def test_exact_totals_of_released_checkpoints():
    # Parameter counts of the released checkpoints (Hugging Face `model.num_parameters()`).
    assert get_preset("gpt2").num_params() == 124_439_808
    assert get_preset("llama2-7b").num_params() == 6_738_415_616
    assert get_preset("mistral-7b").num_params() == 7_241_732_096


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: gpt2, gpt2-medium"):
        get_preset("gpt5")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(d_model=10, n_heads=3), "d_model=10 must be divisible by n_heads=3"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 must be divisible by n_kv_heads=3"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(norm="batchnorm"), "norm must be"),
    ],
)
def test_bad_shapes(kwargs, message):
    base = dict(d_model=8, n_layers=2, d_ff=16, n_heads=2)
    with pytest.raises(ValueError, match=message):
        TransformerShape(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("error", "kwargs", "message"),
    [
        (TypeError, dict(d_model=8.0), "d_model must be a positive integer, got 8.0"),
        (TypeError, dict(n_kv_heads="2"), "n_kv_heads must be a positive integer, got '2'"),
        (ValueError, dict(vocab_size=-1), "vocab_size must be an integer >= 0, got -1"),
        (TypeError, dict(context_length=None), "context_length must be an integer >= 0, got None"),
        (TypeError, dict(gated_mlp="false"), "gated_mlp must be True or False, got 'false'"),
        (TypeError, dict(bias=1), "bias must be True or False, got 1"),
        (TypeError, dict(norm=None), "norm must be one of .*got norm=None"),
        (ValueError, dict(norm="batchnorm"), "norm must be one of .*got norm='batchnorm'"),
    ],
)
def test_shape_fields_wrong_type_or_value(error, kwargs, message):
    """A wrong type is a TypeError, a wrong value a ValueError, each naming field and value."""
    base = dict(d_model=8, n_layers=2, d_ff=16, n_heads=2)
    with pytest.raises(error, match=f"^TransformerShape: {message}"):
        TransformerShape(**{**base, **kwargs})


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_memory_adam_conventions(dtype):
    shape = get_preset("gpt2")
    n, b = shape.num_params(), DTYPE_BYTES[dtype]
    est = memory_estimate(shape, 8, ("q", "v"), dtype=dtype, optimizer="adam")
    p = lora_params_for_model(shape, 8, ("q", "v"))
    assert (est.total_params, est.trainable_params) == (n, p)
    assert (est.full.weights, est.full.gradients, est.full.optimizer_states) == (
        n * b,
        n * b,
        2 * n * b,
    )
    assert (est.lora.weights, est.lora.gradients, est.lora.optimizer_states) == (
        (n + p) * b,
        p * b,
        2 * p * b,
    )
    assert est.full.total == 4 * n * b
    assert est.adapter_bytes == p * b


def test_memory_sgd_keeps_no_state_and_state_dtype_is_separate():
    shape = get_preset("gpt2")
    n = shape.num_params()
    sgd = memory_estimate(shape, 4, ("q",), optimizer="sgd")
    assert sgd.full.optimizer_states == sgd.lora.optimizer_states == 0
    mixed = memory_estimate(shape, 4, ("q",), dtype="bf16", state_dtype="fp32")
    assert mixed.full.optimizer_states == 2 * 4 * n
    assert mixed.full.weights == 2 * n


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(dtype="int8"), "dtype='int8'"), (dict(optimizer="lion"), "optimizer='lion'")],
)
def test_memory_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory_estimate(get_preset("gpt2"), 4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dtype=16), "dtype must be one of .*got dtype=16"),
        (dict(state_dtype=b"fp32"), "state_dtype must be one of"),
        (dict(targets=["q", 1]), r"targets must be names \(str\), got \['q', 1\]"),
        (dict(targets=5), r"targets must be names \(str\), got 5"),
    ],
)
def test_memory_wrong_types_are_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=message):
        memory_estimate(get_preset("gpt2"), 4, **kwargs)


def test_get_preset_refuses_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="get_preset: name must be a str, got 2 \\(int\\)"):
        get_preset(2)


def test_to_dict_is_json_ready():
    est = memory_estimate(get_preset("llama2-13b"), 8, "q,k,v,o")
    d = json.loads(json.dumps(est.to_dict()))
    assert d["trainable_params"] == est.trainable_params
    assert d["memory_full_bytes"] == est.full.total
    assert d["memory_lora_bytes"] == est.lora.total
    assert d["trainable_fraction"] == pytest.approx(est.trainable_params / est.total_params)
    assert d["memory_breakdown_bytes"]["lora"]["gradients"] == est.lora.gradients
