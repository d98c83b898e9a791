"""Adapters move between loralab (NumPy and torch) and HF PEFT, in both directions."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import loralab.lora as np_lora  # noqa: E402
from loralab import nn  # noqa: E402
from loralab.torch import load_adapter, to_torch  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.peft]

RTOL = {np.float64: 1e-10, np.float32: 1e-5}


def base(dtype):
    return nn.MLP([6, 12, 8, 4], activation="gelu", seed=0, dtype=dtype)


def peft_output(peft_model, x):
    peft_model.eval()
    with torch.no_grad():
        return peft_model(torch.tensor(x)).numpy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_loralab_adapter_loads_in_peft(tmp_path, dtype, use_rslora):
    model = np_lora.inject_lora(
        base(dtype), ["0", "4"], r=2, alpha=5, use_rslora=use_rslora, seed=1
    )
    rng = np.random.default_rng(2)
    for _, layer in np_lora.lora_layers(model):
        layer.lora_B.data = rng.normal(size=layer.lora_B.shape).astype(dtype)
    np_lora.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(to_torch(base(dtype)), tmp_path)
    assert loaded.peft_config["default"].use_rslora == use_rslora
    scaling = loaded.base_model.model[0].scaling["default"]
    assert scaling == pytest.approx(5 / np.sqrt(2) if use_rslora else 5 / 2)
    x = rng.normal(size=(5, 6)).astype(dtype)
    np.testing.assert_allclose(peft_output(loaded, x), model.eval()(x).data, rtol=RTOL[dtype])


def train_peft(dtype, steps=5, **config):
    torch.manual_seed(0)  # PEFT initialises A from torch's global generator
    model = peft.get_peft_model(
        to_torch(base(dtype)),
        peft.LoraConfig(r=3, lora_alpha=7, target_modules=["2", "4"], **config),
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=model.base_model.model[0].weight.dtype)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_loralab(tmp_path, dtype, use_rslora):
    trained = train_peft(dtype, use_rslora=use_rslora)
    assert trained.base_model.model[2].lora_B["default"].weight.abs().max() > 0  # it trained
    trained.save_pretrained(tmp_path)
    model = np_lora.load_adapter(base(dtype), tmp_path).eval()
    assert [n for n, _ in np_lora.lora_layers(model)] == ["2", "4"]
    assert all(layer.use_rslora == use_rslora for _, layer in np_lora.lora_layers(model))
    x = np.random.default_rng(3).normal(size=(5, 6)).astype(dtype)
    np.testing.assert_allclose(model(x).data, peft_output(trained, x), rtol=RTOL[dtype])
    twin = load_adapter(to_torch(base(dtype)), tmp_path).eval()  # and into the torch twin
    with torch.no_grad():
        np.testing.assert_allclose(
            twin(torch.tensor(x)).numpy(), peft_output(trained, x), rtol=RTOL[dtype]
        )


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"bias": "lora_only"}, "bias"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["0"]}, "modules_to_save"),
    ],
)
def test_unsupported_features_are_refused_naming_the_field(tmp_path, config, field):
    train_peft(np.float64, steps=1, **config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field] not in (None, "none")
    for model in (base(np.float64), to_torch(base(np.float64))):
        with pytest.raises(ValueError, match=f"unsupported {field}="):
            load_adapter(model, tmp_path)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_peft_dora_adapter_loads_in_the_torch_twin_and_numpy(tmp_path, dtype):
    trained = train_peft(dtype, use_dora=True)
    trained.save_pretrained(tmp_path)
    x = np.random.default_rng(3).normal(size=(5, 6)).astype(dtype)
    twin = load_adapter(to_torch(base(dtype)), tmp_path).eval()
    layer = twin[2]
    assert layer.use_dora and layer.lora_magnitude_vector.dtype == torch.tensor(x).dtype
    peft_m = trained.base_model.model[2].lora_magnitude_vector["default"].weight
    np.testing.assert_array_equal(layer.lora_magnitude_vector.detach().numpy(), peft_m.detach())
    with torch.no_grad():
        np.testing.assert_allclose(
            twin(torch.tensor(x)).numpy(), peft_output(trained, x), rtol=RTOL[dtype]
        )
    model = np_lora.load_adapter(base(dtype), tmp_path).eval()
    np.testing.assert_allclose(model(x).data, peft_output(trained, x), rtol=RTOL[dtype])


NAMES = ["0", "2", "4", "net.2", "blocks.0.attn.q", "blocks.10.attn.q", "q", "xq", "a.b.c"]
KEYS = ["2", "^2$", "q", "^q$", r"blocks\.[01]\.attn\.q", "attn.q", "c", "b.c", ".*", "0|4"]


def test_pattern_keys_follow_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    from loralab.lora.config import pattern_key

    for name in NAMES:
        for keys in ([k] for k in KEYS):
            assert (pattern_key(keys, name) or name) == get_pattern_key(keys, name), (keys, name)
        assert (pattern_key(KEYS, name) or name) == get_pattern_key(KEYS, name), name


def test_peft_regex_rank_and_alpha_patterns_load_in_loralab(tmp_path):
    trained = train_peft(np.float64, rank_pattern={"^4$": 1}, alpha_pattern={"^2$": 3})
    assert trained.base_model.model[4].r["default"] == 1  # PEFT applied the regex
    trained.save_pretrained(tmp_path)
    x = np.random.default_rng(3).normal(size=(5, 6))
    model = np_lora.load_adapter(base(np.float64), tmp_path).eval()
    layers = dict(np_lora.lora_layers(model))
    assert (layers["2"].r, layers["2"].scaling) == (3, 1.0)
    assert (layers["4"].r, layers["4"].scaling) == (1, 7.0)
    np.testing.assert_allclose(model(x).data, peft_output(trained, x), rtol=1e-10)
    twin = load_adapter(to_torch(base(np.float64)), tmp_path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            twin(torch.tensor(x)).numpy(), peft_output(trained, x), rtol=1e-10
        )


def test_a_peft_adapter_with_r_above_min_in_out_is_refused_whole(tmp_path):
    """PEFT accepts r > min(in, out); loralab refuses it (the update's rank cannot exceed
    min(in, out)), before touching any layer, on both backends."""
    train_peft(np.float64, steps=1, rank_pattern={"^4$": 6}).save_pretrained(tmp_path)
    for model in (base(np.float64), to_torch(base(np.float64))):
        before = [(n, type(m).__name__) for n, m in model.named_modules()]
        with pytest.raises(ValueError, match=r"r=6 exceeds min\(in_features, out_features\)=4"):
            load_adapter(model, tmp_path)
        assert [(n, type(m).__name__) for n, m in model.named_modules()] == before


def test_a_peft_pissa_niter_adapter_is_refused_by_name(tmp_path):
    train_peft(np.float32, steps=1, init_lora_weights="pissa_niter_2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_2'"):
        load_adapter(base(np.float64), tmp_path)
