"""save_adapter / load_adapter on torch models: one PEFT-format implementation for both worlds."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import loralab.lora as np_lora  # noqa: E402
from loralab import nn  # noqa: E402
from loralab.torch import (  # noqa: E402
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    save_adapter,
    to_torch,
)

pytestmark = pytest.mark.torch


def base(dtype=np.float64):
    return nn.MLP([6, 12, 8, 4], seed=0, dtype=dtype)


def trained_numpy(use_rslora=False):
    model = np_lora.inject_lora(base(), ["0", "4"], r=2, alpha=5, use_rslora=use_rslora, seed=1)
    rng = np.random.default_rng(2)
    for _, layer in np_lora.lora_layers(model):
        layer.lora_B.data = rng.normal(size=layer.lora_B.shape)
    return model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_numpy_adapter_loads_into_torch_base_and_back(tmp_path, use_rslora):
    model = trained_numpy(use_rslora)
    np_lora.save_adapter(model, tmp_path / "np")
    twin = load_adapter(to_torch(base()), tmp_path / "np").eval()
    assert [n for n, _ in lora_layers(twin)] == ["0", "4"]
    assert all(
        isinstance(m, LoRALinear) and m.use_rslora == use_rslora for _, m in lora_layers(twin)
    )
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == [
        "0.lora_A",
        "0.lora_B",
        "4.lora_A",
        "4.lora_B",
    ]
    x = np.random.default_rng(0).normal(size=(3, 6))
    np.testing.assert_allclose(twin(torch.tensor(x)).detach().numpy(), model(x).data, rtol=1e-12)
    save_adapter(twin, tmp_path / "torch")
    again = np_lora.load_adapter(base(), tmp_path / "torch").eval()
    np.testing.assert_array_equal(
        again(x).data, np_lora.load_adapter(base(), tmp_path / "np").eval()(x).data
    )
    assert (tmp_path / "np" / "adapter_config.json").read_text() == (
        tmp_path / "torch" / "adapter_config.json"
    ).read_text()


def test_load_into_existing_torch_adapters_keeps_dtype_and_checks_shapes(tmp_path):
    np_lora.save_adapter(trained_numpy(), tmp_path)
    twin = inject_lora(to_torch(base(np.float32)), ["0", "4"], r=2, seed=0)
    load_adapter(twin, tmp_path)
    state = lora_state_dict(twin)
    assert state["0.lora_B"].dtype == torch.float32
    np.testing.assert_allclose(
        state["4.lora_B"].numpy(), np_lora.lora_state_dict(trained_numpy())["4.lora_B"], rtol=1e-6
    )
    wrong_rank = inject_lora(to_torch(base()), ["0", "4"], r=3, seed=0)
    with pytest.raises(ValueError, match=r"has shape \(2, 6\) but the model expects \(3, 6\)"):
        load_adapter(wrong_rank, tmp_path)
    with pytest.raises(ValueError, match="has no Linear module '4'"):
        load_adapter(to_torch(nn.MLP([6, 12], seed=0)), tmp_path)


def test_save_needs_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(to_torch(base()), tmp_path)
