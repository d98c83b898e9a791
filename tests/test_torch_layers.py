"""Tests for loralab.torch.layers: the torch LoRALinear and its hand-derived backward."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loralab import Tensor, lora, nn  # noqa: E402
from loralab.torch import LoRALinear, LoRALinearFunction, to_torch  # noqa: E402

pytestmark = pytest.mark.torch


def _layer(in_f=6, out_f=5, *, dropout=0.0, custom=True, seed=0, dtype=torch.float64, **kw):
    torch_gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=torch_gen, dtype=dtype))
        base.bias.copy_(torch.randn(out_f, generator=torch_gen, dtype=dtype))
    layer = LoRALinear(
        base, r=2, alpha=3, dropout=dropout, use_custom_backward=custom, seed=seed, **kw
    )
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_f, 2, generator=torch_gen, dtype=dtype))
    return layer


def test_shapes_names_scaling_and_frozen_base():
    layer = LoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4, seed=1)
    assert tuple(layer.lora_A.shape) == (2, 6) and tuple(layer.lora_B.shape) == (4, 2)
    assert layer.scaling == 2.0 and not layer.merged
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    np_layer = lora.LoRALinear(nn.Linear(6, 4, seed=0), r=2)
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in np_layer.named_parameters()]
    assert torch.count_nonzero(layer.lora_B) == 0
    rs = LoRALinear(torch.nn.Linear(6, 4), r=4, alpha=4, use_rslora=True)
    assert rs.scaling == pytest.approx(4 / 2)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_seed_same_initial_A_as_numpy(init, dtype):
    np_layer = lora.LoRALinear(nn.Linear(7, 5, seed=0, dtype=dtype), r=3, init=init, seed=11)
    t_layer = LoRALinear(to_torch(np_layer.base), r=3, init=init, seed=11)
    np.testing.assert_array_equal(t_layer.lora_A.detach().numpy(), np_layer.lora_A.data)
    assert t_layer.lora_A.dtype == to_torch(np_layer.base).weight.dtype


def test_output_equals_base_right_after_construction():
    base = torch.nn.Linear(6, 5, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = base(x)
    torch.testing.assert_close(LoRALinear(base, r=2, seed=0)(x), expected, rtol=1e-14, atol=1e-15)


def test_forward_is_W0_plus_scaled_BA():
    layer = _layer()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    W = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ W.T + layer.base.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_custom_backward_equals_plain_autograd(dropout):
    grads = []
    for custom in (True, False):
        layer = _layer(dropout=dropout, custom=custom, generator=torch.Generator().manual_seed(5))
        x = torch.randn(4, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        (layer(x) ** 2).sum().backward()
        grads.append([x.grad, layer.lora_A.grad, layer.lora_B.grad])
        assert layer.base.weight.grad is None and layer.base.bias.grad is None
    for g_custom, g_plain in zip(*grads):
        torch.testing.assert_close(g_custom, g_plain, rtol=1e-12, atol=1e-12)


def test_custom_backward_computes_dW0_only_when_W0_requires_it():
    layer = _layer()
    layer.base.weight.requires_grad_(True)
    x = torch.randn(5, 6, dtype=torch.float64)
    layer(x).sum().backward()
    dy = torch.ones(5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer.base.weight.grad, dy.T @ x, rtol=1e-12, atol=1e-12)
    assert layer.base.bias.grad is None


def test_gradcheck_of_the_function():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(grad)

    x, W0, b, A, B = rand(2, 3, 4), rand(5, 4), rand(5), rand(2, 4), rand(5, 2)
    mask = (torch.rand(2, 3, 4, generator=gen, dtype=torch.float64) > 0.3).double() / 0.7
    for m in (None, mask):
        assert torch.autograd.gradcheck(LoRALinearFunction.apply, (x, W0, b, A, B, 0.75, m))
    assert torch.autograd.gradcheck(LoRALinearFunction.apply, (x, W0, None, A, B, 2.0, None))


def test_gradcheck_fails_for_a_wrong_backward(monkeypatch):
    """The gradcheck above can fail: a backward that forgets the scaling in dA is caught."""
    original = LoRALinearFunction.backward

    def wrong(ctx, dy):
        dx, dW0, db, dA, dB, s, m = original(ctx, dy)
        return dx, dW0, db, dA / ctx.scaling, dB, s, m

    monkeypatch.setattr(LoRALinearFunction, "backward", staticmethod(wrong))
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    args = (torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), None, A)
    B = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(LoRALinearFunction.apply, (*args, B, 0.5, None))


def test_merge_unmerge_and_delta_weight():
    layer = _layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    before, W0 = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, W0 + layer.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training_and_same_mask_for_x_and_its_gradient():
    layer = _layer(dropout=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 6, dtype=torch.float64)
    layer.eval()
    no_drop = layer(x)
    torch.testing.assert_close(layer(x), no_drop, rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), no_drop)


def test_mask_rng_draws_the_numpy_layers_masks():
    np_layer = lora.LoRALinear(nn.Linear(6, 5, seed=0, dtype=np.float64), r=2, dropout=0.4, seed=3)
    np_layer.lora_B.data = np.random.default_rng(1).normal(size=(5, 2))
    t_layer = to_torch(np_layer)
    t_layer.mask_rng = np.random.default_rng(3)
    np_layer.rng = np.random.default_rng(3)
    x = np.random.default_rng(2).normal(size=(4, 6))
    np.testing.assert_allclose(
        t_layer(torch.tensor(x)).detach().numpy(), np_layer(x).data, rtol=1e-13
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, "r must be a positive integer"),
        ({"r": 2.0}, TypeError, "r must be a positive integer"),
        ({"r": 11}, ValueError, "exceeds min"),
        ({"alpha": -1}, ValueError, "alpha must be a positive number"),
        ({"dropout": 1.0}, ValueError, "expected dropout in"),
        ({"init": "zeros"}, ValueError, "init must be one of"),
    ],
)
def test_same_validation_messages_as_numpy(kwargs, error, match):
    with pytest.raises(error, match=match) as torch_err:
        LoRALinear(torch.nn.Linear(12, 10), **kwargs)
    with pytest.raises(error) as np_err:
        lora.LoRALinear(nn.Linear(12, 10, seed=0), **kwargs)
    assert str(torch_err.value) == str(np_err.value)


def test_bad_base_and_bad_input_shape():
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear, got Conv1d"):
        LoRALinear(torch.nn.Conv1d(3, 3, 1))
    layer = LoRALinear(torch.nn.Linear(6, 5), r=2)
    with pytest.raises(ValueError, match=r"expected x of shape \(\.\.\., 6\), got \(3, 4\)"):
        layer(torch.randn(3, 4))
    np_layer = lora.LoRALinear(nn.Linear(6, 5, seed=0), r=2)
    with pytest.raises(ValueError) as np_err:
        np_layer(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError) as t_err:
        layer(torch.zeros(3, 4))
    assert str(np_err.value) == str(t_err.value)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_split_W0_as_the_numpy_layer_does(init):
    np_base = nn.Linear(7, 5, seed=0, dtype=np.float64)
    t_base = to_torch(np_base)
    np_layer = lora.LoRALinear(np_base, r=2, init=init)
    t_layer = LoRALinear(t_base, r=2, init=init)
    for name in ("lora_A", "lora_B", "base.weight"):
        np.testing.assert_allclose(
            t_layer.get_parameter(name).detach().numpy(),
            dict(np_layer.named_parameters())[name].data,
            rtol=1e-12,
            atol=1e-14,
        )
    x = np.random.default_rng(0).normal(size=(3, 7))
    np.testing.assert_allclose(
        t_layer(torch.tensor(x)).detach().numpy(), np_layer(x).data, rtol=1e-12
    )
    assert to_torch(np_layer).init == init


def _problem(batch, n_in, n_out, r, seed=0):
    """float64 x, W0, b, A, B with a nonzero B."""
    g = np.random.default_rng(seed)
    return (
        g.standard_normal(batch + (n_in,)),
        g.standard_normal((n_out, n_in)),
        g.standard_normal(n_out),
        g.standard_normal((r, n_in)),
        g.standard_normal((n_out, r)),
    )


def test_fused_op_matches_pytorch_autograd():
    arrays = _problem((2, 3), 7, 5, 3, seed=10)
    s = 4 / 3
    tensors = [Tensor(v, requires_grad=True) for v in arrays]
    y = lora.lora_linear(*tensors, s)
    dy = np.random.default_rng(11).standard_normal(y.shape)
    y.backward(dy)
    tt = [torch.tensor(v, requires_grad=True) for v in arrays]
    tx, tW0, tb, tA, tB = tt
    ty = tx @ tW0.T + tb + s * (tx @ tA.T) @ tB.T
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-12)
    for ours, theirs in zip(tensors, tt, strict=True):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-11, atol=1e-13)


def test_a_registered_linear_like_base_runs_base_plus_branch_and_refuses_a_merge_without_add_delta():
    from loralab.torch.layers import LINEAR_TYPES, register_linear_type

    class Scaled(torch.nn.Module):  # y = 2 x W^T: linear-like, but no plain weight, no add_delta_
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(6, 5, dtype=torch.float64)
            self.in_features, self.out_features = 6, 5

        def forward(self, x):
            return 2.0 * self.inner(x)

    with pytest.raises(TypeError, match="got Scaled.*register_linear_type"):
        LoRALinear(Scaled())
    register_linear_type(Scaled)
    try:
        base = Scaled()
        layer = LoRALinear(base, r=2, alpha=4, seed=0)
        assert not layer.plain_base and layer.lora_A.dtype == torch.float32  # compute dtype
        layer = LoRALinear(Scaled(), r=2, alpha=4, seed=0).double()
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(0))
        x = torch.randn(3, 6, dtype=torch.float64)
        expected = layer.base(x) + 2.0 * x @ (layer.lora_B @ layer.lora_A).T
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(TypeError, match="a Scaled base has no add_delta_"):
            layer.merge()
        received = []
        Scaled.add_delta_ = lambda self, delta: received.append(delta)
        layer.merge()  # ΔW reaches the base as a torch tensor (on a GPU it stays there)
        assert len(received) == 1 and isinstance(received[0], torch.Tensor)
        torch.testing.assert_close(received[0], layer.delta_weight())
        with pytest.raises(ValueError, match="use_dora=True.*need W0 itself.*Scaled base"):
            LoRALinear(Scaled(), r=2, use_dora=True)
    finally:
        LINEAR_TYPES.remove(Scaled)
    with pytest.raises(TypeError, match="register_linear_type: expected a torch.nn.Module class"):
        register_linear_type(int)
