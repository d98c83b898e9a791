"""Several adapters saved and loaded in PEFT's layout ("default" at the top, others in sub-folders
named after them), both ways between loralab (NumPy and torch) and HF PEFT."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from builders import nonzero_B  # noqa: E402

import loralab.lora as L  # noqa: E402
from loralab import nn  # noqa: E402
from loralab.torch import to_torch  # noqa: E402

pytestmark = pytest.mark.torch


def base():
    return nn.MLP([6, 10, 8, 6], seed=0, dtype=np.float64)


def two_adapters():
    """NumPy: "default" (r=2) on 0, 2 and "task" (r=3, rsLoRA) on 0, 4; every B nonzero."""
    model = L.inject_lora(base(), ["0", "2"], r=2, alpha=4, seed=1)
    L.inject_lora(model, ["0", "4"], r=3, alpha=3, use_rslora=True, seed=2, adapter_name="task")
    return nonzero_B(model, seed=3).eval()


def outputs(model, x):
    """{adapter: output with it alone active}, NumPy or torch, as ndarrays."""
    out = {}
    for name in L.list_adapters(model):
        L.set_adapter(model, name)
        y = model(x if isinstance(model, nn.Module) else torch.from_numpy(x))
        out[name] = y.data if isinstance(model, nn.Module) else y.detach().numpy()
    return out


X = np.random.default_rng(4).normal(size=(5, 6))


def test_the_layout_is_peft_s(tmp_path):
    L.save_adapter(two_adapters(), tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "task",
    ]
    config, tensors = L.peft_format.read_adapter(tmp_path / "a" / "task")
    assert config.r == 3 and config.use_rslora and set(config.target_modules) == {"0", "4"}
    assert sorted(tensors) == [
        f"base_model.model.{p}.lora_{m}.weight" for p in ("0", "4") for m in ("A", "B")
    ]
    L.save_adapter(two_adapters(), tmp_path / "a")  # a previous save may be replaced


@pytest.mark.parametrize("twin", [False, True])
def test_round_trip_keeps_every_adapter(tmp_path, twin):
    model = two_adapters()
    want = outputs(model, X)
    L.save_adapter(model, tmp_path)
    fresh = to_torch(base()) if twin else base()
    L.load_adapter(fresh, tmp_path)
    L.load_adapter(fresh, tmp_path / "task", adapter_name="task")
    assert L.list_adapters(fresh) == ["default", "task"] and L.active_adapters(fresh) == ["default"]
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    got = outputs(fresh, X)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14)


def test_a_refused_load_leaves_the_adapters_as_they_were(tmp_path):
    model = two_adapters()
    L.save_adapter(model, tmp_path)
    target = L.inject_lora(base(), ["0"], r=2, seed=0)
    before = {n: p.data.copy() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match="not a valid adapter name"):
        L.load_adapter(target, tmp_path / "task", adapter_name="__base__")
    L.merge_lora(target)
    with pytest.raises(ValueError, match="merged"):
        L.load_adapter(target, tmp_path / "task", adapter_name="task")
    L.unmerge_lora(target)
    with pytest.raises(ValueError, match=r"LoRA layers \['0'\] for adapter 'default'"):
        L.load_adapter(target, tmp_path)  # "default" here is on 0 only; the file's on 0 and 2
    assert L.list_adapters(target) == ["default"]
    for n, p in target.named_parameters():
        np.testing.assert_allclose(p.data, before[n], rtol=0, atol=1e-14)


@pytest.mark.peft
def test_loralab_folder_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = two_adapters()
    want = outputs(model, X)
    L.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(to_torch(base()), tmp_path)
    pm.load_adapter(tmp_path / "task", adapter_name="task")
    pm.eval()
    for name in want:
        pm.set_adapter(name)
        with torch.no_grad():
            got = pm(torch.from_numpy(X)).numpy()
        np.testing.assert_allclose(got, want[name], rtol=1e-12, atol=1e-14)


@pytest.mark.peft
def test_peft_folder_loads_in_loralab(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(
        to_torch(base()), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
    )
    pm.add_adapter("task", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["2", "4"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "task" / "adapter_config.json").is_file()  # PEFT's layout
    model = base()
    L.load_adapter(model, tmp_path)
    L.load_adapter(model, tmp_path / "task", adapter_name="task")
    got = outputs(model, X)
    pm.eval()
    for name in ["default", "task"]:
        pm.set_adapter(name)
        with torch.no_grad():
            want = pm(torch.from_numpy(X)).numpy()
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-14)
