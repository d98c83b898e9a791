"""The torch LoRAEmbedding: hand backward = torch autograd = NumPy, the twin trains alike, PEFT both ways."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

import loralab.lora as np_lora  # noqa: E402
from loralab.lora.embedding_layer import LoRAEmbeddingFn  # noqa: E402
from loralab.models import GPT  # noqa: E402
from loralab.nn import Embedding  # noqa: E402
from loralab.tensor import Tensor  # noqa: E402
from loralab.torch import (  # noqa: E402
    LoRAEmbedding,
    LoRAEmbeddingFunction,
    check_equivalence,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    to_numpy,
    to_torch,
    unmerge_lora,
)

pytestmark = pytest.mark.torch

VOCAB = 13
RTOL = {np.float64: 1e-10, np.float32: 1e-5}


def gpt(dtype=np.float64, seed=0):
    return GPT(VOCAB, context_length=6, d_model=8, n_layers=1, n_heads=2, seed=seed, dtype=dtype)


def tokens(seed=0, shape=(3, 6)):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape)


def lora_gpt(dtype=np.float64, targets=("tok_emb", "q")):
    """A NumPy GPT with adapters whose A and B are both nonzero (as after training)."""
    model = np_lora.inject_lora(gpt(dtype), list(targets), r=2, alpha=3, seed=0)
    rng = np.random.default_rng(1)
    for _, layer in np_lora.lora_layers(model):
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.data = (0.3 * rng.normal(size=p.shape)).astype(dtype)
    return model


# ----- the Function -------------------------------------------------------------------------------
@pytest.mark.parametrize("table_trains", [False, True])
def test_function_passes_torch_gradcheck(table_trains):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 3, 4), generator=gen)
    E = torch.randn(VOCAB, 5, generator=gen, dtype=torch.float64, requires_grad=table_trains)
    A = torch.randn(3, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda E, A, B: LoRAEmbeddingFunction.apply(ids, E, A, B, 1.3), (E, A, B)
    )


def test_function_equals_numpy_and_plain_autograd():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCAB, size=(4, 5))
    E, A, B = rng.normal(size=(VOCAB, 6)), rng.normal(size=(2, VOCAB)), rng.normal(size=(6, 2))
    c = rng.normal(size=(4, 5, 6))
    nA, nB = Tensor(A.copy(), requires_grad=True), Tensor(B.copy(), requires_grad=True)
    (LoRAEmbeddingFn.apply(ids, Tensor(E), nA, nB, scaling=0.7) * Tensor(c)).sum().backward()
    results = []
    for custom in (True, False):
        base = torch.nn.Embedding(VOCAB, 6, dtype=torch.float64)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(E))
        layer = LoRAEmbedding(base, r=2, alpha=1.4, use_custom_backward=custom, seed=0)
        with torch.no_grad():
            layer.lora_embedding_A.copy_(torch.from_numpy(A))
            layer.lora_embedding_B.copy_(torch.from_numpy(B))
        h = layer(torch.from_numpy(ids))
        (h * torch.from_numpy(c)).sum().backward()
        results.append((h, layer.lora_embedding_A.grad, layer.lora_embedding_B.grad))
        assert base.weight.grad is None
    for h, dA, dB in results:
        np.testing.assert_allclose(h.detach().numpy(), (E + 0.7 * (B @ A).T)[ids], rtol=1e-12)
        np.testing.assert_allclose(dA.numpy(), nA.grad, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dB.numpy(), nB.grad, rtol=1e-12, atol=1e-14)


def test_layer_starts_as_the_numpy_layer_and_refuses_bad_input():
    layer = np_lora.LoRAEmbedding(Embedding(VOCAB, 8, seed=0), r=2, seed=4)  # float32
    fresh = LoRAEmbedding(torch.nn.Embedding(VOCAB, 8), r=2, seed=4)
    assert fresh.lora_embedding_B.dtype == torch.float32
    np.testing.assert_array_equal(
        fresh.lora_embedding_B.detach().numpy(), layer.lora_embedding_B.data
    )
    assert torch.all(fresh.lora_embedding_A == 0)
    with pytest.raises(TypeError, match="expected integer token ids, got dtype torch.float32"):
        fresh(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"token id 13 outside \[0, 13\)"):
        fresh(torch.tensor([13]))
    with pytest.raises(ValueError, match="padding_idx=0 is not supported"):
        LoRAEmbedding(torch.nn.Embedding(VOCAB, 8, padding_idx=0), r=2)
    with pytest.raises(TypeError, match="base must be a torch.nn.Embedding, got Linear"):
        LoRAEmbedding(torch.nn.Linear(3, 4))


# ----- the twin -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_twin_converts_both_ways_and_trains_alike_over_adam_steps(dtype):
    model = lora_gpt(dtype)
    twin = to_torch(model)
    assert isinstance(twin.tok_emb, LoRAEmbedding) and count_parameters(
        twin
    ) == np_lora.count_parameters(model)
    assert [n for n, _ in lora_layers(twin)] == ["tok_emb", "blocks.0.attn.q"]
    back = to_numpy(twin)
    assert isinstance(back.tok_emb, np_lora.LoRAEmbedding)
    np.testing.assert_array_equal(back(tokens()).data, model(tokens()).data)
    batches = [(tokens(s), tokens(s + 10)) for s in range(3)]
    report = check_equivalence(model, twin, batches, steps=8, lr=1e-2)
    report.assert_close(RTOL[dtype])
    assert report.steps == 8 and np.any(model.tok_emb.lora_embedding_A.data != 0)


def test_twin_injection_merge_and_unmerge():
    model = lora_gpt()
    twin = inject_lora(to_torch(gpt()), ["tok_emb", "q"], r=2, alpha=3, seed=0)
    np.testing.assert_array_equal(
        twin.tok_emb.lora_embedding_B.detach().numpy(),
        np_lora.inject_lora(
            gpt(), ["tok_emb", "q"], r=2, alpha=3, seed=0
        ).tok_emb.lora_embedding_B.data,
    )
    twin = to_torch(model)
    x = torch.from_numpy(tokens())
    E0 = twin.tok_emb.weight.detach().clone()
    with torch.no_grad():
        emb = twin.tok_emb(x)
        merge_lora(twin)
        np.testing.assert_allclose(twin.tok_emb(x).numpy(), emb.numpy(), rtol=1e-12, atol=1e-14)
        unmerge_lora(twin)
    torch.testing.assert_close(twin.tok_emb.weight, E0, rtol=0, atol=1e-15)


# ----- PEFT ---------------------------------------------------------------------------------------
def assert_close(got, want, dtype):
    """Equal to the dtype's round-off, measured against the largest logit (tiny logits carry
    float32 round-off of the large ones)."""
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * np.abs(want).max())


def peft_output(peft_model, x):
    peft_model.eval()
    with torch.no_grad():
        return peft_model(torch.from_numpy(x)).numpy()


@pytest.mark.peft
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loralab_adapter_loads_in_peft(tmp_path, dtype):
    peft = pytest.importorskip("peft")
    model = lora_gpt(dtype).eval()
    np_lora.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(to_torch(gpt(dtype)), tmp_path)
    emb = loaded.base_model.model.tok_emb
    assert type(emb).__name__ == "Embedding" and emb.scaling["default"] == 1.5
    np.testing.assert_array_equal(
        emb.lora_embedding_A["default"].detach().numpy(), model.tok_emb.lora_embedding_A.data
    )
    x = tokens(5)
    assert_close(peft_output(loaded, x), model(x).data, dtype)


@pytest.mark.peft
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_peft_adapter_loads_in_loralab_and_the_twin(tmp_path, dtype):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)  # PEFT draws B ~ N(0, 1) and q's A from torch's global generator
    trained = peft.get_peft_model(
        to_torch(gpt(dtype)), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["tok_emb", "q"])
    )
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=0.05)
    for s in range(4):
        loss = trained.base_model.model.loss(
            torch.from_numpy(tokens(s)), torch.from_numpy(tokens(s + 9))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (
        trained.base_model.model.tok_emb.lora_embedding_A["default"].abs().max() > 0
    )  # it trained
    trained.save_pretrained(tmp_path)
    x = tokens(7)
    model = np_lora.load_adapter(gpt(dtype), tmp_path).eval()
    assert isinstance(model.tok_emb, np_lora.LoRAEmbedding) and model.tok_emb.scaling == 2.5
    assert_close(model(x).data, peft_output(trained, x), dtype)
    twin = load_adapter(to_torch(gpt(dtype)), tmp_path).eval()
    assert isinstance(twin.tok_emb, LoRAEmbedding)
    with torch.no_grad():
        assert_close(twin(torch.from_numpy(x)).numpy(), peft_output(trained, x), dtype)


# ----- named adapters and mixed batches --------------------------------------------------------------
def test_function_with_rows_passes_torch_gradcheck():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 4), generator=gen)
    E = torch.randn(VOCAB, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda E, A, B: LoRAEmbeddingFunction.apply(ids, E, A, B, 0.9, rows), (E, A, B)
    )


@pytest.mark.parametrize("custom", [True, False])
def test_twin_mixed_batch_and_switches_equal_numpy(custom):
    model = lora_gpt()
    np_lora.inject_lora(model, ["q"], r=2, seed=1, adapter_name="b")
    twin = to_torch(model)
    for _, layer in lora_layers(twin):
        layer.use_custom_backward = custom
    assert twin.tok_emb.adapter_names == ["default"]
    x = tokens(4)
    names = ["b", "default", "__base__"]
    with np_lora.mixed_batch(model, names), np_lora.mixed_batch(twin, names):
        want = model(x).data
        got = twin(torch.from_numpy(x))
        got.square().sum().backward()
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    A_grad = twin.tok_emb.lora_embedding_A.grad.numpy()
    assert np.all(A_grad[:, np.setdiff1d(np.arange(VOCAB), x[1])] == 0)  # only row 1 adds it
    np_lora.set_adapter(twin, "b")
    with torch.no_grad():
        E = twin.tok_emb.weight
        torch.testing.assert_close(twin.tok_emb(torch.from_numpy(x)), E[torch.from_numpy(x)])


@pytest.mark.peft
def test_mixed_batch_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    trained = peft.get_peft_model(
        to_torch(gpt()), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["tok_emb", "q"])
    )
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    trained.save_pretrained(tmp_path)
    model = np_lora.load_adapter(gpt(), tmp_path).eval()
    x = tokens(8)
    names = ["default", "__base__", "default"]
    trained.eval()
    with torch.no_grad():
        want = trained(torch.from_numpy(x), adapter_names=names).numpy()
    with np_lora.mixed_batch(model, names):
        np.testing.assert_allclose(model(x).data, want, rtol=1e-10, atol=1e-12)
    with trained.disable_adapter(), torch.no_grad():
        base_out = trained(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(want[1], base_out[1], rtol=1e-12)  # "__base__": no adapter
    assert np.abs(want[0] - base_out[0]).max() > 1e-3  # "default": the adapters change the row
