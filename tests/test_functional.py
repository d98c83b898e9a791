"""loralab.functional: gradients against central differences, values against PyTorch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import Tensor, gradcheck
from loralab import functional as F

SETTINGS = settings(max_examples=10, deadline=None)
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def rand(shape, seed=0, requires_grad=True):
    return Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=requires_grad)


@given(batch=batch_shapes, n_in=st.integers(1, 5), n_out=st.integers(1, 5), bias=st.booleans())
@SETTINGS
def test_linear(batch, n_in, n_out, bias):
    x, W = rand(batch + (n_in,), 1), rand((n_out, n_in), 2)
    b = rand((n_out,), 3) if bias else None
    inputs = (x, W, b) if bias else (x, W)
    gradcheck(lambda *t: F.linear(*t), *inputs)
    expected = x.data @ W.data.T + (b.data if bias else 0)
    np.testing.assert_allclose(F.linear(*inputs).data, expected, rtol=1e-12)


@given(batch=batch_shapes, n=st.integers(1, 6))
@SETTINGS
def test_activations_and_softmaxes(batch, n):
    x = rand(batch + (n,), 4)
    gradcheck(F.gelu, x)
    gradcheck(F.softmax, x)
    gradcheck(F.log_softmax, x)
    gradcheck(lambda t: F.softmax(t, axis=0), x)
    np.testing.assert_allclose(F.softmax(x).data.sum(-1), 1.0, rtol=1e-12)


def test_softmax_and_cross_entropy_are_stable_for_huge_logits():
    z = Tensor(np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]]), requires_grad=True)
    assert np.isfinite(F.log_softmax(z).data).all()
    loss = F.cross_entropy(z, np.array([0, 0]))
    loss.backward()
    assert np.isfinite(loss.data) and np.isfinite(z.grad).all()
    assert loss.item() == pytest.approx(1e5 / 2)


@given(batch=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple), c=st.integers(2, 5))
@SETTINGS
def test_cross_entropy(batch, c):
    z = rand(batch + (c,), 5)
    t = np.random.default_rng(6).integers(0, c, size=batch)
    gradcheck(lambda z: F.cross_entropy(z, t), z)
    logp = z.data - np.log(np.exp(z.data).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, t[..., None], -1).mean()
    assert F.cross_entropy(z, t).item() == pytest.approx(expected, rel=1e-12)


def test_mse_layer_norm_embedding_dropout():
    p, q = rand((3, 4), 7), rand((3, 4), 8)
    gradcheck(F.mse_loss, p, q)
    x, w, b = rand((2, 3, 5), 9), rand((5,), 10), rand((5,), 11)
    gradcheck(F.layer_norm, x, w, b)
    gradcheck(lambda x: F.layer_norm(x), x)
    table = rand((6, 3), 12)
    idx = np.array([[0, 5, 5], [2, 0, 1]])
    gradcheck(lambda w: F.embedding(idx, w), table)
    np.testing.assert_array_equal(F.embedding(idx, table).data, table.data[idx])
    mask_rng = np.random.default_rng(0)
    y = F.dropout(p, 0.5, training=True, rng=mask_rng)
    kept = y.data != 0
    np.testing.assert_allclose(y.data[kept], 2 * p.data[kept])
    assert F.dropout(p, 0.5, training=False) is p


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"expected x of shape \(\.\.\., 4\), got \(2, 3\)"):
        F.linear(np.ones((2, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"expected targets of shape \(2,\)"):
        F.cross_entropy(np.ones((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="target 3 outside"):
        F.cross_entropy(np.ones((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(np.ones((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="index 7 outside"):
        F.embedding(np.array([7]), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"p in \[0, 1\), got 1.0"):
        F.dropout(np.ones(3), 1.0)
    with pytest.raises(TypeError, match=r"dropout: p must be a number in \[0, 1\), got '0.5'"):
        F.dropout(np.ones(3), "0.5")
    with pytest.raises(TypeError, match="dropout: training must be True or False, got 'no'"):
        F.dropout(np.ones(3), 0.5, training="no")
    with pytest.raises(ValueError, match=r"expected target of shape \(3,\)"):
        F.mse_loss(np.ones(3), np.ones(4))


@pytest.mark.parametrize(
    ("weight", "bias", "match"),
    [
        # a bias of shape (N, out) broadcasts in the forward, but its gradient would be (out,)
        (
            (5, 4),
            (2, 5),
            r"linear\(weight of shape \(5, 4\)\): expected bias of shape \(5,\), got \(2, 5\)",
        ),
        ((5, 4), (4,), r"expected bias of shape \(5,\), got \(4,\)"),
        ((5, 4), (), r"expected bias of shape \(5,\), got \(\)"),
        ((4,), None, r"linear: expected weight of shape \(out_features, in_features\), got \(4,\)"),
        ((), None, r"expected weight of shape \(out_features, in_features\), got \(\)"),
        (
            (1, 5, 4),
            None,
            r"expected weight of shape \(out_features, in_features\), got \(1, 5, 4\)",
        ),
    ],
)
def test_linear_refuses_weights_and_biases_of_the_wrong_shape(weight, bias, match):
    b = None if bias is None else np.ones(bias)
    with pytest.raises(ValueError, match=match):
        F.linear(rand((2, 4)), rand(weight), b)


def test_layer_norm_and_embedding_refuse_parameters_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"layer_norm: expected weight of shape \(d,\), got \(\)"):
        F.layer_norm(rand((2, 4)), np.ones(()))
    with pytest.raises(
        ValueError, match=r"layer_norm: expected bias of shape \(d,\), got \(1, 4\)"
    ):
        F.layer_norm(rand((2, 4)), np.ones(4), np.ones((1, 4)))
    with pytest.raises(
        ValueError, match=r"embedding: expected weight of shape \(num_embeddings, embedding_dim\)"
    ):
        F.embedding(np.array([0]), np.ones(4))


def test_values_match_pytorch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    x = rand((4, 6), 13)
    tx = torch.tensor(x.data)
    np.testing.assert_allclose(F.gelu(x).data, tf.gelu(tx, approximate="tanh").numpy(), rtol=1e-13)
    np.testing.assert_allclose(F.log_softmax(x).data, tf.log_softmax(tx, -1).numpy(), rtol=1e-13)
    t = np.array([0, 5, 2, 3])
    ce = tf.cross_entropy(tx, torch.tensor(t))
    assert F.cross_entropy(x, t).item() == pytest.approx(ce.item(), rel=1e-13)
    w, b = rand((6,), 14), rand((6,), 15)
    ln = tf.layer_norm(tx, (6,), torch.tensor(w.data), torch.tensor(b.data), eps=1e-5)
    np.testing.assert_allclose(F.layer_norm(x, w, b).data, ln.numpy(), rtol=1e-12, atol=1e-14)
    # gradients too, through a composite of all of them
    tx.requires_grad_(True)
    tw = torch.tensor(w.data, requires_grad=True)
    tf.cross_entropy(
        tf.gelu(tf.layer_norm(tx, (6,), tw, None), approximate="tanh"), torch.tensor(t)
    ).backward()
    F.cross_entropy(F.gelu(F.layer_norm(x, w)), t).backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(w.grad, tw.grad.numpy(), rtol=1e-11, atol=1e-14)


def test_functions_are_named_apart_from_modules():
    """``F.LinearFn`` is the op, ``nn.Linear`` the module: no Function shares a module's name.

    (0.1's ``F.Linear`` still resolves, with a DeprecationWarning, until 0.3: see
    test_deprecations.py; it is not a name defined in F.)
    """
    from loralab import Function

    names = ["Linear", "GELU", "Softmax", "LogSoftmax", "CrossEntropy", "MSELoss", "LayerNorm"]
    for name in [*names, "Embedding"]:
        assert name not in vars(F) and issubclass(getattr(F, f"{name}Fn"), Function)
