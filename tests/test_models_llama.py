"""LLaMA on the engine (loralab/models/llama.py) against transformers' LlamaForCausalLM, in float64.

transformers computes three things in float32 even in a float64 model (on purpose, for bfloat16
training): RMSNorm, the RoPE angles and the attention softmax. `float64_hf` runs those three
in the model's dtype, with HF's own formulas, so that the comparison measures the math
(within 1e-9) rather than float32 rounding; against the untouched model the logits agree to
float32 precision only (about 1e-7, checked too).
"""

import copy

import numpy as np
import pytest

from loralab.lora import LoraConfig, inject_lora, lora_layers, merge_lora
from loralab.models.kv_cache import KVCache
from loralab.models.llama import Llama, LlamaConfig, from_hf, to_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = dict(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture
def float64_hf(monkeypatch):
    """HF's LLaMA and Mistral computing RMSNorm, RoPE angles and softmax in the model's dtype."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral

    def rms_norm(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    def rope(self, x, position_ids):
        theta = self.config.rope_parameters["rope_theta"]
        dim = self.config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.softmax(weights, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    for module, prefix in ((modeling_llama, "Llama"), (modeling_mistral, "Mistral")):
        monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", rms_norm)
        monkeypatch.setattr(getattr(module, f"{prefix}RotaryEmbedding"), "forward", rope)
        monkeypatch.setattr(module, "eager_attention_forward", eager)


def hf_model(kind="llama", seed=0, **options):
    torch.manual_seed(seed)
    options = {**SIZES, **options}
    if kind == "mistral":
        config = transformers.MistralConfig(**options, sliding_window=None)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**options)
        model = transformers.LlamaForCausalLM(config)
    config._attn_implementation = "eager"
    model.config._attn_implementation = "eager"
    return model.double().eval()


def state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def load(hf, **kw):
    return from_hf(hf.config.to_dict(), state_dict(hf), dtype=np.float64, **kw)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (3, 11))


@pytest.mark.parametrize(
    "kind, options",
    [
        ("llama", dict(rope_theta=500.0, tie_word_embeddings=False)),
        ("llama", dict(rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
        ("llama", dict(num_key_value_heads=4, pretraining_tp=2)),  # plain multi-head; tp: same math
        ("llama", dict(num_key_value_heads=1, head_dim=8)),  # multi-query; head_dim != hidden / H
        ("mistral", dict(rope_theta=1e6)),
    ],
)
def test_logits_equal_transformers_in_float64(float64_hf, kind, options):
    hf = hf_model(kind, **options)
    model = load(hf)
    assert model.config.model_type == kind
    diff = np.abs(model(IDS).data - hf_logits(hf, IDS)).max()
    assert diff < 1e-9, diff


def test_untouched_transformers_agrees_to_float32_precision():
    """What a user sees comparing with plain transformers: its float32 steps, about 1e-7."""
    hf = hf_model(rope_theta=500.0)
    diff = np.abs(load(hf)(IDS).data - hf_logits(hf, IDS)).max()
    assert 1e-12 < diff < 1e-5, diff


def test_llama3_rope_scaling_agrees_with_transformers():
    """HF computes the llama3 frequencies in float32 (the formula is compared in
    test_functional_llm), so the logits agree to float32 precision."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    hf = hf_model(rope_theta=500000.0, rope_scaling=scaling)
    model = load(hf)
    assert model.config.rope_scaling["factor"] == 8.0
    diff = np.abs(model(IDS).data - hf_logits(hf, IDS)).max()
    assert diff < 1e-5, diff
    plain = copy.deepcopy(model)
    plain.config.rope_scaling = None
    assert np.abs(plain(IDS).data - model(IDS).data).max() > 1e-4  # the scaling mattered


def test_old_config_json_spelling_rope_theta_and_rope_scaling():
    """Checkpoints on the hub write rope_theta and rope_scaling; transformers 5 rope_parameters."""
    old = dict(model_type="llama", **SIZES, rope_theta=500.0, rope_scaling=None)
    new = dict(
        model_type="llama", **SIZES, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    )
    assert LlamaConfig.from_hf(old).rope_theta == LlamaConfig.from_hf(new).rope_theta == 500.0
    assert LlamaConfig.from_hf({**old, "rope_scaling": {"type": "llama3", "factor": 2.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}).rope_scaling["factor"] == 2.0  # fmt: skip


def test_cached_incremental_logits_equal_the_full_forward():
    hf = hf_model(rope_theta=500.0)
    model = load(hf)
    full = model(IDS).data
    cache = KVCache(SIZES["num_hidden_layers"])
    parts = [model.logits(IDS[:, :5], cache)]  # the prefill
    for t in range(5, 8):  # one token a step
        parts.append(model.logits(IDS[:, t : t + 1], cache))
    parts.append(model.logits(IDS[:, 8:], cache, start_pos=8))
    assert cache.length == IDS.shape[1]
    assert cache.keys[0].shape == (3, SIZES["num_key_value_heads"], 11, 16)  # H_kv heads cached
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.logits(IDS), full, rtol=0, atol=1e-12)
    # RoPE sees relative positions only: a shifted start changes nothing but rounding
    np.testing.assert_allclose(model.logits(IDS, start_pos=40), full, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="start_pos=3 but the cache holds 11"):
        model.logits(IDS[:, :1], cache, start_pos=3)
    with pytest.raises(ValueError, match="exceed max_position_embeddings=64"):
        model.logits(IDS, start_pos=60)


def test_the_modules_have_the_checkpoints_names_and_lora_targets_q_and_v():
    model = load(hf_model(tie_word_embeddings=False))
    names = dict(model.named_modules())
    for name in (
        "model.embed_tokens",
        "model.layers.1.self_attn.k_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.post_attention_layernorm",
        "model.norm",
        "lm_head",
    ):
        assert name in names
    before = model(IDS).data
    inject_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4), seed=0)
    assert [n for n, _ in lora_layers(model)] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    np.testing.assert_array_equal(model(IDS).data, before)  # B = 0: the base model exactly
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        f"model.layers.{i}.self_attn.{p}.{ab}"
        for i in range(2)
        for p in ("q_proj", "v_proj")
        for ab in ("lora_A", "lora_B")
    ]
    loss = model.loss(IDS[:, :-1], IDS[:, 1:])
    loss.backward()
    assert all(np.abs(p.grad).max() > 0 for n, p in model.named_parameters() if n.endswith("B"))


def test_to_hf_round_trip_and_a_merged_lora_model_opens_in_transformers(float64_hf):
    hf = hf_model(tie_word_embeddings=True)
    model = load(hf)
    config, tensors = to_hf(model)
    assert set(tensors) == set(state_dict(hf)) - {"lm_head.weight"}  # tied: HF leaves it out
    inject_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4), seed=0)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(model):
        layer.lora_B.data = rng.standard_normal(layer.lora_B.shape) * 0.1
    adapted = model(IDS).data
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj'.* not merged"):
        to_hf(model)
    merge_lora(model)
    config, tensors = to_hf(model)
    assert not any("lora" in k or ".base." in k for k in tensors)
    hf2 = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).double().eval()
    hf2.config._attn_implementation = "eager"
    hf2.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
    assert np.abs(hf_logits(hf2, IDS) - adapted).max() < 1e-9
    again = from_hf(config, tensors, dtype=np.float64)
    np.testing.assert_allclose(again(IDS).data, adapted, rtol=0, atol=1e-12)


BASE = dict(model_type="llama", **SIZES)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="gpt_neox"), "model_type='gpt_neox'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(attention_bias="false"), "attention_bias='false' must be true or false"),
        (dict(attention_dropout=0.1), "attention_dropout=0.1"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE scaling 'dynamic'"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "RoPE scaling 'yarn'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "'low_freq_factor'"),
        (dict(rope_theta=500.0, rope_parameters={"rope_theta": 1e4}), "rope_theta=500.0 disagrees"),
        (
            dict(rope_parameters={"rope_type": "default"}, rope_scaling={"type": "linear"}),
            "rope_scaling={'type': 'linear'} disagrees",
        ),
        (dict(rope_theta=float("inf")), "rope_theta=inf must be a positive number"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
        (dict(model_type="mistral", max_position_embeddings=8192), "sliding_window=4096"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide"),
        (dict(head_dim=15), "head_dim=15 must be even"),
        (dict(hidden_size=66), "hidden_size=66 is not divisible"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(pretraining_tp=0), "pretraining_tp=0"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config="),
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps=nan"),
    ],
)
def test_configs_that_change_the_math_are_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**BASE, **change})


def test_mistral_without_a_window_shorter_than_the_context_is_accepted():
    assert LlamaConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": None})
    assert LlamaConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 64})


def test_from_hf_refuses_missing_unexpected_and_misshapen_tensors_by_name():
    hf = hf_model()
    config, tensors = hf.config.to_dict(), state_dict(hf)
    cases = [
        ({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, "missing tensors 'model.layers.1.mlp.up_proj.weight'"),
        ({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64)}, "unexpected tensors 'model.layers.0.self_attn.q_proj.bias'"),
        ({**tensors, "model.norm.weight": np.ones(63)}, r"'model.norm.weight' has shape \(63,\), expected \(64,\)"),
    ]  # fmt: skip
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            from_hf(config, bad)
    tied = {**config, "tie_word_embeddings": True}
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_hf(tied, tensors)
    old_buffer = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)}
    assert isinstance(from_hf(config, old_buffer), Llama)  # a buffer, computed here


def test_from_hf_copies_read_only_arrays_so_that_merging_works():
    """from_pretrained memory-maps the file read-only; merge_lora writes into W0."""
    hf = hf_model()
    tensors = state_dict(hf)
    for value in tensors.values():
        value.flags.writeable = False
    model = from_hf(hf.config.to_dict(), tensors, dtype=np.float64)
    inject_lora(model, LoraConfig(target_modules=["q_proj"], r=4), seed=0)
    merge_lora(model)
    assert all(p.data.flags.writeable for p in model.parameters())


def test_peft_adapters_for_llama_run_here_and_ours_run_in_peft(float64_hf, tmp_path):
    """target_modules=["q_proj", "v_proj"] written by PEFT loads unchanged, and the other way."""
    peft = pytest.importorskip("peft")
    from loralab.lora import load_adapter, save_adapter

    hf = hf_model(rope_theta=500.0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).double().eval()
    theirs.save_pretrained(tmp_path / "peft")
    model = load(hf)
    load_adapter(model, tmp_path / "peft")
    assert np.abs(model(IDS).data - hf_logits(theirs, IDS)).max() < 1e-9

    ours = load(hf)
    inject_lora(ours, LoraConfig(target_modules=["q_proj", "v_proj"], r=4), seed=0)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(ours):
        layer.lora_B.data = 0.1 * rng.standard_normal(layer.lora_B.shape)
    save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").double().eval()
    assert np.abs(ours(IDS).data - hf_logits(in_peft, IDS)).max() < 1e-9
