"""loralab.nn: Module bookkeeping and layers (LoRALinear: test_lora_linear_layer.py)."""

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
        (
            lambda: MLP([2, 3], activation="tanh"),
            ValueError,
            r"MLP: activation must be one of \['relu', 'gelu'\], got activation='tanh'",
        ),
        (lambda: MLP([2, 3], activation=3), TypeError, "MLP: activation must be one of"),
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
