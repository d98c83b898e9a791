"""LoRAEmbedding: PEFT's shapes and init, the Function's gradients, injection by name, merging, files."""

import json

import numpy as np
import pytest

from loralab import gradcheck
from loralab.lora import (
    LoRAEmbedding,
    count_parameters,
    disable_adapters,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    mixed_batch,
    save_adapter,
    set_adapter,
    unmerge_lora,
)
from loralab.lora.embedding_layer import LoRAEmbeddingFn
from loralab.lora.peft_format import WEIGHTS_NAME
from loralab.models import GPT
from loralab.nn import Embedding
from loralab.tensor import Tensor

VOCAB, DIM = 11, 6


def gpt(seed=0):
    return GPT(
        VOCAB, context_length=5, d_model=8, n_layers=1, n_heads=2, seed=seed, dtype=np.float64
    )


def tokens(seed=0, shape=(3, 5)):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape)


def randomize(model, seed=1):
    """Give every adapter nonzero A and B (as after training)."""
    rng = np.random.default_rng(seed)
    for p in lora_state_dict(model):
        layer_path, _, name = p.rpartition(".")
        param = getattr(model.get_submodule(layer_path), name)
        param.data = rng.normal(size=param.shape)


def snapshot(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}, {
        n: type(m).__name__ for n, m in model.named_modules()
    }


# ----- the Function -------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_shape", [(7,), (2, 3, 4), ()])
@pytest.mark.parametrize("table_trains", [False, True])
def test_function_gradcheck(batch_shape, table_trains):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=batch_shape)
    E = Tensor(rng.normal(size=(VOCAB, DIM)), requires_grad=table_trains)
    A = Tensor(rng.normal(size=(3, VOCAB)), requires_grad=True)  # nonzero A and B: no trivial zero
    B = Tensor(rng.normal(size=(DIM, 3)), requires_grad=True)
    assert gradcheck(lambda E, A, B: LoRAEmbeddingFn.apply(ids, E, A, B, scaling=1.7), E, A, B)


def test_function_touches_only_used_columns_and_the_frozen_table_gets_no_gradient():
    rng = np.random.default_rng(1)
    ids = np.array([[2, 5, 5], [9, 2, 2]])
    E = Tensor(rng.normal(size=(VOCAB, DIM)))  # frozen
    A = Tensor(rng.normal(size=(2, VOCAB)), requires_grad=True)
    B = Tensor(rng.normal(size=(DIM, 2)), requires_grad=True)
    LoRAEmbeddingFn.apply(ids, E, A, B, scaling=2.0).sum().backward()
    used = np.zeros(VOCAB, dtype=bool)
    used[ids.ravel()] = True
    assert np.all(A.grad[:, ~used] == 0) and np.all(A.grad[:, used] != 0)
    assert E.grad is None


# ----- the layer ----------------------------------------------------------------------------------
def test_shapes_init_and_scaling_follow_peft():
    base = Embedding(VOCAB, DIM, seed=0, dtype=np.float64)
    layer = LoRAEmbedding(base, r=3, alpha=6, seed=4)
    assert layer.lora_embedding_A.shape == (3, VOCAB) and layer.lora_embedding_B.shape == (DIM, 3)
    # PEFT's reset_lora_parameters for embeddings: A = 0, B ~ N(0, 1)
    assert np.all(layer.lora_embedding_A.data == 0)
    expected_B = np.random.default_rng(4).standard_normal((DIM, 3))
    np.testing.assert_array_equal(layer.lora_embedding_B.data, expected_B)
    assert layer.scaling == 2.0
    assert LoRAEmbedding(base, r=4, alpha=6, use_rslora=True).scaling == 3.0
    assert layer.lora_embedding_B.dtype == np.float64 and not base.weight.requires_grad
    ids = tokens()
    np.testing.assert_array_equal(layer(ids).data, base.weight.data[ids])  # ΔE = 0 at first


def test_layer_forward_is_the_merged_table():
    layer = LoRAEmbedding(Embedding(VOCAB, DIM, seed=0, dtype=np.float64), r=2, alpha=3, seed=1)
    rng = np.random.default_rng(2)
    layer.lora_embedding_A.data = rng.normal(size=(2, VOCAB))
    E = layer.base.weight.data + 1.5 * (layer.lora_embedding_B.data @ layer.lora_embedding_A.data).T
    ids = tokens(shape=(2, 3, 4))
    np.testing.assert_allclose(layer(ids).data, E[ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 7}, ValueError, r"LoRAEmbedding\(num_embeddings=11, embedding_dim=6\): r=7 exceeds"),
        ({"r": 0}, ValueError, "r must be a positive integer"),
        ({"alpha": "2"}, TypeError, "alpha must be a positive number"),
        ({"use_dora": True}, ValueError, "use_dora=True, init='kaiming' are not implemented"),
        ({"init": "pissa"}, ValueError, "init='pissa' are not implemented for embeddings"),
        ({"use_rslora": "no"}, TypeError, "use_rslora"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRAEmbedding(Embedding(VOCAB, DIM, seed=0), **{"r": 2, **kwargs})


def test_bad_base_and_ids_are_named():
    from loralab.nn import Linear

    with pytest.raises(
        TypeError, match="LoRAEmbedding: base must be a loralab.nn.Embedding, got Linear"
    ):
        LoRAEmbedding(Linear(3, 4))
    layer = LoRAEmbedding(Embedding(VOCAB, DIM, seed=0), r=2)
    with pytest.raises(TypeError, match=r"r=2\): expected integer token ids, got dtype float64"):
        layer(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"token id 11 outside \[0, 11\)"):
        layer(np.array([1, 11]))


# ----- on a model -----------------------------------------------------------------------------------
def test_inject_by_name_on_the_gpt_token_embedding():
    model = gpt()
    ids = tokens()
    before = model(ids).data
    trainable_before, total_before = count_parameters(model)
    inject_lora(model, ["tok_emb", "q"], r=2, alpha=4, seed=0)
    assert isinstance(model.tok_emb, LoRAEmbedding)
    assert [n for n, _ in lora_layers(model)] == ["tok_emb", "blocks.0.attn.q"]
    np.testing.assert_array_equal(model(ids).data, before)  # A = 0: nothing changes yet
    trainable, total = count_parameters(model)
    assert trainable == 2 * VOCAB + 8 * 2 + (2 * 8 + 8 * 2)  # A (r, vocab), B (d, r); q's A, B
    assert total == total_before + trainable and trainable_before == total_before
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names[:2] == ["tok_emb.lora_embedding_A", "tok_emb.lora_embedding_B"]
    assert sorted(lora_state_dict(model))[-2:] == [
        "tok_emb.lora_embedding_A",
        "tok_emb.lora_embedding_B",
    ]


def test_training_through_the_gpt_reaches_the_embedding_adapter_only():
    model = inject_lora(gpt(), ["tok_emb"], r=2, seed=0)
    randomize(model)
    ids = tokens()
    model.loss(ids, tokens(1)).backward()
    A = model.tok_emb.lora_embedding_A
    assert A.grad is not None and model.tok_emb.lora_embedding_B.grad is not None
    unused = np.setdiff1d(np.arange(VOCAB), ids)
    assert unused.size and np.all(A.grad[:, unused] == 0)
    assert model.tok_emb.base.weight.grad is None  # the tied table stays frozen


def test_a_target_neither_linear_nor_embedding_is_refused_exactly():
    model = gpt()
    with pytest.raises(TypeError) as info:
        inject_lora(model, ["tok_emb", "ln_f"], r=2)
    assert str(info.value) == (
        "inject_lora: target 'ln_f' is a LayerNorm; only Linear and Embedding layers take LoRA"
    )
    assert not lora_layers(model)


def test_all_linear_skips_embeddings_as_peft():
    model = inject_lora(gpt(), "all-linear", r=2, seed=0)
    assert "tok_emb" not in dict(lora_layers(model)) and "pos_emb" not in dict(lora_layers(model))


def test_an_embedding_option_refused_leaves_the_model_unchanged():
    model = gpt()
    params, modules = snapshot(model)
    with pytest.raises(ValueError, match=r"LoRAEmbedding\(num_embeddings=11, embedding_dim=8\)"):
        inject_lora(model, ["q", "tok_emb"], r=2, use_dora=True)  # fine for q, not for tok_emb
    assert snapshot(model)[1] == modules
    assert all(np.array_equal(p.data, params[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_merge_and_unmerge_are_exact():
    model = inject_lora(gpt(), ["tok_emb", "q"], r=2, seed=0)
    randomize(model)
    ids = tokens()
    E0 = model.tok_emb.base.weight.data.copy()
    unmerged = model(ids).data
    merge_lora(model)
    layer = model.tok_emb
    np.testing.assert_allclose(
        layer.base.weight.data - E0, layer.delta_weight(), rtol=1e-12, atol=1e-14
    )
    # the tied head now reads E + ΔE as well, so compare the embedding's output alone
    np.testing.assert_allclose(layer(ids).data, (E0 + layer.delta_weight())[ids], rtol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    eps = np.finfo(np.float64).eps  # (E + ΔE) - ΔE: round-off of the size of ΔE's entries
    np.testing.assert_allclose(
        layer.base.weight.data, E0, rtol=0, atol=4 * eps * np.abs(layer.delta_weight()).max()
    )
    np.testing.assert_allclose(model(ids).data, unmerged, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="LoRAEmbedding.unmerge\\(\\): the layer is not merged"):
        layer.unmerge()


def test_merged_output_equals_unmerged_with_an_untied_head():
    model = GPT(
        VOCAB,
        context_length=5,
        d_model=8,
        n_layers=1,
        n_heads=2,
        seed=0,
        dtype=np.float64,
        tied_head=False,
    )
    inject_lora(model, ["tok_emb", "head"], r=2, seed=0)
    randomize(model)
    ids = tokens()
    unmerged = model(ids).data
    merge_lora(model)
    np.testing.assert_allclose(model(ids).data, unmerged, rtol=1e-11, atol=1e-12)


# ----- the adapter file ---------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = inject_lora(gpt(), ["tok_emb", "q"], r=2, alpha=3, seed=0)
    randomize(model)
    save_adapter(model, tmp_path / "a")
    from safetensors.numpy import load_file

    keys = sorted(load_file(tmp_path / "a" / WEIGHTS_NAME))
    assert keys == [
        "base_model.model.blocks.0.attn.q.lora_A.weight",
        "base_model.model.blocks.0.attn.q.lora_B.weight",
        "base_model.model.tok_emb.lora_embedding_A",
        "base_model.model.tok_emb.lora_embedding_B",
    ]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["blocks.0.attn.q", "tok_emb"]
    loaded = load_adapter(gpt(), tmp_path / "a")
    assert isinstance(loaded.tok_emb, LoRAEmbedding) and loaded.tok_emb.scaling == 1.5
    ids = tokens()
    np.testing.assert_array_equal(loaded(ids).data, model(ids).data)
    into_existing = inject_lora(gpt(), ["tok_emb", "q"], r=2, seed=5)
    load_adapter(into_existing, tmp_path / "a")
    np.testing.assert_array_equal(into_existing(ids).data, model(ids).data)


def _rewrite(folder, change):
    from safetensors.numpy import load_file, save_file

    path = folder / WEIGHTS_NAME
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda t: t.update({"base_model.model.tok_emb.lora_embedding_B": np.zeros((7, 2))}),
            r"lora_embedding_B has shape \(7, 2\) but the model expects \(8, 2\)",
        ),
        (
            lambda t: t.pop("base_model.model.tok_emb.lora_embedding_A"),
            "base_model.model.tok_emb.lora_embedding_A is missing",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.ln_f.lora_embedding_A": np.zeros((2, 8)),
                    "base_model.model.ln_f.lora_embedding_B": np.zeros((8, 2)),
                }
            ),
            # into a model with adapters, the layer list differing is found first
            r"no Embedding module 'ln_f'; its Embedding modules are \['tok_emb', 'pos_emb'\]"
            r"|file has adapters for \['blocks.0.attn.q', 'ln_f', 'tok_emb'\] but the model has",
        ),
        (
            lambda t: t.update({"base_model.model.tok_emb.lora_A.weight": np.zeros((2, 11))}),
            "mixes an embedding's and a linear layer's tensors",
        ),
        (
            lambda t: t.update(
                {"base_model.model.tok_emb.lora_embedding_A": np.full((2, VOCAB), np.nan)}
            ),
            "NaN or infinite",
        ),
    ],
)
@pytest.mark.parametrize("into_existing", [False, True])
def test_a_bad_embedding_adapter_leaves_the_model_unchanged(tmp_path, change, match, into_existing):
    saved = inject_lora(gpt(), ["tok_emb", "q"], r=2, seed=0)
    randomize(saved)
    save_adapter(saved, tmp_path)
    _rewrite(tmp_path, change)
    model = inject_lora(gpt(), ["tok_emb", "q"], r=2, seed=3) if into_existing else gpt()
    params, modules = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    assert snapshot(model)[1] == modules
    assert all(np.array_equal(p.data, params[n]) for n, p in model.named_parameters())


def test_a_dora_config_for_an_embedding_is_refused_before_any_change(tmp_path):
    saved = inject_lora(gpt(), ["tok_emb"], r=2, seed=0)
    save_adapter(saved, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["init_lora_weights"] = "olora"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = gpt()
    params, modules = snapshot(model)
    with pytest.raises(ValueError, match="init='olora' are not implemented for embeddings"):
        load_adapter(model, tmp_path)
    assert snapshot(model)[1] == modules


# ----- named adapters: the embedding's one adapter follows the model's switches --------------------
def two_adapters():
    """tok_emb and q with adapter "default", q with a second adapter "b"; all A and B nonzero."""
    model = inject_lora(gpt(), ["tok_emb", "q"], r=2, seed=0)
    inject_lora(model, ["q"], r=2, seed=1, adapter_name="b")
    rng = np.random.default_rng(3)
    for name, p in model.named_parameters():
        if ".lora_" in f".{name}":
            p.data = rng.normal(size=p.shape)
    return model


def test_the_first_adapter_name_reaches_the_embedding():
    model = inject_lora(gpt(), ["tok_emb", "q"], r=2, seed=0, adapter_name="task")
    assert model.tok_emb.adapter_names == ["task"] and list_adapters(model) == ["task"]
    with pytest.raises(ValueError, match="a second adapter on the embedding 'tok_emb'"):
        inject_lora(model, ["tok_emb"], r=2, adapter_name="other")


def test_set_adapter_and_disable_adapters_switch_the_embedding_too():
    model = two_adapters()
    ids = tokens()
    E = model.tok_emb.base.weight.data
    assert np.abs(model.tok_emb(ids).data - E[ids]).max() > 0  # "default" active
    set_adapter(model, "b")
    np.testing.assert_array_equal(model.tok_emb(ids).data, E[ids])  # its adapter is not active
    assert not model.tok_emb.lora_embedding_A.requires_grad
    set_adapter(model, ["default", "b"])
    assert model.tok_emb.lora_embedding_A.requires_grad
    with disable_adapters(model):
        np.testing.assert_array_equal(model.tok_emb(ids).data, E[ids])
    set_adapter(model, "default")
    merge_lora(model, adapter_names=["b"])  # names the embedding's adapter not: E unchanged
    np.testing.assert_array_equal(model.tok_emb.base.weight.data, E)
    assert not model.tok_emb.merged


def test_mixed_batch_rows_equal_each_row_alone_with_gradients():
    model = two_adapters()
    ids = tokens(shape=(3, 5))
    names = ["default", "__base__", "b"]
    with mixed_batch(model, names):
        mixed = model.tok_emb(ids)
    for i, name in enumerate(names):
        E = model.tok_emb.base.weight.data
        alone = E[ids[i]] if name != "default" else model.tok_emb(ids[i : i + 1]).data[0]
        np.testing.assert_array_equal(mixed.data[i], alone)
    A = Tensor(np.random.default_rng(4).normal(size=(2, VOCAB)), requires_grad=True)
    B = Tensor(np.random.default_rng(5).normal(size=(8, 2)), requires_grad=True)
    E = Tensor(model.tok_emb.base.weight.data.copy(), requires_grad=True)
    rows = np.array([True, False, True])
    assert gradcheck(
        lambda E, A, B: LoRAEmbeddingFn.apply(ids, E, A, B, scaling=1.5, rows=rows), E, A, B
    )
    with (
        mixed_batch(model, names[:2]),
        pytest.raises(ValueError, match="mixed_batch got 2 adapter names"),
    ):
        model.tok_emb(ids)
