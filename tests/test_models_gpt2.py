"""GPT-2 on the engine: equal to HF transformers in float64, cached logits, Conv1D, refusals by name."""

import numpy as np
import pytest

from loralab.models.gpt2 import GPT2, from_hf, to_hf
from loralab.models.kv_cache import KVCache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=24)


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(**CONFIG, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():  # the default init leaves biases and LayerNorms at 0 and 1: move them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ours(hf_gpt2):
    return from_hf(hf_gpt2.config.to_dict(), _numpy_state(hf_gpt2), dtype=np.float64)


def test_logits_equal_transformers_in_float64(hf_gpt2, ours):
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (3, 17))
    with torch.no_grad():
        want = hf_gpt2(torch.as_tensor(ids)).logits.numpy()
    got = ours(ids).data
    assert got.shape == want.shape == (3, 17, CONFIG["vocab_size"])
    assert np.abs(got - want).max() < 1e-9


def test_cached_logits_one_token_at_a_time_equal_the_full_forward(ours):
    ids = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (2, 11))
    full = ours(ids).data
    cache = KVCache(CONFIG["n_layer"])
    pieces = [ours.logits(ids[:, :5], cache)]
    pieces += [ours.logits(ids[:, t : t + 1], cache) for t in range(5, 11)]
    assert cache.length == 11
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-12)


def test_conv1d_weights_are_transposed_and_marked(hf_gpt2, ours):
    w = hf_gpt2.transformer.h[0].attn.c_attn.weight.detach().numpy()  # Conv1D: (in, out)
    layer = ours.get_submodule("transformer.h.0.attn.c_attn")
    assert w.shape == (32, 96) and layer.weight.data.shape == (96, 32)
    np.testing.assert_array_equal(layer.weight.data, w.T)
    assert layer.fan_in_fan_out is True


def test_to_hf_writes_what_transformers_loads_with_the_same_logits(hf_gpt2, ours):
    config, tensors = to_hf(ours)
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).double().eval()
    missing, unexpected = fresh.load_state_dict(
        {k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    ids = torch.as_tensor(np.random.default_rng(2).integers(0, CONFIG["vocab_size"], (2, 9)))
    with torch.no_grad():
        assert (fresh(ids).logits - hf_gpt2(ids).logits).abs().max().item() < 1e-12


def test_keys_without_the_transformer_prefix_and_mask_buffers_load(hf_gpt2):
    # the hub's original gpt2 file: GPT2Model keys ("h.0...."), and old causal-mask buffers
    state = {k.removeprefix("transformer."): v for k, v in _numpy_state(hf_gpt2).items()}
    state.pop("lm_head.weight", None)
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 24, 24)))
    model = from_hf(hf_gpt2.config.to_dict(), state, dtype=np.float64)
    ids = np.arange(10)[None]
    with torch.no_grad():
        want = hf_gpt2(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(model(ids).data - want).max() < 1e-9


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt_neox"}, "model_type must be 'gpt2'"),
        ({"activation_function": "relu"}, "activation_function='relu' changes the math"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_head": 5}, "not divisible by n_head=5"),
        ({"add_cross_attention": True}, "add_cross_attention"),
    ],
)
def test_config_fields_that_change_the_math_are_refused_by_name(hf_gpt2, change, message):
    config = {**hf_gpt2.config.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        from_hf(config, _numpy_state(hf_gpt2), dtype=np.float64)


def test_missing_unexpected_and_misshapen_tensors_are_refused_by_name(hf_gpt2):
    config, state = hf_gpt2.config.to_dict(), _numpy_state(hf_gpt2)
    with pytest.raises(ValueError, match="missing tensors"):
        from_hf(config, {k: v for k, v in state.items() if "ln_f" not in k})
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.q_proj.weight'"):
        from_hf(config, {**state, "transformer.h.0.attn.q_proj.weight": np.zeros((32, 32))})
    bad = {**state, "transformer.h.1.mlp.c_fc.weight": np.zeros((128, 32))}  # not transposed
    with pytest.raises(ValueError, match="c_fc.weight' has shape"):
        from_hf(config, bad)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        from_hf(config, {**state, "lm_head.weight": state["transformer.wte.weight"] + 1})


def test_bad_ids_and_positions_are_refused(ours):
    with pytest.raises(ValueError, match="exceed n_positions=24"):
        ours(np.zeros((1, 25), dtype=np.int64))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 97\)"):
        ours(np.array([[3, 97]]))
    with pytest.raises(ValueError, match="at least one token"):
        ours(np.zeros((1, 0), dtype=np.int64))


def test_an_unmerged_lora_model_is_refused_by_to_hf_and_a_merged_one_written(ours):
    import copy

    from loralab.lora import inject_lora, merge_lora

    model = copy.deepcopy(ours)
    inject_lora(model, ["c_attn"], r=2, seed=0)
    with pytest.raises(ValueError, match="are not merged"):
        to_hf(model)
    merge_lora(model)
    _, tensors = to_hf(model)
    assert not any("lora" in k or ".base." in k for k in tensors)
    assert isinstance(model, GPT2)


# ---------------------------------------------------------------- generation and folders


def test_greedy_generation_equals_transformers_token_for_token(hf_gpt2, ours):
    from loralab.models.generation import generate

    prompt = np.random.default_rng(3).integers(0, CONFIG["vocab_size"], (1, 5))
    with torch.no_grad():
        want = hf_gpt2.generate(
            torch.as_tensor(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    got = generate(ours, prompt, 12)
    np.testing.assert_array_equal(got, want)
    assert generate(ours, prompt[0], 12).tolist() == want[0].tolist()  # a 1-D prompt


def test_sampling_is_reproducible_from_a_seed_and_top_k_restricts_it(ours):
    from loralab.models.generation import generate

    prompt = np.array([[1, 2, 3]])
    a = generate(ours, prompt, 8, temperature=1.0, seed=7)
    assert np.array_equal(a, generate(ours, prompt, 8, temperature=1.0, seed=7))
    assert not np.array_equal(a, generate(ours, prompt, 8, temperature=1.0, seed=8))
    assert np.array_equal(
        generate(ours, prompt, 8, temperature=1.0, top_k=1, seed=9), generate(ours, prompt, 8)
    )
    with pytest.raises(ValueError, match="exceed the model's context of 24"):
        generate(ours, prompt, 22)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        generate(ours, prompt, 2, top_k=0)


def test_from_pretrained_reads_a_saved_folder_and_save_pretrained_writes_one(hf_gpt2, tmp_path):
    from loralab.models.hf import from_pretrained, safetensors_header, save_pretrained

    hf_gpt2.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = from_pretrained(tmp_path / "hf", dtype=np.float64)
    assert all(p.data.flags.writeable for p in model.parameters())  # copies, not the file's map
    model32 = from_pretrained(tmp_path / "hf", dtype=np.float32)
    assert all(p.data.flags.writeable and p.data.flags.owndata for p in model32.parameters())
    header = safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert header["transformer.h.0.attn.c_attn.weight"]["shape"] == [32, 96]  # Conv1D: (in, out)
    ids = np.arange(12)[None] % CONFIG["vocab_size"]
    with torch.no_grad():
        want = hf_gpt2(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(model(ids).data - want).max() < 1e-9
    save_pretrained(model, tmp_path / "ours")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").double().eval()
    with torch.no_grad():
        assert (
            again(torch.as_tensor(ids)).logits - torch.as_tensor(want)
        ).abs().max().item() < 1e-9


def test_sharded_and_bfloat16_checkpoints_load(hf_gpt2, tmp_path):
    from loralab.models.hf import from_pretrained

    bf16 = transformers.GPT2LMHeadModel(hf_gpt2.config).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf_gpt2.state_dict().items()})
    bf16.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = from_pretrained(tmp_path / "sharded", dtype=np.float32)
    w = model.get_submodule("transformer.h.1.mlp.c_fc").weight.data
    want = bf16.transformer.h[1].mlp.c_fc.weight.detach().float().numpy().T
    np.testing.assert_array_equal(w, want)  # bfloat16 widens to float32 exactly


def test_from_pretrained_says_what_is_wrong(tmp_path, monkeypatch):
    from loralab.models.hf import from_pretrained

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        from_pretrained(tmp_path / "no" / "such" / "folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 is set"):
        from_pretrained("gpt2-this-id-does-not-exist-here")


def test_lora_on_the_position_table_wpe_is_refused_by_name(ours):
    import copy

    from loralab.lora import inject_lora

    with pytest.raises(ValueError, match="'transformer.wpe' cannot take a LoRA adapter"):
        inject_lora(copy.deepcopy(ours), ["wpe"], r=2, seed=0)
