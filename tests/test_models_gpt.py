"""The small GPT: shapes, names, gradchecks of the fused attention and the whole model, causality,
generation, checkpoints, the shipped corpora, and equivalence with the torch twin."""

from __future__ import annotations

import numpy as np
import pytest

from loralab import GradcheckError, Tensor, gradcheck, no_grad
from loralab.lora import count_parameters, inject_lora, lora_layers
from loralab.models import (
    CHARS,
    GPT,
    CharTokenizer,
    causal_attention,
    get_batch,
    load_corpus,
    load_gpt,
)
from loralab.models.gpt import Attention


def small_gpt(**kw):
    options = dict(context_length=6, d_model=8, n_layers=2, n_heads=2, seed=0, dtype=np.float64)
    options.update(kw)
    return GPT(11, **options)


def tokens(shape, seed=0, vocab=11):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# ----- attention ------------------------------------------------------------------------------------
def test_attention_gradcheck():
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.normal(size=(2, 5, 6)), requires_grad=True) for _ in range(3))
    assert gradcheck(lambda q, k, v: causal_attention(q, k, v, 3), q, k, v)


def test_attention_gradcheck_catches_a_wrong_backward(monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.normal(size=(1, 4, 4)), requires_grad=True) for _ in range(3))
    right = Attention.backward

    def wrong(ctx, grad):
        dq, dk, dv = right(ctx, grad)
        return dq, dk, 2 * dv

    monkeypatch.setattr(Attention, "backward", staticmethod(wrong))
    with pytest.raises(GradcheckError, match="input 2"):
        gradcheck(lambda q, k, v: causal_attention(q, k, v, 2), q, k, v)


def test_attention_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 4, 6)) for _ in range(3))
    out = causal_attention(q, k, v, 2).data
    for h in range(2):
        sl = slice(3 * h, 3 * h + 3)
        for t in range(4):
            s = np.einsum("bd,bsd->bs", q[:, t, sl], k[:, : t + 1, sl]) / np.sqrt(3)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            expected = np.einsum("bs,bsd->bd", p, v[:, : t + 1, sl])
            np.testing.assert_allclose(out[:, t, sl], expected, atol=1e-12)


def test_attention_keeps_float32_and_masks_every_length():
    # The causal mask is cached per (T, dtype): a shorter T after a longer one must get its own.
    rng = np.random.default_rng(2)
    for T in (5, 3, 5):
        q, k, v = (
            Tensor(rng.normal(size=(2, T, 4)).astype(np.float32), requires_grad=True)
            for _ in range(3)
        )
        out = causal_attention(q, k, v, 2)
        assert out.dtype == np.float32
        out.backward(np.ones(out.shape, dtype=np.float32))
        assert all(t.grad.dtype == np.float32 for t in (q, k, v))
        # Position 0 attends only to itself: its output is v[:, 0] exactly, whatever q and k are.
        np.testing.assert_allclose(out.data[:, 0], v.data[:, 0], rtol=1e-6)
        # ...so its query does not matter either: q's gradient there is zero (up to round-off).
        np.testing.assert_allclose(q.grad[:, 0], 0.0, atol=1e-6)
        assert np.abs(q.grad[:, T - 1]).max() > 1e-3


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by n_heads=4"):
        causal_attention(np.zeros((1, 2, 6)), np.zeros((1, 2, 6)), np.zeros((1, 2, 6)), 4)
    with pytest.raises(ValueError, match="one shape"):
        causal_attention(np.zeros((1, 2, 6)), np.zeros((1, 3, 6)), np.zeros((1, 2, 6)), 2)
    q = np.zeros((1, 2, 6))
    with pytest.raises(TypeError, match="causal_attention: n_heads must be a positive integer"):
        causal_attention(q, q, q, 2.0)
    with pytest.raises(ValueError, match="causal_attention: n_heads must be a positive integer"):
        causal_attention(q, q, q, 0)


# ----- the model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_gpt_gradcheck(tied):
    model = small_gpt(tied_head=tied, n_layers=1)
    x, y = tokens((2, 5)), tokens((2, 5), seed=1)
    assert gradcheck(lambda *_: model.loss(x, y), *model.parameters())


def test_gpt_shapes_and_names():
    model = small_gpt(tied_head=False)
    assert model(tokens((3, 6))).shape == (3, 6, 11)
    names = [n for n, _ in model.named_modules()]
    for layer in range(2):
        for child in ("q", "k", "v", "o"):
            assert f"blocks.{layer}.attn.{child}" in names
    assert "head" in names and "head" not in [n for n, _ in small_gpt().named_modules()]


def test_gpt_is_causal():
    model = small_gpt()
    x = tokens((2, 6))
    changed = x.copy()
    changed[:, 3] = (changed[:, 3] + 1) % 11
    before, after = model(x).data, model(changed).data
    np.testing.assert_array_equal(before[:, :3], after[:, :3])
    assert np.abs(before[:, 3:] - after[:, 3:]).max() > 1e-6


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_model": 9}, "not divisible"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
    ],
)
def test_gpt_rejects_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        small_gpt(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_model": 8.0}, "GPT: d_model must be a positive integer, got 8.0"),
        ({"n_heads": True}, "GPT: n_heads must be a positive integer, got True"),
        ({"tied_head": "false"}, "GPT: tied_head must be True or False, got 'false'"),
    ],
)
def test_gpt_config_of_the_wrong_type_is_a_type_error(kw, match):
    with pytest.raises(TypeError, match=match):
        small_gpt(**kw)


def test_gpt_rejects_bad_input():
    model = small_gpt()
    with pytest.raises(ValueError, match="exceeds context_length=6"):
        model(tokens((1, 7)))
    with pytest.raises(ValueError, match=r"shape \(batch, T\), got shape \(6,\)"):
        model(tokens(6))
    with pytest.raises(TypeError, match="GPT: expected integer token ids, got dtype float64"):
        model(np.zeros((2, 3)))


def test_generate_rejects_bad_options():
    model = small_gpt()
    prompt = np.array([1, 2])
    for kw, error, match in [
        ({"temperature": -1.0}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": "hot"}, TypeError, "temperature must be a finite number >= 0"),
        ({"n": -1}, ValueError, "GPT.generate: n must be an integer >= 0, got -1"),
        ({"n": 2.0}, TypeError, "GPT.generate: n must be an integer >= 0, got 2.0"),
    ]:
        with pytest.raises(error, match=match):
            model.generate(prompt, **{"n": 2, **kw})
    assert len(model.generate(prompt, 0)) == 2  # n = 0: the prompt alone


def test_lora_on_gpt_starts_as_the_base_and_trains_only_adapters():
    model = small_gpt()
    x = tokens((2, 6))
    before = model(x).data.copy()
    inject_lora(model, ["q", "v"], r=2, alpha=4, seed=0)
    np.testing.assert_array_equal(model(x).data, before)
    assert [n for n, _ in lora_layers(model)] == [
        "blocks.0.attn.q",
        "blocks.0.attn.v",
        "blocks.1.attn.q",
        "blocks.1.attn.v",
    ]
    assert count_parameters(model)[0] == 4 * 2 * (8 + 8)


def test_generate_is_deterministic_and_respects_the_prompt():
    model = GPT(len(CHARS), context_length=8, d_model=8, n_layers=1, n_heads=2, seed=0)
    a = model.generate("In the", 20, temperature=1.0, seed=3)
    assert a.startswith("In the") and len(a) == 26
    assert a == model.generate("In the", 20, temperature=1.0, seed=3)
    greedy = model.generate(np.array([5, 6]), 5, temperature=0)
    assert greedy.shape == (7,) and greedy.dtype == np.int64
    with no_grad():
        first = int(np.argmax(model(np.array([[5, 6]])).data[0, -1]))
    assert greedy[2] == first


def test_save_and_load_roundtrip(tmp_path):
    model = small_gpt(tied_head=False, dtype=np.float32)
    path = model.save(tmp_path / "gpt.safetensors")
    loaded = GPT.load(path)
    assert loaded.config == model.config
    x = tokens((2, 6))
    np.testing.assert_array_equal(loaded(x).data, model(x).data)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.safetensors|header|metadata|deserial"):
        GPT.load(tmp_path / "bad.safetensors")


# ----- data ------------------------------------------------------------------------------------------
def test_tokenizer_roundtrip_and_errors():
    tok = CharTokenizer()
    text = "Behold, the man is become as one of us.\n"
    assert tok.decode(tok.encode(text)) == text and tok.vocab_size == 96
    with pytest.raises(ValueError, match="'é' is not in the alphabet"):
        tok.encode("café")
    with pytest.raises(ValueError, match="must not repeat"):
        CharTokenizer("aa")
    with pytest.raises(TypeError, match=r"CharTokenizer: chars must be a str, got \['a'\]"):
        CharTokenizer(["a"])


def test_corpora_load_and_batches_shift_by_one():
    for name in ("genesis", "devil"):
        corpus = load_corpus(name)
        assert len(corpus.train) > 100_000 and len(corpus.val) > 10_000
    x, y = get_batch(load_corpus("devil").train, 4, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="name must be one of"):
        load_corpus("hamlet")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: load_corpus(None), TypeError, "load_corpus: name must be one of .* got name=None"),
        (
            lambda: load_corpus("devil", val_fraction=1.0),
            ValueError,
            "val_fraction must be a number in",
        ),
        (
            lambda: load_corpus("devil", val_fraction="0.1"),
            TypeError,
            "val_fraction must be a number in",
        ),
        (
            lambda: get_batch(np.arange(50), 0, 8, np.random.default_rng(0)),
            ValueError,
            "get_batch: batch_size must be a positive integer, got 0",
        ),
        (
            lambda: get_batch(np.arange(50), 2, 8.0, np.random.default_rng(0)),
            TypeError,
            "get_batch: context_length must be a positive integer, got 8.0",
        ),
        (
            lambda: get_batch(np.arange(8), 2, 8, np.random.default_rng(0)),
            ValueError,
            "the stream has 8 tokens",
        ),
    ],
)
def test_data_functions_refuse_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_small_val_fraction_still_splits_the_text():
    """The validation tail is the last int(n * val_fraction) ids, and train the rest, even when
    that is no id at all (``ids[:-0]`` would have left train empty)."""
    full = load_corpus("devil", val_fraction=0.5)
    n = len(full.train) + len(full.val)
    tiny = load_corpus("devil", val_fraction=0.5 / n)
    assert len(tiny.val) == 0 and len(tiny.train) == n


def test_shipped_checkpoint_is_better_on_genesis_than_on_bierce():
    model = load_gpt()
    genesis = model.evaluate(load_corpus("genesis").val[:8000])
    devil = model.evaluate(load_corpus("devil").val[:8000])
    assert genesis < 2.0 and devil > genesis + 0.3


# ----- the torch twin ----------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("with_lora", [False, True])
def test_torch_twin_is_equivalent_after_adam_steps(with_lora):
    pytest.importorskip("torch")
    import loralab.torch.gpt  # noqa: F401  (registers the converters)
    from loralab.torch import check_equivalence, to_numpy, to_torch

    model = small_gpt(tied_head=with_lora)
    if with_lora:
        inject_lora(model, ["q", "k", "v", "o"], r=2, alpha=4, seed=0)
        for _, layer in lora_layers(model):  # B != 0 so every path is exercised from step one
            layer.lora_B.data[:] = np.random.default_rng(1).normal(size=layer.lora_B.shape)
    twin = to_torch(model)
    assert type(to_numpy(twin)) is GPT
    batches = [(tokens((3, 6), seed=s), tokens((3, 6), seed=s + 10)) for s in range(3)]
    # The key bias b_k adds q_i . b_k to every score of row i, which softmax ignores: its exact
    # gradient is zero and both sides compute round-off (about 1e-17 here), which Adam's step
    # lr m / (sqrt(v) + eps) multiplies by lr / eps = 1e6. So its gradient is checked to be zero
    # and its value is left out.
    key_biases = [
        n for n, p in model.named_parameters() if n.endswith("attn.k.bias") and p.requires_grad
    ]
    assert len(key_biases) == (0 if with_lora else 2)  # frozen under LoRA
    report = check_equivalence(model, twin, batches, steps=4, lr=1e-2, zero_grad=key_biases)
    assert report.max_param < 1e-10 and report.max_output < 1e-10 and report.max_grad < 1e-10
    assert report.max_zero_grad < 1e-14  # measured: about 8e-18 in float64
    # Gradients after training, absolutely (atol for the key bias, zero up to round-off).
    x, y = batches[0]
    model.zero_grad()
    model.loss(x, y).backward()
    twin.zero_grad()
    twin.loss(x, y).backward()
    for name, p in twin.named_parameters():
        if p.requires_grad:
            np_grad = dict(model.named_parameters())[name].grad
            np.testing.assert_allclose(np_grad, p.grad.numpy(), rtol=1e-10, atol=1e-13)
