"""loralab.lora.linear_layer: LoRALinear's contract (shapes, init, merging, gradients, validation, dropout)
and the linear-like base interface a quantized base implements."""

import math

import numpy as np
import pytest

from loralab import Tensor, gradcheck
from loralab import functional as F
from loralab.lora import (
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_layers,
    register_linear_type,
    save_adapter,
)
from loralab.lora.engine_functions import LoRABranchFn
from loralab.nn import Linear, Module, Parameter, ReLU, Sequential


def lora_layer(r=2, alpha=4.0, seed=0, **kw):
    return LoRALinear(Linear(7, 5, seed=seed, dtype=np.float64), r=r, alpha=alpha, seed=seed, **kw)


def test_lora_linear_shapes_init_and_freezing():
    layer = lora_layer(r=3, alpha=6)
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (5, 3)
    assert layer.scaling == 2.0
    assert np.all(layer.lora_B.data == 0)
    assert np.abs(layer.lora_A.data).max() <= 1 / math.sqrt(7)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["lora_A", "lora_B"]
    assert lora_layer(r=4, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 2)
    gauss = lora_layer(r=4, init="gaussian")
    assert abs(gauss.lora_A.data.std() - 1 / 4) < 0.1


def test_right_after_wrapping_output_equals_base_exactly():
    base = Linear(7, 5, seed=3, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2, 4, 7))
    expected = base(x).data.copy()
    np.testing.assert_array_equal(LoRALinear(base, r=2, seed=0)(x).data, expected)


def test_merge_unmerge_round_trip_and_equality():
    layer = lora_layer(r=2)
    layer.lora_B.data[:] = np.random.default_rng(2).standard_normal((5, 2))
    x = np.random.default_rng(3).standard_normal((3, 7))
    W0 = layer.base.weight.data.copy()
    y = layer(x).data
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(layer(x).data, y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.base.weight.data, W0 + layer.delta_weight(), atol=1e-15)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    np.testing.assert_allclose(layer.base.weight.data, W0, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_lora_linear_gradients_with_nonzero_B():
    layer = lora_layer(r=2)
    layer.lora_B.data[:] = np.random.default_rng(4).standard_normal((5, 2))
    x = Tensor(np.random.default_rng(5).standard_normal((2, 3, 7)), requires_grad=True)
    gradcheck(lambda x, A, B: layer(x), x, layer.lora_A, layer.lora_B)
    assert layer.base.weight.grad is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
        ({"r": 2.5}, TypeError, r"r must be a positive integer, got 2.5 \(float\)"),
        ({"r": True}, TypeError, "r must be a positive integer, got True"),
        ({"r": 6}, ValueError, r"r=6 exceeds min\(in_features, out_features\)=5"),
        ({"alpha": 0}, ValueError, "alpha must be a positive number, got alpha=0"),
        ({"alpha": -1.0}, ValueError, "alpha=-1.0"),
        ({"dropout": 1.0}, ValueError, r"expected dropout in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, "got -0.1"),
        ({"init": "xavier"}, ValueError, "init must be one of .*got init='xavier'"),
    ],
)
def test_lora_linear_bad_options(kwargs, error, message):
    base = Linear(7, 5, seed=0)
    with pytest.raises(error, match=message):
        LoRALinear(base, **{"r": 2, **kwargs})
    assert base.weight.requires_grad  # nothing half-applied


def test_lora_linear_bad_input_and_base():
    with pytest.raises(TypeError, match="base must be a loralab.nn.Linear, got ReLU"):
        LoRALinear(ReLU())
    with pytest.raises(ValueError, match=r"expected x of shape \(\.\.\., 7\), got \(3, 6\)"):
        lora_layer()(np.ones((3, 6)))


def test_lora_dropout_only_in_training_and_reproducible():
    layer = lora_layer(r=2, dropout=0.5, seed=1)
    layer.lora_B.data[:] = 1.0
    x = np.ones((4, 7))
    y_train = layer(x).data
    layer.eval()
    y_eval = layer(x).data
    assert not np.allclose(y_train, y_eval)
    again = lora_layer(r=2, dropout=0.5, seed=1)
    again.lora_B.data[:] = 1.0
    np.testing.assert_array_equal(again(x).data, y_train)


# ----- a linear-like base that is not a plain Linear (the interface a quantized base implements) ----
class Rescaled(Module):
    """y = x (c W)^T: W0 = c W held in another form, as a quantized base holds it in codes."""

    def __init__(self, linear, c=2.0, mergeable=True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.half = Parameter(linear.weight.data / c, requires_grad=False)
        self.c = c
        self.compute_dtype = np.float64  # the dtype A and B get
        if mergeable:
            self.add_delta_ = self._add_delta

    def forward(self, x):
        return F.linear(x, Tensor(self.c * self.half.data), None)

    def _add_delta(self, delta):
        self.half.data = self.half.data + delta / self.c
        return self


register_linear_type(Rescaled)


def rescaled_layer(mergeable=True, **kw):
    base = Rescaled(Linear(7, 5, bias=False, seed=0, dtype=np.float64), mergeable=mergeable)
    layer = LoRALinear(base, r=2, alpha=4.0, seed=0, **kw)
    layer.lora_B.data = np.random.default_rng(1).standard_normal((5, 2))
    return layer


def test_a_registered_linear_like_base_runs_base_plus_branch_with_a_hand_backward():
    layer = rescaled_layer(dropout=0.3)
    W0 = 2.0 * layer.base.half.data
    x = np.random.default_rng(2).standard_normal((3, 7))
    expected = x @ (W0 + layer.delta_weight()).T
    np.testing.assert_allclose(layer.eval()(x).data, expected, rtol=1e-13)
    layer.train()
    mask = (np.random.default_rng(3).random((2, 4, 7)) > 0.3) / 0.7
    xt = Tensor(np.random.default_rng(4).standard_normal((2, 4, 7)), requires_grad=True)
    gradcheck(
        lambda x, A, B: LoRABranchFn.apply(x, A, B, scaling=layer.scaling, mask=mask),
        xt,
        layer.lora_A,
        layer.lora_B,
    )
    gradcheck(lambda x, A, B: layer.eval()(x), xt, layer.lora_A, layer.lora_B)
    assert layer.base.half.grad is None


def test_merging_into_such_a_base_goes_through_add_delta_or_is_refused():
    layer = rescaled_layer()
    x = np.random.default_rng(5).standard_normal((3, 7))
    before = layer(x).data
    layer.merge()
    np.testing.assert_allclose(layer(x).data, before, rtol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.base(x).data, x @ (2.0 * layer.base.half.data).T)
    frozen = rescaled_layer(mergeable=False)
    with pytest.raises(TypeError, match="Rescaled base has no add_delta_"):
        frozen.merge()
    assert not frozen.merged


@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"init": "pissa"}, {"init": "olora"}])
def test_variants_that_need_W0_are_refused_on_such_a_base(kwargs):
    base = Rescaled(Linear(7, 5, seed=0))
    with pytest.raises(ValueError, match="need W0 itself, which a Rescaled base does not hold"):
        LoRALinear(base, r=2, **kwargs)
    assert base.half.requires_grad is False  # and nothing else was touched


def test_inject_lora_targets_registered_linear_types():
    model = Sequential(Rescaled(Linear(7, 5, seed=0)), ReLU(), Linear(5, 3, seed=0))
    inject_lora(model, "all-linear", r=2, seed=0)
    assert [n for n, _ in lora_layers(model)] == ["0", "2"]
    assert isinstance(model.get_submodule("0").base, Rescaled)


def test_register_linear_type_wants_a_module_class():
    with pytest.raises(TypeError, match="expected a loralab.nn.Module class"):
        register_linear_type(int)


@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"init": "pissa"}])
def test_loading_a_W0_variant_onto_such_a_base_is_refused_before_anything_changes(tmp_path, kwargs):
    plain = Sequential(Linear(7, 5, seed=0), ReLU(), Linear(5, 3, seed=0))
    save_adapter(inject_lora(plain, ["0", "2"], r=2, seed=0, **kwargs), tmp_path)
    model = Sequential(Linear(7, 5, seed=0), ReLU(), Rescaled(Linear(5, 3, seed=0)))
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    weight = model.get_submodule("0").weight.data.copy()
    with pytest.raises(ValueError, match="need W0 itself, which the base at '2' \\(Rescaled\\)"):
        load_adapter(model, tmp_path)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before
    np.testing.assert_array_equal(model.get_submodule("0").weight.data, weight)


def test_injecting_a_W0_variant_onto_such_a_base_is_refused_before_anything_changes():
    model = Sequential(Linear(7, 5, seed=0), ReLU(), Rescaled(Linear(5, 3, seed=0)))
    with pytest.raises(ValueError, match="inject_lora: use_dora=True.*base at '2' \\(Rescaled\\)"):
        inject_lora(model, "all-linear", r=2, use_dora=True)
    assert not lora_layers(model) and model.get_submodule("0").weight.requires_grad
