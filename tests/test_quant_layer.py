"""Linear4bit and quantize_model: a frozen 4-bit base that passes dx and never forms dW0."""

import numpy as np
import pytest

from loralab import Tensor
from loralab.nn import MLP, Linear, Module, ReLU, Sequential
from loralab.quant import Linear4bit, quantize, quantize_model


def make_linear(in_features=64, out_features=32, bias=True, seed=0):
    return Linear(in_features, out_features, bias=bias, seed=seed)


def test_forward_is_x_times_the_dequantized_weight_plus_bias():
    base = make_linear()
    layer = Linear4bit(base)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    W0 = quantize(base.weight.data, "nf4", 64, True).dequantize().astype(np.float64)
    expected = x.astype(np.float64) @ W0.T + base.bias.data
    np.testing.assert_allclose(layer(x).data, expected, rtol=1e-5, atol=1e-6)
    assert (layer.in_features, layer.out_features) == (64, 32)


def test_backward_gives_dx_through_the_dequantized_weight_and_no_weight_gradient():
    base = make_linear(seed=2)
    layer = Linear4bit(base, double_quant=False)
    x = Tensor(np.random.default_rng(3).standard_normal((4, 3, 64)), requires_grad=True)
    g = np.random.default_rng(4).standard_normal((4, 3, 32))
    layer(x).backward(g)
    W0 = layer.dequantized_weight().astype(np.float64)
    np.testing.assert_allclose(x.grad, g @ W0, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())


def test_the_quantized_weight_is_not_a_parameter():
    layer = Linear4bit(make_linear(bias=False))
    assert list(layer.parameters()) == [] and layer.bias is None
    assert "dtype=nf4" in repr(layer)


def test_memory_of_the_base_is_about_an_eighth():
    layer = Linear4bit(make_linear(1024, 1024, bias=False))
    assert layer.weight.nbytes / (4 * 1024 * 1024) <= 0.145


def test_add_delta_requantizes_the_sum():
    base = make_linear(seed=5)
    layer = Linear4bit(base)
    delta = np.random.default_rng(6).standard_normal((32, 64)).astype(np.float32) * 0.05
    before = layer.dequantized_weight()
    layer.add_delta_(delta)
    expected = quantize(before + delta, "nf4", 64, True).dequantize()
    np.testing.assert_array_equal(layer.dequantized_weight(), expected)


def test_add_delta_refuses_the_wrong_shape():
    layer = Linear4bit(make_linear())
    with pytest.raises(ValueError, match=r"\(32, 64\).*\(64, 32\)"):
        layer.add_delta_(np.zeros((64, 32)))


def test_input_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match=r"Linear4bit\(in_features=64\).*\(2, 63\)"):
        Linear4bit(make_linear())(np.zeros((2, 63)))


def test_only_a_linear_can_be_quantized():
    with pytest.raises(TypeError, match="ReLU"):
        Linear4bit(ReLU())


def test_quantize_model_replaces_every_linear_by_its_quantized_twin():
    model = MLP([64, 128, 10], seed=7)
    x = np.random.default_rng(8).standard_normal((16, 64)).astype(np.float32)
    W = {name: p.data.copy() for name, p in model.named_parameters()}
    quantize_model(model)
    assert all(not isinstance(m, Linear) for m in model.modules())
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 2
    Wq = {k: quantize(W[f"{k}.weight"], "nf4", 64, True).dequantize() for k in ("0", "2")}
    h = np.maximum(x @ Wq["0"].T + W["0.bias"], 0)
    np.testing.assert_allclose(model(x).data, h @ Wq["2"].T + W["2.bias"], rtol=1e-5, atol=1e-6)


def test_quantize_model_selects_by_name_and_refuses_no_match_listing_the_names():
    model = Sequential(make_linear(64, 64, seed=9), ReLU(), make_linear(64, 8, seed=10))
    quantize_model(model, ["2"])
    assert isinstance(model.get_submodule("0"), Linear)
    assert isinstance(model.get_submodule("2"), Linear4bit)
    with pytest.raises(ValueError, match=r"matched no Linear.*\['0'\]"):
        quantize_model(model, ["nothing"])


def test_a_refused_quantize_model_leaves_the_model_as_it_was():
    class Two(Module):
        def __init__(self):
            super().__init__()
            self.a = make_linear(64, 64, seed=11)
            self.b = make_linear(64, 8, seed=12)

    model = Two()
    with pytest.raises(TypeError):
        quantize_model(model, dtype=4)
    assert isinstance(model.a, Linear) and isinstance(model.b, Linear)


def test_layers_sharing_a_workspace_get_the_right_gradients():
    model = quantize_model(MLP([64, 48, 8], seed=13))
    layers = [model.get_submodule("0"), model.get_submodule("2")]
    assert layers[0].workspace is layers[1].workspace
    x = Tensor(np.random.default_rng(14).standard_normal((5, 64)), requires_grad=True)
    g = np.random.default_rng(15).standard_normal((5, 8))
    model(x).backward(g)
    W0, W2 = (layer.dequantized_weight().astype(np.float64) for layer in layers)
    h = x.data @ W0.T + layers[0].bias.data
    dh = (g @ W2) * (h > 0)
    np.testing.assert_allclose(x.grad, dh @ W0, rtol=1e-6, atol=1e-8)


def test_between_forward_and_backward_only_the_codes_are_kept():
    layer = Linear4bit(make_linear(256, 128, seed=16))
    x = Tensor(np.random.default_rng(17).standard_normal((4, 256)), requires_grad=True)
    y = layer(x)
    saved = [v for v in y._ctx.saved if isinstance(v, np.ndarray)]
    assert not any(v.size >= 128 * 256 for v in saved)  # no float copy of W0 rides on the graph
    assert layer.workspace.nbytes == 4 * 128 * 256  # one scratch W0, reused


# ----- QLoRA: inject_lora on a quantized model ---------------------------------------------------------
def qlora(seed=20):
    from loralab.lora import inject_lora

    model = quantize_model(MLP([64, 32, 10], seed=seed))
    before = model(np.ones((1, 64), np.float32)).data
    inject_lora(model, ["0", "2"], r=4, alpha=8, seed=seed)
    return model, before


def test_inject_lora_on_a_quantized_model_starts_as_the_quantized_model():
    model, before = qlora()
    np.testing.assert_array_equal(model(np.ones((1, 64), np.float32)).data, before)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    assert isinstance(model.get_submodule("0.base"), Linear4bit)


def test_qlora_gradients_reach_the_adapters_and_nothing_else():
    model, _ = qlora()
    rng = np.random.default_rng(21)
    for name in ("0", "2"):
        model.get_submodule(name).lora_B.data[...] = rng.uniform(
            -0.1, 0.1, (model.get_submodule(name).out_features, 4)
        )
    model(rng.standard_normal((8, 64)).astype(np.float32)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.grad is not None:
            assert np.abs(p.grad).max() > 0, name


def test_merge_lora_requantizes_the_sum_into_the_4bit_base():
    from loralab.lora import merge_lora

    model, _ = qlora()
    layer = model.get_submodule("2")
    layer.lora_B.data[...] = np.random.default_rng(22).uniform(-0.1, 0.1, layer.lora_B.shape)
    W0 = layer.base.dequantized_weight()
    delta = layer.scaling * (layer.lora_B.data @ layer.lora_A.data)
    merge_lora(model)
    expected = quantize(W0 + delta, "nf4", 64, True).dequantize()
    np.testing.assert_array_equal(layer.base.dequantized_weight(), expected)


def test_variants_that_need_w0_itself_are_refused_on_a_4bit_base():
    from loralab.lora import inject_lora

    for options in ({"use_dora": True}, {"init": "pissa"}):
        model = quantize_model(MLP([64, 32, 10], seed=23))
        with pytest.raises((TypeError, ValueError), match="Linear4bit|base"):
            inject_lora(model, ["0"], r=4, alpha=8, seed=0, **options)


def test_count_parameters_counts_the_quantized_base_in_the_total():
    """QLoRA's trainable fraction is measured against the whole model, W0 included."""
    from loralab.lora import count_parameters, inject_lora
    from loralab.nn import MLP
    from loralab.quant import quantize_model

    full = count_parameters(MLP([8, 16, 4], seed=0))
    model = quantize_model(MLP([8, 16, 4], seed=0))
    assert count_parameters(model) == (0, full[1])
    inject_lora(model, ["0", "2"], r=2, alpha=4, seed=0)
    lora = 2 * (8 + 16) + 2 * (16 + 4)
    assert count_parameters(model) == (lora, full[1] + lora)
