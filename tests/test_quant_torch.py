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
