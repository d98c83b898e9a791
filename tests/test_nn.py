"""loralab.nn: Module bookkeeping, layers, and LoRALinear's contract."""

import math

import numpy as np
import pytest

from loralab import Tensor, gradcheck
from loralab.nn import (
    GELU,
    MLP,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    LoRALinear,
    Module,
    Parameter,
    ReLU,
    Sequential,
)


class Block(Module):
    def __init__(self):
        super().__init__()
        self.norm = LayerNorm(4, dtype=np.float64)
        self.layers = Sequential(Linear(4, 3, seed=0, dtype=np.float64), GELU())
        self.scale = Parameter(np.ones(3))

    def forward(self, x):
        return self.layers(self.norm(x)) * self.scale


def test_named_parameters_use_dotted_names_in_registration_order():
    names = [n for n, _ in Block().named_parameters()]
    assert names == ["scale", "norm.weight", "norm.bias", "layers.0.weight", "layers.0.bias"]
    assert [n for n, _ in Block().named_modules()] == ["", "norm", "layers", "layers.0", "layers.1"]


def test_shared_parameters_are_listed_once():
    a = Linear(3, 3, seed=0)
    seq = Sequential(a, ReLU(), a)
    assert len(list(seq.parameters())) == 2


def test_state_dict_round_trip_and_strict_errors():
    m1, m2 = MLP([5, 4, 2], seed=1), MLP([5, 4, 2], seed=2)
    m2.load_state_dict(m1.state_dict())
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert n1 == n2 and np.array_equal(p1.data, p2.data)
    state = m1.state_dict()
    state["0.weight"][:] = 0  # a copy: the model is untouched
    assert np.abs(m1[0].weight.data).max() > 0
    bad = m1.state_dict()
    del bad["2.bias"]
    bad["extra"] = np.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys \['2.bias'\], unexpected keys \['extra'\]"):
        m2.load_state_dict(bad)
    wrong = m1.state_dict()
    wrong["0.weight"] = np.zeros((5, 4))
    before = m2.state_dict()
    with pytest.raises(ValueError, match=r"0.weight: model has \(4, 5\), state has \(5, 4\)"):
        m2.load_state_dict(wrong)
    assert all(np.array_equal(before[k], v) for k, v in m2.state_dict().items())


def test_linear_init_matches_pytorch_default_bounds():
    layer = Linear(400, 300, seed=0)
    bound = 1 / math.sqrt(400)
    assert layer.weight.shape == (300, 400) and layer.weight.dtype == np.float32
    assert np.abs(layer.weight.data).max() <= bound
    assert np.abs(layer.weight.data).max() > 0.95 * bound
    assert np.abs(layer.bias.data).max() <= bound
    assert np.array_equal(Linear(4, 3, seed=5).weight.data, Linear(4, 3, seed=5).weight.data)


def test_layer_errors_name_the_bad_value():
    with pytest.raises(
        ValueError,
        match=r"Linear\(in_features=64\): expected x of shape \(\.\.\., 64\), got \(32, 60\)",
    ):
        Linear(64, 8)(np.ones((32, 60), dtype=np.float32))
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        Linear(0, 3)
    with pytest.raises(ValueError, match=r"p in \[0, 1\), got 1.5"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="pass seed or rng, not both"):
        Linear(2, 2, seed=1, rng=np.random.default_rng(1))
    with pytest.raises(TypeError, match="item 1 is a int"):
        Sequential(ReLU(), 3)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: Linear(2.0, 3),
            TypeError,
            r"Linear: in_features must be a positive integer, got 2.0",
        ),
        (lambda: Linear(2, True), TypeError, "Linear: out_features must be a positive integer"),
        (lambda: Linear(2, 3, bias="false"), TypeError, "Linear: bias must be True or False"),
        (
            lambda: Embedding(0, 3),
            ValueError,
            "Embedding: num_embeddings must be a positive integer, got 0",
        ),
        (
            lambda: Embedding(4, "3"),
            TypeError,
            "Embedding: embedding_dim must be a positive integer",
        ),
        (
            lambda: LayerNorm(4.0),
            TypeError,
            "LayerNorm: normalized_shape must be a positive integer",
        ),
        (
            lambda: LayerNorm(4, elementwise_affine=1),
            TypeError,
            "elementwise_affine must be True or False",
        ),
        (lambda: Dropout("0.5"), TypeError, r"Dropout: p must be a number in \[0, 1\)"),
        (lambda: Dropout(-0.1), ValueError, r"Dropout: expected p in \[0, 1\), got -0.1"),
        (lambda: Linear(2, 3).train("no"), TypeError, r"Linear.train: mode must be True or False"),
        (
            lambda: Linear(2, 3).requires_grad_(0),
            TypeError,
            "Linear.requires_grad_: requires_grad must be",
        ),
    ],
)
def test_wrong_types_are_type_errors_and_wrong_values_value_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_train_eval_and_dropout_module():
    model = Sequential(Linear(6, 6, seed=0), Dropout(0.5, seed=0))
    x = np.ones((4, 6), dtype=np.float32)
    model.eval()
    assert not model[1].training
    np.testing.assert_array_equal(model(x).data, model[0](x).data)
    model.train()
    assert (model(x).data == 0).any()


def test_every_layer_gradchecks_in_float64():
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 4)), requires_grad=True)
    block = Block()
    params = list(block.parameters())

    def fn(x, *ps):
        return block(x)

    gradcheck(fn, x, *params)
    emb = Embedding(5, 3, seed=0, dtype=np.float64)
    gradcheck(lambda w: emb(np.array([[1, 4, 1]])), emb.weight)


def test_zero_grad_and_requires_grad_():
    model = MLP([3, 2], seed=0, dtype=np.float64)
    model(np.ones((1, 3))).sum().backward()
    assert model[0].weight.grad is not None
    model.zero_grad()
    assert model[0].weight.grad is None
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


# ----- LoRALinear --------------------------------------------------------------------------------


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
        ({"r": 0}, ValueError, "r must be positive, got r=0"),
        ({"r": 2.5}, TypeError, r"r must be an int, got 2.5"),
        ({"r": True}, TypeError, "r must be an int, got True"),
        ({"r": 6}, ValueError, r"r=6 exceeds min\(in_features, out_features\)=5"),
        ({"alpha": 0}, ValueError, "alpha must be a positive number, got alpha=0"),
        ({"alpha": -1.0}, ValueError, "alpha=-1.0"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got dropout=1.0"),
        ({"dropout": -0.1}, ValueError, "dropout=-0.1"),
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
