"""The torch twin of Linear4bit: the same bytes, the same dequantized W0 bit for bit, the same gradients."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch twin needs torch")

from loralab.nn import MLP, Linear  # noqa: E402
from loralab.quant import Linear4bit, quantize_model  # noqa: E402
from loralab.tensor import Tensor  # noqa: E402
from loralab.torch import to_numpy, to_torch  # noqa: E402
from loralab.torch.quant import Linear4bit as TorchLinear4bit  # noqa: E402

pytestmark = pytest.mark.torch


def numpy_layer(shape=(48, 64), seed=0, **options):
    out_features, in_features = shape
    return Linear4bit(Linear(in_features, out_features, seed=seed), **options)


@pytest.mark.parametrize("dtype", ["nf4", "fp4", "int4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 64), (7, 9)])
def test_dequantized_weight_equals_the_numpy_layer_bit_for_bit(dtype, double_quant, shape):
    layer = numpy_layer(shape, dtype=dtype, block_size=32, double_quant=double_quant)
    twin = TorchLinear4bit.from_numpy(layer)
    expected = layer.dequantized_weight()
    assert twin.dequantized_weight().numpy().tobytes() == expected.tobytes()


def test_forward_and_dx_equal_the_numpy_layer():
    layer = numpy_layer(seed=1)
    twin = TorchLinear4bit.from_numpy(layer)
    x = np.random.default_rng(2).standard_normal((4, 3, 64))
    g = np.random.default_rng(3).standard_normal((4, 3, 48))
    x_np = Tensor(x, requires_grad=True)
    y_np = layer(x_np)
    y_np.backward(g)
    x_t = torch.tensor(x, requires_grad=True)
    y_t = twin(x_t)
    y_t.backward(torch.tensor(g))
    np.testing.assert_allclose(y_t.detach().numpy(), y_np.data, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_t.grad.numpy(), x_np.grad, rtol=1e-12, atol=1e-12)
    assert all(not p.requires_grad for p in twin.parameters())
    assert all(b.grad is None for b in twin.buffers())


def test_add_delta_equals_the_numpy_merge():
    layer = numpy_layer(seed=4)
    twin = TorchLinear4bit.from_numpy(layer)
    delta = np.random.default_rng(5).standard_normal((48, 64)).astype(np.float32) * 0.1
    layer.add_delta_(delta)
    twin.add_delta_(torch.from_numpy(delta))
    assert twin.dequantized_weight().numpy().tobytes() == layer.dequantized_weight().tobytes()


def test_state_dict_holds_the_stored_bytes_and_loads_back():
    twin = TorchLinear4bit.from_numpy(numpy_layer(seed=6))
    state = twin.state_dict()
    assert {"codes", "absmax_stored", "absmax_scale", "absmax_offset", "bias"} <= set(state)
    assert state["codes"].dtype == torch.uint8 and state["codes"].numel() == 48 * 64 // 2
    other = TorchLinear4bit.from_numpy(numpy_layer(seed=7))
    other.load_state_dict(state)
    assert torch.equal(other.dequantized_weight(), twin.dequantized_weight())


def test_to_torch_and_back_keep_the_quantized_model():
    model = quantize_model(MLP([64, 32, 10], seed=8))
    twin = to_torch(model)
    assert isinstance(twin.get_submodule("0"), TorchLinear4bit)
    x = np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(
        twin(torch.from_numpy(x)).detach().numpy(), model(x).data, rtol=1e-5, atol=1e-6
    )
    back = to_numpy(twin)
    assert isinstance(back.get_submodule("2"), Linear4bit)
    np.testing.assert_array_equal(back(x).data, model(x).data)


def test_input_of_the_wrong_width_is_refused():
    twin = TorchLinear4bit.from_numpy(numpy_layer())
    with pytest.raises(ValueError, match=r"in_features=64.*\(2, 63\)"):
        twin(torch.zeros(2, 63))


# ----- QLoRA: LoRA on the 4-bit base ------------------------------------------------------------------
def qlora_model(seed=20):
    from loralab.lora import inject_lora

    model = quantize_model(MLP([64, 32, 10], seed=seed))
    inject_lora(model, ["0", "2"], r=4, alpha=8, seed=seed)
    rng = np.random.default_rng(seed)
    for name in ("0", "2"):  # B != 0, so that every path carries a signal
        layer = model.get_submodule(name)
        layer.lora_B.data[...] = rng.uniform(-0.1, 0.1, layer.lora_B.shape)
    return model


def test_qlora_training_equals_torch_over_adam_steps():
    from loralab import functional as F
    from loralab import optim
    from loralab.training import train_step

    model = qlora_model()
    layers = [model.get_submodule(n) for n in ("0", "2")]
    bases = [TorchLinear4bit.from_numpy(layer.base) for layer in layers]
    A = [torch.nn.Parameter(torch.tensor(layer.lora_A.data)) for layer in layers]
    B = [torch.nn.Parameter(torch.tensor(layer.lora_B.data)) for layer in layers]
    s = layers[0].scaling
    rng = np.random.default_rng(21)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    target = rng.standard_normal((16, 10)).astype(np.float32)

    np_opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    t_opt = torch.optim.Adam(A + B, lr=1e-2)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)
    for _ in range(5):
        train_step(np_opt, lambda: F.mse_loss(model(Tensor(x)), target))
        h = torch.relu(bases[0](xt) + s * (xt @ A[0].T) @ B[0].T)
        y = bases[1](h) + s * (h @ A[1].T) @ B[1].T
        t_opt.zero_grad()
        torch.nn.functional.mse_loss(y, tt).backward()
        t_opt.step()
    for layer, a, b in zip(layers, A, B, strict=True):
        np.testing.assert_allclose(layer.lora_A.data, a.detach().numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.lora_B.data, b.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(layers[0].lora_A.data, qlora_model().get_submodule("0").lora_A.data)


@pytest.mark.xfail(
    raises=TypeError,
    reason="loralab.torch.LoRALinear accepts only a torch.nn.Linear base; the linear-like base "
    "interface of loralab.lora.layer has no torch side yet",
)
def test_to_torch_converts_a_qlora_model():
    model = qlora_model()
    twin = to_torch(model)
    x = np.random.default_rng(22).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(twin(torch.from_numpy(x)).detach().numpy(), model(x).data, rtol=1e-5)


@pytest.mark.peft
def test_an_adapter_trained_on_a_4bit_base_loads_onto_the_unquantized_base_in_peft(tmp_path):
    peft = pytest.importorskip("peft", reason="needs PEFT")
    from loralab.lora import load_adapter, save_adapter

    original = MLP([64, 32, 10], seed=20)
    model = qlora_model()
    save_adapter(model, tmp_path)
    x = np.random.default_rng(23).standard_normal((5, 64)).astype(np.float32)

    def peft_output(numpy_base):
        loaded = peft.PeftModel.from_pretrained(to_torch(numpy_base), tmp_path).eval()
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    # onto the dequantized base: exactly our QLoRA model
    dequantized = MLP([64, 32, 10], seed=20)
    for name in ("0", "2"):
        dequantized.get_submodule(name).weight.data[...] = model.get_submodule(
            name
        ).base.dequantized_weight()
    np.testing.assert_allclose(peft_output(dequantized), model(x).data, rtol=1e-5, atol=1e-6)
    # onto the original float32 base, as people deploy it: what loralab computes with that adapter
    expected = load_adapter(MLP([64, 32, 10], seed=20), tmp_path)(x).data
    np.testing.assert_allclose(peft_output(original), expected, rtol=1e-5, atol=1e-6)


def test_the_twins_backward_passes_gradcheck_and_keeps_no_w0():
    twin = TorchLinear4bit.from_numpy(numpy_layer((6, 8), seed=30, block_size=16))
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(twin, (x,))
    twin.bias.requires_grad_(True)  # db, when the bias is trained
    g = torch.randn(3, 6, dtype=torch.float64)
    twin(x).backward(g)
    torch.testing.assert_close(twin.bias.grad, g.sum(0).float())
    saved = getattr(twin(x).grad_fn, "saved_tensors", ())
    assert not any(t.shape == (6, 8) for t in saved)  # no float copy of W0 on the graph
