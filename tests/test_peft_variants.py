"""The LoRA variants against HF PEFT: DoRA's output and merge, PEFT's DoRA adapters, PiSSA and OLoRA."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from test_torch_variants import base, numpy_lora, perturbed  # noqa: E402
from test_variants import dora_model, rand  # noqa: E402

from loralab.lora import inject_lora, load_adapter, lora_layers, merge_lora  # noqa: E402
from loralab.nn import MLP  # noqa: E402
from loralab.torch import save_adapter, to_torch  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.peft]


def _peft_twin(np_model, double=True, **config):
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    net = net.double() if double else net
    with torch.no_grad():
        for i in ("0", "2"):
            layer = np_model.get_submodule(i)
            layer = getattr(layer, "base", layer)
            net[int(i)].weight.copy_(torch.tensor(layer.weight.data))
            net[int(i)].bias.copy_(torch.tensor(layer.bias.data))
    return peft.get_peft_model(net, peft.LoraConfig(target_modules=["0", "2"], **config))


def test_dora_matches_peft():
    model = dora_model()
    # PEFT's magnitude starts at the base weight's row norms: build it on the pre-injection weights
    peft_model = _peft_twin(model, r=2, lora_alpha=4, use_dora=True)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            target = peft_model.base_model.model[int(name)]
            target.lora_A["default"].weight.copy_(torch.tensor(layer.lora_A.data))
            target.lora_B["default"].weight.copy_(torch.tensor(layer.lora_B.data))
            target.lora_magnitude_vector["default"].weight.copy_(
                torch.tensor(layer.lora_magnitude_vector.data)
            )
    x = rand(6, 8, seed=11)
    peft_model.eval()
    expected = peft_model(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(model(x).data, expected, rtol=1e-10, atol=1e-12)
    peft_model.merge_and_unload()
    merge_lora(model)
    np.testing.assert_allclose(model(x).data, expected, rtol=1e-10, atol=1e-12)


def test_peft_dora_adapter_loads_into_loralab(tmp_path):
    model = dora_model()
    peft_model = _peft_twin(model, r=2, lora_alpha=4, use_dora=True)
    with torch.no_grad():
        for name, _ in lora_layers(model):
            target = peft_model.base_model.model[int(name)]
            target.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(0))
            target.lora_magnitude_vector["default"].weight.mul_(1.3)
    peft_model.save_pretrained(str(tmp_path))
    fresh = load_adapter(MLP([8, 16, 4], seed=0, dtype=np.float64), tmp_path)
    x = rand(6, 8, seed=11)
    peft_model.eval()
    expected = peft_model(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(fresh(x).data, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_match_peft(init):
    model = MLP([8, 16, 4], seed=0, dtype=np.float64)
    peft_model = _peft_twin(model, double=False, r=3, lora_alpha=6, init_lora_weights=init)
    inject_lora(model, ["0", "2"], r=3, alpha=6, init=init, seed=0)
    for name, layer in lora_layers(model):
        target = peft_model.base_model.model[int(name)]
        A = target.lora_A["default"].weight.detach().numpy()
        B = target.lora_B["default"].weight.detach().numpy()
        W = target.base_layer.weight.detach().numpy()
        # PEFT computes in float32; PiSSA's singular vectors are defined up to sign, their products are not
        np.testing.assert_allclose(B @ A, layer.lora_B.data @ layer.lora_A.data, atol=2e-5)
        np.testing.assert_allclose(W, layer.base.weight.data, atol=2e-5)
        if init == "olora":
            np.testing.assert_allclose(A, layer.lora_A.data, atol=2e-5)
            np.testing.assert_allclose(B, layer.lora_B.data, atol=2e-5)


def test_peft_loads_a_dora_adapter_saved_from_a_torch_model(tmp_path):
    twin = to_torch(perturbed(numpy_lora(use_dora=True)))
    save_adapter(twin, tmp_path)
    loaded = peft.PeftModel.from_pretrained(to_torch(base()), tmp_path).eval()
    assert loaded.peft_config["default"].use_dora
    x = torch.tensor(rand(5, 6))
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(x).numpy(), twin.eval()(x).numpy(), rtol=1e-10, atol=1e-12
        )


def _peft_groups(optimizer, model):
    """PEFT's optimizer groups as (parameter names in loralab's spelling, lr), empty groups left out."""
    names = {id(p): n for n, p in model.named_parameters()}

    def ours(name):
        name = name.removeprefix("base_model.model.").removesuffix(".weight")
        return name.removesuffix(".default")

    return [
        ([ours(names[id(p)]) for p in g["params"]], g["lr"])
        for g in optimizer.param_groups
        if g["params"]
    ]


@pytest.mark.parametrize(("targets", "options"), [(["0", "1"], {}), (["1"], {"use_dora": True})])
def test_loraplus_groups_equal_peft_create_loraplus_optimizer(targets, options):
    """Same groups, same order, same learning rates as PEFT's LoRA+ optimizer, on an Embedding
    + Linear model (the embedding adapter in its own group) and with DoRA (m goes with B)."""
    from peft.optimizers import create_loraplus_optimizer

    from loralab.lora.variants import loraplus_param_groups
    from loralab.torch import inject_lora as torch_inject

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 4))

    config = peft.LoraConfig(target_modules=targets, r=2, lora_alpha=4, **options)
    peft_model = peft.get_peft_model(net(), config)
    expected = _peft_groups(
        create_loraplus_optimizer(
            peft_model,
            torch.optim.AdamW,
            lr=1e-3,
            loraplus_lr_ratio=8,
            loraplus_lr_embedding=2e-4,
        ),
        peft_model,
    )
    ours = torch_inject(net(), targets, r=2, alpha=4, seed=0, **options)
    names = {id(p): n for n, p in ours.named_parameters()}
    groups = loraplus_param_groups(ours, lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=2e-4)
    assert [([names[id(p)] for p in g["params"]], g["lr"]) for g in groups] == expected
    torch.optim.AdamW(groups, lr=1e-3)  # torch accepts them
