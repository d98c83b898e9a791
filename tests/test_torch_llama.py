"""The PyTorch twin of the LLaMA model (loralab/torch/llama.py): same logits, same LoRA training."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loralab.lora import LoraConfig, inject_lora, lora_layers  # noqa: E402
from loralab.models.llama import Llama, LlamaConfig  # noqa: E402
from loralab.torch import check_equivalence, to_numpy, to_torch  # noqa: E402
from loralab.torch.llama import TorchLlama  # noqa: E402

VOCAB = 53


def tiny(tie: bool, seed: int = 0) -> Llama:
    config = LlamaConfig.from_hf(
        dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rope_theta=100.0,
            tie_word_embeddings=tie,
        )
    )
    model = Llama(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():  # norms away from 1, a smaller table: a fair test
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.data = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif name == "model.embed_tokens.weight":
            p.data *= 0.5
    return model


IDS = np.random.default_rng(0).integers(0, VOCAB, (3, 9))


@pytest.mark.parametrize("tie", [False, True])
def test_twin_logits_equal_and_convert_back(tie):
    model = tiny(tie)
    twin = to_torch(model)
    assert isinstance(twin, TorchLlama)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
    expected = model(IDS).data
    with torch.no_grad():
        got = twin(torch.tensor(IDS)).numpy()
    assert np.abs(got - expected).max() < 1e-12
    back = to_numpy(twin)
    assert isinstance(back, Llama)
    np.testing.assert_array_equal(back(IDS).data, expected)


@pytest.mark.parametrize("tie", [False, True])
def test_lora_training_on_q_and_v_is_equivalent_over_adam_steps(tie):
    model = tiny(tie)
    inject_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4), seed=1)
    rng = np.random.default_rng(2)
    for _, layer in lora_layers(model):  # a nonzero B, so that every gradient is exercised
        layer.lora_B.data = 0.1 * rng.standard_normal(layer.lora_B.shape)
    twin = to_torch(model)
    ids = rng.integers(0, VOCAB, (4, 4, 9))
    batches = [(x[:, :-1], x[:, 1:]) for x in ids]
    report = check_equivalence(model, twin, batches, steps=4, lr=1e-2)
    assert report.max_difference < 1e-10, str(report)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 8 and all(".self_attn.q_proj." in n or ".v_proj." in n for n in names)
