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
    assert not any(b.requires_grad for b in twin.buffers())  # the stored codes are data


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


def assert_a_backward_trains_only_A_and_B(twin, x):
    """One backward through ``twin``: the 4-bit bases' buffers are data (no gradient, not a
    Parameter) and unchanged bit for bit; A and B get nonzero gradients, nothing else any."""
    stored = {name: b.clone() for name, b in twin.named_buffers()}
    twin(x).square().sum().backward()
    params = dict(twin.named_parameters())
    assert not set(stored) & set(params), "a quantized buffer is also a Parameter"
    for name, b in twin.named_buffers():
        assert not b.requires_grad and b.grad is None, f"buffer {name} takes a gradient"
        assert b.dtype == stored[name].dtype and torch.equal(b, stored[name]), f"{name} changed"
    for name, p in params.items():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"{name} got a gradient: only A and B train"


def test_a_qlora_backward_trains_only_A_and_B_and_leaves_the_codes_as_they_were():
    twin = to_torch(qlora_model())
    assert {"0.base.codes", "2.base.codes", "0.base.absmax_stored"} <= dict(
        twin.named_buffers()
    ).keys()
    x = torch.from_numpy(np.random.default_rng(26).standard_normal((5, 64)).astype(np.float32))
    assert_a_backward_trains_only_A_and_B(twin, x)


@pytest.mark.parametrize("planted", ["bias trains", "scale takes a gradient"])
def test_the_only_A_and_B_check_catches_a_planted_bug(planted):
    twin = to_torch(qlora_model())
    base = twin.get_submodule("0.base")
    if planted == "bias trains":
        base.bias.requires_grad_(True)
    else:  # a float buffer that autograd would track
        base.absmax_scale.requires_grad_(True)
    x = torch.from_numpy(np.random.default_rng(26).standard_normal((5, 64)).astype(np.float32))
    with pytest.raises(AssertionError):
        assert_a_backward_trains_only_A_and_B(twin, x)


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


def test_to_torch_converts_a_qlora_model_both_ways():
    from loralab.lora import LoRALinear as NumpyLoRALinear
    from loralab.torch import LoRALinear as TorchLoRALinear

    model = qlora_model()
    twin = to_torch(model)
    assert isinstance(twin.get_submodule("0"), TorchLoRALinear)
    assert isinstance(twin.get_submodule("0.base"), TorchLinear4bit)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == [
        "0.lora_A",
        "0.lora_B",
        "2.lora_A",
        "2.lora_B",
    ]
    x = np.random.default_rng(22).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(
        twin(torch.from_numpy(x)).detach().numpy(), model(x).data, rtol=1e-5, atol=1e-6
    )
    back = to_numpy(twin)
    for name in ("0", "2"):
        layer, again = model.get_submodule(name), back.get_submodule(name)
        assert isinstance(again, NumpyLoRALinear) and isinstance(again.base, Linear4bit)
        assert (
            again.base.dequantized_weight().tobytes() == layer.base.dequantized_weight().tobytes()
        )
        assert (
            twin.get_submodule(name).base.dequantized_weight().numpy().tobytes()
            == layer.base.dequantized_weight().tobytes()
        )
        for p in ("lora_A", "lora_B"):
            assert getattr(again, p).data.tobytes() == getattr(layer, p).data.tobytes()
    np.testing.assert_array_equal(back(x).data, model(x).data)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_training_of_the_twin_is_equivalent_over_adam_steps(double_quant):
    """check_equivalence on a QLoRA model (dropout 0.1 on the branch, shared masks), float32.

    Bound rtol = 1e-5, the twin's float32 bound: both sides compute with the same dequantized W0
    (bit for bit, tested above) and the same A, B and masks, so what differs is float32 round-off
    of the matmuls (eps = 6e-8, sums of at most 64 terms), carried through 50 Adam steps; it
    stays near 1e-6 (measured 2e-6 at most).
    """
    from loralab.lora import inject_lora
    from loralab.torch import check_equivalence

    model = quantize_model(MLP([64, 32, 10], seed=24), double_quant=double_quant)
    inject_lora(model, ["0", "2"], r=4, alpha=8, dropout=0.1, seed=24)
    rng = np.random.default_rng(24)
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        layer.lora_B.data[...] = rng.uniform(-0.1, 0.1, layer.lora_B.shape)
    batches = [
        (rng.standard_normal((16, 64)).astype(np.float32), rng.integers(0, 10, 16))
        for _ in range(3)
    ]
    start = model.get_submodule("0").lora_A.data.copy()
    report = check_equivalence(model, to_torch(model), batches, steps=50, lr=1e-2)
    assert report.steps == 50 and report.dtype == "float32"
    report.assert_close(1e-5)
    assert np.abs(model.get_submodule("0").lora_A.data - start).max() > 1e-2  # it trained


def test_the_branch_functions_backward_passes_gradcheck_and_equals_autograd():
    from loralab.torch.layers import LoRABranchFunction

    rng = np.random.default_rng(25)
    x, A, B = (
        torch.tensor(rng.standard_normal(shape), requires_grad=True)
        for shape in ((2, 3, 8), (2, 8), (5, 2))
    )
    mask = torch.tensor((rng.uniform(size=(2, 3, 8)) > 0.3) / 0.7)
    assert torch.autograd.gradcheck(lambda *t: LoRABranchFunction.apply(*t, 1.5, mask), (x, A, B))
    model = to_torch(qlora_model(), dtype=np.float64)
    plain = to_torch(qlora_model(), dtype=np.float64)
    for name in ("0", "2"):
        plain.get_submodule(name).use_custom_backward = False  # the branch by plain autograd
    x = rng.standard_normal((4, 64))
    x_custom, x_plain = (torch.tensor(x, requires_grad=True) for _ in range(2))
    model(x_custom).square().sum().backward()
    plain(x_plain).square().sum().backward()
    torch.testing.assert_close(x_custom.grad, x_plain.grad, rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_merging_into_the_4bit_base_equals_the_numpy_merge():
    from loralab.lora import merge_lora, unmerge_lora

    model = qlora_model()
    twin = to_torch(model)
    merge_lora(model)
    merge_lora(twin)
    x = np.random.default_rng(26).standard_normal((3, 64)).astype(np.float32)
    for name in ("0", "2"):
        t, n = twin.get_submodule(name), model.get_submodule(name)
        assert t.merged and n.merged
        assert (
            t.base.dequantized_weight().numpy().tobytes() == n.base.dequantized_weight().tobytes()
        )
    np.testing.assert_allclose(
        twin(torch.from_numpy(x)).detach().numpy(), model(x).data, rtol=1e-5, atol=1e-6
    )
    unmerge_lora(twin)
    assert not twin.get_submodule("0").merged


def test_torch_inject_lora_wraps_the_4bit_layers_of_a_torch_model_as_numpy_does():
    from loralab.lora import inject_lora
    from loralab.torch import LoRALinear as TorchLoRALinear
    from loralab.torch import inject_lora as torch_inject

    quantized = quantize_model(MLP([64, 32, 10], seed=27))
    twin = torch_inject(to_torch(quantized), ["0", "2"], r=4, alpha=8, seed=27)
    inject_lora(quantized, ["0", "2"], r=4, alpha=8, seed=27)
    for name in ("0", "2"):
        layer = twin.get_submodule(name)
        assert isinstance(layer, TorchLoRALinear) and isinstance(layer.base, TorchLinear4bit)
        expected = quantized.get_submodule(name).lora_A.data
        assert layer.lora_A.detach().numpy().tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"init": "pissa"}, "'pissa'"),
        ({"init": "olora"}, "'olora'"),
    ],
)
def test_dora_pissa_and_olora_are_refused_on_a_4bit_base_with_the_reason(options, match):
    from loralab.torch import LoRALinear as TorchLoRALinear

    base = TorchLinear4bit.from_numpy(numpy_layer())
    with pytest.raises(ValueError, match=match + r".*need W0 itself.*Linear4bit base") as err:
        TorchLoRALinear(base, r=2, **options)
    with pytest.raises(ValueError) as np_err:
        from loralab.lora import LoRALinear as NumpyLoRALinear

        NumpyLoRALinear(numpy_layer(), r=2, **options)
    assert str(err.value) == str(np_err.value)


def _quantization_bound(fp_model, q_model, x):
    """Per output, how far a [64, 32, 10] ReLU MLP with the same adapter can move when its base
    weights W_i are replaced by their quantized Q_i: a bound from W - Q alone.

    With W_i' = W_i + ΔW_i and Q_i' = Q_i + ΔW_i (the same ΔW_i on both):
    h - h_q = relu(W_1' x + b_1) - relu(Q_1' x + b_1), and ReLU is 1-Lipschitz, so
    ||h - h_q|| <= ||(W_1 - Q_1) x||; then y - y_q = W_2' (h - h_q) + (W_2 - Q_2) h_q gives
    |y - y_q|_i <= ||row i of W_2'|| ||(W_1 - Q_1) x|| + |(W_2 - Q_2) h_q|_i (Cauchy-Schwarz).
    """
    W1, W2 = (fp_model.get_submodule(n).weight.data.astype(np.float64) for n in ("0", "2"))
    Q1, Q2 = (
        q_model.get_submodule(n).base.dequantized_weight().astype(np.float64) for n in ("0", "2")
    )
    d1, d2 = (q_model.get_submodule(n).delta_weight().astype(np.float64) for n in ("0", "2"))
    b1 = q_model.get_submodule("0").base.bias.data.astype(np.float64)
    h_q = np.maximum(x @ (Q1 + d1).T + b1, 0.0)
    hidden = np.linalg.norm(x @ (W1 - Q1).T, axis=1, keepdims=True)  # (batch, 1)
    return hidden * np.linalg.norm(W2 + d2, axis=1) + np.abs(h_q @ (W2 - Q2).T)


@pytest.mark.peft
def test_an_adapter_trained_on_a_4bit_base_loads_onto_the_unquantized_base_in_peft(tmp_path):
    """Train QLoRA in torch, save in PEFT's format, load with PEFT onto the float32 base.

    Onto the dequantized base PEFT computes our QLoRA model (float32 round-off, rtol 1e-5).
    Onto the original float32 base, as people deploy a QLoRA adapter, the outputs differ by what
    the quantization error W - Q moves them: asserted within `_quantization_bound` (computed
    from W - Q per row, not chosen), and not equal (the base did change).
    """
    peft = pytest.importorskip("peft", reason="needs PEFT")
    from loralab.lora import load_adapter
    from loralab.torch import save_adapter

    original = MLP([64, 32, 10], seed=20)
    model = qlora_model()
    twin = to_torch(model)
    rng = np.random.default_rng(23)
    x_train = torch.from_numpy(rng.standard_normal((64, 64)).astype(np.float32))
    y_train = torch.from_numpy(rng.integers(0, 10, 64))
    opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(twin(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # the adapter learned something
    save_adapter(twin, tmp_path)
    trained = to_numpy(twin)
    x = rng.standard_normal((5, 64)).astype(np.float32)

    def peft_output(numpy_base):
        loaded = peft.PeftModel.from_pretrained(to_torch(numpy_base), tmp_path).eval()
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    # onto the dequantized base: exactly our QLoRA model
    dequantized = MLP([64, 32, 10], seed=20)
    for name in ("0", "2"):
        layer = trained.get_submodule(name)
        dequantized.get_submodule(name).weight.data[...] = layer.base.dequantized_weight()
    qlora_out = trained(x).data
    np.testing.assert_allclose(peft_output(dequantized), qlora_out, rtol=1e-5, atol=1e-6)
    # onto the original float32 base, as people deploy it
    deployed = peft_output(original)
    expected = load_adapter(MLP([64, 32, 10], seed=20), tmp_path)(x).data
    np.testing.assert_allclose(deployed, expected, rtol=1e-5, atol=1e-6)
    gap = np.abs(deployed - qlora_out)
    bound = _quantization_bound(original, trained, x.astype(np.float64))
    assert np.all(gap <= bound + 1e-5), (gap / bound).max()
    assert gap.max() > 1e-4  # the 4-bit base did differ from the float32 one


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
