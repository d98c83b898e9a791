"""The LoRA variants in the torch twin (PiSSA, OLoRA, rsLoRA, DoRA), proven equal to the NumPy layer."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import loralab.lora as np_lora  # noqa: E402
from loralab import Tensor, lora, nn  # noqa: E402
from loralab.lora.engine_functions import DoRALinearFn  # noqa: E402
from loralab.torch import (  # noqa: E402
    LoRALinear,
    check_equivalence,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    to_numpy,
    to_torch,
    unmerge_lora,
)
from loralab.torch.variants import DoRALinearFunction  # noqa: E402

pytestmark = pytest.mark.torch

VARIANTS = {
    "kaiming": {},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora+rslora": {"use_dora": True, "use_rslora": True},
    "dora+pissa+dropout": {"use_dora": True, "init": "pissa", "dropout": 0.2},
}
TARGETS = ["0", "2", "4"]


def base(dtype=np.float64):
    return nn.MLP([6, 12, 8, 4], activation="gelu", seed=0, dtype=dtype)


def numpy_lora(dtype=np.float64, **options):
    return np_lora.inject_lora(base(dtype), TARGETS, r=2, alpha=5, seed=1, **options)


def perturbed(model, seed=2):
    """Give every B (and DoRA magnitude) values away from its initialisation, as after training."""
    rng = np.random.default_rng(seed)
    for _, layer in np_lora.lora_layers(model):
        layer.lora_B.data = rng.normal(size=layer.lora_B.shape)
        if layer.use_dora:
            layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, layer.out_features)
    return model


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_twin_trains_like_the_numpy_model(variant):
    np_model = numpy_lora(**VARIANTS[variant])
    twin = to_torch(np_model)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(5, 6)), rng.integers(0, 4, 5)) for _ in range(4)]
    B0 = np_model.get_submodule("2").lora_B.data.copy()
    report = check_equivalence(np_model, twin, batches, steps=20, lr=0.01)
    report.assert_close(1e-10)
    assert report.steps == 20
    assert np.abs(np_model.get_submodule("2").lora_B.data - B0).max() > 1e-3  # it trained


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_built_layers_equal_numpy_built_ones_bit_for_bit(variant, dtype):
    np_model = numpy_lora(dtype, **VARIANTS[variant])
    t_model = inject_lora(to_torch(base(dtype)), TARGETS, r=2, alpha=5, seed=1, **VARIANTS[variant])
    np_params = dict(np_model.named_parameters())
    t_params = dict(t_model.named_parameters())
    assert list(t_params) == list(np_params)
    for name, p in t_params.items():  # A, B, the (residual) base weight, the magnitude
        assert p.requires_grad == np_params[name].requires_grad, name
        np.testing.assert_array_equal(p.detach().numpy(), np_params[name].data, err_msg=name)
    for (_, t), (_, m) in zip(lora_layers(t_model), np_lora.lora_layers(np_model)):
        assert (t.init, t.use_dora, t.use_rslora, t.scaling) == (
            m.init,
            m.use_dora,
            m.use_rslora,
            m.scaling,
        )
    x = rand(3, 6).astype(dtype)
    with torch.no_grad():
        y = t_model.eval()(torch.tensor(x)).numpy()
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(y, base(dtype).eval()(x).data, rtol=rtol, atol=rtol)


def test_bad_init_is_refused_as_by_the_numpy_layer():
    with pytest.raises(ValueError) as t_err:
        LoRALinear(torch.nn.Linear(4, 4), r=2, init="svd")
    with pytest.raises(ValueError) as np_err:
        lora.LoRALinear(nn.Linear(4, 4, seed=0), r=2, init="svd")
    assert str(t_err.value) == str(np_err.value)
    assert "pissa" in str(t_err.value)


@pytest.mark.parametrize("variant", ["pissa", "olora", "dora+pissa+dropout"])
def test_conversion_copies_a_residual_base_without_splitting_it_again(variant):
    np_model = perturbed(numpy_lora(**VARIANTS[variant]))
    back = to_numpy(to_torch(np_model))
    for (_, m), (_, b) in zip(np_lora.lora_layers(np_model), np_lora.lora_layers(back)):
        assert (b.init, b.use_dora) == (m.init, m.use_dora)
    back_params = dict(back.named_parameters())
    for name, p in np_model.named_parameters():
        np.testing.assert_array_equal(back_params[name].data, p.data, err_msg=name)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_dora_custom_function_and_plain_autograd_give_the_same_gradients(with_dropout):
    dropout = 0.3 if with_dropout else 0.0
    np_model = perturbed(numpy_lora(use_dora=True, dropout=dropout))
    runs = []
    for custom in (True, False):
        twin = to_torch(np_model)
        for _, layer in lora_layers(twin):
            layer.use_custom_backward = custom
            layer.mask_rng = np.random.default_rng(5)  # the same masks in both runs
        x = torch.tensor(rand(2, 3, 6), requires_grad=True)
        twin.train()(x).square().sum().backward()
        grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
        runs.append((x.grad, grads))
    (dx1, g1), (dx2, g2) = runs
    assert sorted(g1) == sorted(g2) and "2.lora_magnitude_vector" in g1
    np.testing.assert_allclose(dx1.numpy(), dx2.numpy(), rtol=1e-12, atol=1e-12)
    for name in g1:
        assert g1[name].abs().max() > 0, name
        np.testing.assert_allclose(g1[name].numpy(), g2[name].numpy(), rtol=1e-12, atol=1e-12)


def dora_inputs(with_mask):
    """x, W0, b, A, B (nonzero), m and a mask, as float64 tensors."""
    arrays = [rand(4, 5), rand(3, 5, seed=1), rand(3, seed=2), rand(2, 5, seed=3)]
    arrays += [rand(3, 2, seed=4), rand(3, seed=5) ** 2 + 0.5]
    mask = (np.random.default_rng(6).random((4, 5)) > 0.3) / 0.7 if with_mask else None
    tensors = [torch.tensor(a) for a in arrays]
    return tensors, None if mask is None else torch.tensor(mask)


@pytest.mark.parametrize("with_mask", [False, True])
def test_dora_function_passes_gradcheck_for_x_b_and_m(with_mask):
    (x, W0, b, A, B, m), mask = dora_inputs(with_mask)
    assert B.abs().min() > 0
    for t in (x, b, m):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, b, m: DoRALinearFunction.apply(x, W0, b, A, B, m, 0.7, mask), (x, b, m)
    )


@pytest.mark.parametrize("with_mask", [False, True])
def test_dora_function_holds_the_norm_constant_for_A_and_B(with_mask):
    """dA and dB equal autograd's with ||W0 + s B A|| detached; the full derivative differs."""
    (x, W0, b, A, B, m), mask = dora_inputs(with_mask)
    for t in (A, B):
        t.requires_grad_(True)

    def detached_norm(A, B):
        norm = torch.linalg.norm(W0 + 0.7 * (B @ A), dim=1).detach()
        xd = x if mask is None else x * mask
        y = m / norm * (xd @ W0.T + 0.7 * (xd @ A.T) @ B.T) + b
        return y if mask is None else y + (x - xd) @ W0.T

    dy = torch.tensor(rand(4, 3, seed=7))
    fused = torch.autograd.grad(DoRALinearFunction.apply(x, W0, b, A, B, m, 0.7, mask), (A, B), dy)
    plain = torch.autograd.grad(detached_norm(A, B), (A, B), dy)
    for got, want in zip(fused, plain):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
    from torch.autograd.gradcheck import GradcheckError

    with pytest.raises(GradcheckError):  # the design, made visible
        torch.autograd.gradcheck(
            lambda B: DoRALinearFunction.apply(x, W0, b, A, B, m, 0.7, mask), (B,)
        )


@pytest.mark.parametrize("variant", ["dora", "dora+rslora", "pissa"])
def test_merge_in_torch_equals_merge_in_numpy(variant):
    np_model = perturbed(numpy_lora(**VARIANTS[variant]))
    twin = to_torch(np_model)
    x = rand(3, 6)
    before = np_model.eval()(x).data.copy()
    merge_lora(twin)
    np_lora.merge_lora(np_model)
    merged = to_numpy(twin)
    merged_params = dict(merged.named_parameters())
    for name, p in np_model.named_parameters():
        np.testing.assert_allclose(merged_params[name].data, p.data, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        np.testing.assert_allclose(twin.eval()(torch.tensor(x)).numpy(), before, rtol=1e-12)
    np_lora.unmerge_lora(merged)  # the norm kept by the torch merge travels with the conversion
    np.testing.assert_allclose(merged.eval()(x).data, before, rtol=1e-12)
    unmerge_lora(twin)
    unmerged = to_torch(np_lora.unmerge_lora(np_model))
    for name, p in twin.named_parameters():
        np.testing.assert_allclose(
            p.detach().numpy(),
            unmerged.get_parameter(name).detach().numpy(),
            rtol=1e-12,
            atol=1e-14,
        )


def test_merged_numpy_dora_layer_unmerges_after_to_torch():
    np_model = np_lora.merge_lora(perturbed(numpy_lora(use_dora=True)))
    twin = unmerge_lora(to_torch(np_model))
    np_lora.unmerge_lora(np_model)
    for name, p in np_model.named_parameters():
        np.testing.assert_allclose(
            twin.get_parameter(name).detach().numpy(), p.data, rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_adapter_moves_between_torch_and_numpy(tmp_path, use_rslora):
    twin = inject_lora(
        to_torch(base()), TARGETS, r=2, alpha=5, use_dora=True, use_rslora=use_rslora
    )
    with torch.no_grad():
        for i, (_, layer) in enumerate(lora_layers(twin)):
            layer.lora_B.copy_(torch.tensor(rand(*layer.lora_B.shape, seed=i)))
            layer.lora_magnitude_vector.mul_(1.3)
    save_adapter(twin, tmp_path / "torch")
    config = json.loads((tmp_path / "torch" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is use_rslora
    np_model = np_lora.load_adapter(base(), tmp_path / "torch").eval()
    assert all(layer.use_dora for _, layer in np_lora.lora_layers(np_model))
    x = rand(3, 6)
    with torch.no_grad():
        expected = twin.eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np_model(x).data, expected, rtol=1e-12)
    np_lora.save_adapter(np_model, tmp_path / "np")  # and back into a fresh torch base
    again = load_adapter(to_torch(base()), tmp_path / "np").eval()
    assert all(layer.use_dora for _, layer in lora_layers(again))
    assert [n for n, p in again.named_parameters() if p.requires_grad] == [
        f"{t}.{p}" for t in TARGETS for p in ("lora_A", "lora_B", "lora_magnitude_vector")
    ]
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(x)).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="use_dora"):  # an existing plain LoRA layer refuses m
        load_adapter(inject_lora(to_torch(base()), TARGETS, r=2), tmp_path / "np")


@pytest.mark.parametrize("with_mask", [False, True])
def test_torch_dora_function_matches_numpy(with_mask):
    arrays = [
        rand(2, 3, 5),
        rand(4, 5, seed=1),
        rand(4, seed=2),
        rand(2, 5, seed=3),
        rand(4, 2, seed=4),
        rand(4, seed=5) ** 2 + 0.5,
    ]
    mask = (np.random.default_rng(6).random((2, 3, 5)) > 0.3) / 0.7 if with_mask else None
    dy = rand(2, 3, 4, seed=7)
    np_in = [Tensor(a, requires_grad=i != 1) for i, a in enumerate(arrays)]
    y = DoRALinearFn.apply(*np_in, scaling=0.7, mask=mask)
    y.backward(dy)
    t_in = [torch.tensor(a, requires_grad=i != 1) for i, a in enumerate(arrays)]
    t_mask = None if mask is None else torch.tensor(mask)
    ty = DoRALinearFunction.apply(*t_in, 0.7, t_mask)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(ty.detach().numpy(), y.data, rtol=1e-12, atol=1e-12)
    for a, t in zip(np_in, t_in):
        if a.requires_grad:
            np.testing.assert_allclose(t.grad.numpy(), a.grad, rtol=1e-10, atol=1e-12)
