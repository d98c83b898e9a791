"""Tests for loralab.torch.convert: to_torch / to_numpy and the converter registry."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from builders import every_layer_model  # noqa: E402

from loralab import lora, nn  # noqa: E402
from loralab.lora import inject_lora, merge_lora  # noqa: E402
from loralab.torch import (  # noqa: E402
    Container,
    LoRALinear,
    param_to_numpy,
    param_to_torch,
    register_converter,
    register_numpy_converter,
    to_numpy,
    to_torch,
)
from loralab.torch import merge_lora as torch_merge_lora  # noqa: E402

pytestmark = pytest.mark.torch


def every_layer(dtype=np.float64, seed=0):
    return every_layer_model(dtype, seed=seed)[0]


def _same(np_model, t_model):
    np_params, t_params = dict(np_model.named_parameters()), dict(t_model.named_parameters())
    assert list(np_params) == list(t_params)
    for name, p in np_params.items():
        t = t_params[name]
        assert p.requires_grad == t.requires_grad, name
        assert str(p.dtype) == str(t.dtype).removeprefix("torch."), name
        np.testing.assert_array_equal(t.detach().numpy(), p.data, err_msg=name)
    assert [n for n, _ in np_model.named_modules()] == [n for n, _ in t_model.named_modules()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layer_round_trips_with_names_values_flags(dtype):
    model = every_layer(dtype)
    twin = to_torch(model)
    _same(model, twin)
    assert isinstance(twin, torch.nn.Sequential) and isinstance(twin[2], LoRALinear)
    assert twin[3].approximate == "tanh" and twin[4].p == 0.2
    assert "0.base.weight" not in dict(twin.named_parameters())  # names are "2.base.weight" ...
    assert "2.lora_A" in dict(twin.named_parameters())
    back = to_numpy(twin)
    _same(back, twin)
    assert type(back[2]) is lora.LoRALinear and back[2].scaling == model[2].scaling


def test_outputs_agree_in_eval_mode():
    model = every_layer().eval()
    twin = to_torch(model)
    assert not twin.training and not twin[4].training
    idx = np.random.default_rng(1).integers(0, 11, (3, 7))
    np.testing.assert_allclose(
        twin(torch.tensor(idx)).detach().numpy(), model(idx).data, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(to_numpy(twin)(idx).data, model(idx).data, rtol=0, atol=0)


def test_mlp_becomes_sequential_and_dtype_cast():
    mlp = nn.MLP([4, 8, 8, 3], activation="gelu", seed=0, dtype=np.float64)
    twin = to_torch(mlp, dtype=torch.float32)
    assert isinstance(twin, torch.nn.Sequential)
    assert [n for n, _ in twin.named_children()] == ["0", "1", "2", "3", "4"]
    assert all(p.dtype == torch.float32 for p in twin.parameters())
    assert to_torch(mlp, dtype="float32")[0].weight.dtype == torch.float32
    with pytest.raises(TypeError, match="floating dtype"):
        to_torch(mlp, dtype="int64")


def test_converted_values_are_copies():
    mlp = nn.MLP([3, 2], seed=0, dtype=np.float64)
    twin = to_torch(mlp)
    with torch.no_grad():
        twin[0].weight += 1
    assert not np.allclose(twin[0].weight.detach().numpy(), mlp[0].weight.data)
    back = to_numpy(twin)
    back[0].weight.data += 1
    assert not np.allclose(twin[0].weight.detach().numpy(), back[0].weight.data)


def test_unfrozen_base_and_merged_state_are_kept():
    model = every_layer()
    model[2].base.weight.requires_grad = True
    merge_lora(model)
    twin = to_torch(model)
    assert twin[2].merged and twin[2].base.weight.requires_grad
    assert not twin[2].base.bias.requires_grad
    assert to_numpy(twin)[5].merged


def test_merge_in_torch_then_to_numpy_equals_merge_in_numpy():
    model = every_layer()
    twin = to_torch(model)
    torch_merge_lora(twin)
    merge_lora(model)
    back = to_numpy(twin)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(
            dict(back.named_parameters())[name].data, p.data, rtol=1e-13, atol=1e-15
        )
    idx = np.arange(6).reshape(2, 3)
    np.testing.assert_allclose(back.eval()(idx).data, model.eval()(idx).data, rtol=1e-12)


def test_layernorm_without_affine_and_linear_without_bias():
    model = nn.Sequential(
        nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2, bias=False, seed=0)
    )
    twin = to_torch(model)
    assert twin[0].weight is None and twin[1].bias is None
    back = to_numpy(twin)
    assert back[0].weight is None and back[1].bias is None
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(back(x).data, model(x).data, rtol=1e-6)


class Residual(nn.Module):
    """A loralab model with its own parameter, a child and plain attributes, but no torch twin."""

    def __init__(self, d, seed=0):
        super().__init__()
        self.scale = nn.Parameter(np.full(d, 0.5))
        self.inner = nn.Linear(d, d, seed=seed, dtype=np.float64)
        self.d = d

    def forward(self, x):
        return self.inner(x) * self.scale + x


def test_generic_module_becomes_a_container_and_comes_back():
    model = Residual(4)
    twin = to_torch(model)
    assert isinstance(twin, Container) and twin.numpy_class is Residual
    _same(model, twin)
    with pytest.raises(NotImplementedError, match="register_converter"):
        twin(torch.zeros(1, 4))
    back = to_numpy(twin)
    assert type(back) is Residual and back.d == 4
    x = np.ones((2, 4))
    np.testing.assert_array_equal(back(x).data, model(x).data)


class TorchResidual(torch.nn.Module):
    def __init__(self, inner, scale):
        super().__init__()
        self.scale = scale
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * self.scale + x


def test_registry_adds_a_layer_type_both_ways():
    register_converter(
        Residual,
        lambda m, convert, dtype: TorchResidual(convert(m.inner), param_to_torch(m.scale, dtype)),
    )

    def back(t, convert):
        m = Residual(t.inner.in_features)
        m.scale, m.inner = param_to_numpy(t.scale), convert(t.inner)
        return m

    register_numpy_converter(TorchResidual, back)
    try:
        model = nn.Sequential(Residual(4), nn.ReLU())
        inject_lora(model, ["0.inner"], r=2, seed=0)
        twin = to_torch(model)
        assert isinstance(twin[0], TorchResidual) and isinstance(twin[0].inner, LoRALinear)
        _same(model, twin)
        x = np.random.default_rng(0).normal(size=(3, 4))
        np.testing.assert_allclose(
            twin(torch.tensor(x)).detach().numpy(), model(x).data, rtol=1e-13
        )
        assert type(to_numpy(twin)[0]) is Residual
    finally:
        from loralab.torch import convert

        convert._TO_TORCH.pop(Residual)
        convert._TO_NUMPY.pop(TorchResidual)


def test_shared_children_stay_shared():
    shared = nn.Linear(3, 3, seed=0)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    twin = to_torch(model)
    assert twin[0] is twin[2]
    back = to_numpy(twin)
    assert back[0] is back[2]


def test_refusals_name_the_problem():
    with pytest.raises(TypeError, match="expected a loralab.nn.Module, got Linear"):
        to_torch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        to_numpy(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="no converter for torch.nn.modules.conv.Conv1d"):
        to_numpy(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1)))
    with pytest.raises(ValueError, match="approximate='none'"):
        to_numpy(torch.nn.GELU())
    with pytest.raises(ValueError, match="last axis only"):
        to_numpy(torch.nn.LayerNorm((2, 3)))
    with pytest.raises(TypeError, match="np_cls must be a loralab.nn.Module class"):
        register_converter(torch.nn.Linear, lambda *a: None)
    with pytest.raises(TypeError, match="torch_cls must be a torch.nn.Module class"):
        register_numpy_converter(nn.Linear, lambda *a: None)


def test_import_loralab_does_not_import_torch():
    code = "import sys, loralab, loralab.lora, loralab.nn; loralab.lora.save_adapter; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"padding_idx": 0}, r"to_numpy: '1' is Embedding\(padding_idx=0\)"),
        ({"max_norm": 1.0}, r"to_numpy: '1' is Embedding\(max_norm=1.0\)"),
        ({"scale_grad_by_freq": True}, r"Embedding\(scale_grad_by_freq=True\)"),
    ],
)
def test_embedding_options_that_change_behaviour_are_refused(options, match):
    """padding_idx freezes a row's gradient, max_norm renormalises rows in the forward,
    scale_grad_by_freq rescales gradients: loralab.nn.Embedding does none of these."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Embedding(5, 3, **options))
    with pytest.raises(ValueError, match=match):
        to_numpy(model)
    plain = to_numpy(torch.nn.Sequential(torch.nn.Embedding(5, 3)))  # the default converts
    assert isinstance(dict(plain.named_children())["0"], nn.Embedding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_refused_naming_the_dtype(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model[2].to(dtype)
    with pytest.raises(
        TypeError, match=rf"to_numpy: parameter '2.weight' has dtype {dtype}.*float\(\)"
    ):
        to_numpy(model)
    model.to(torch.float32)
    assert dict(to_numpy(model).named_parameters())["2.weight"].dtype == np.float32
