"""loralab.lora.ops and lora_linear: the fused op's hand-derived backward against central differences
and composed ops (the PyTorch comparison is in test_torch_layers.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import Tensor, gradcheck
from loralab.lora import lora_linear
from loralab.lora.ops import lora_backward, lora_forward

SETTINGS = settings(max_examples=12, deadline=None)


def problem(batch, n_in, n_out, r, seed=0, bias=True):
    """float64 inputs with a NONZERO B (with B = 0, dA is exactly 0 and hides bugs)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal(batch + (n_in,))
    W0 = g.standard_normal((n_out, n_in))
    b = g.standard_normal(n_out) if bias else None
    A = g.standard_normal((r, n_in))
    B = g.standard_normal((n_out, r))
    return x, W0, b, A, B


shapes = st.tuples(
    st.lists(st.integers(1, 3), max_size=2).map(tuple),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 3),
    st.booleans(),
)


@given(shape=shapes, scaling=st.floats(0.1, 4.0))
@SETTINGS
def test_fused_op_against_central_differences(shape, scaling):
    batch, n_in, n_out, r, bias = shape
    x, W0, b, A, B = problem(batch, n_in, n_out, r, bias=bias)
    tensors = [Tensor(v, requires_grad=True) if v is not None else None for v in (x, W0, b, A, B)]
    if bias:
        gradcheck(lambda x, W0, b, A, B: lora_linear(x, W0, b, A, B, scaling), *tensors)
    else:
        x_, W0_, _, A_, B_ = tensors
        gradcheck(lambda x, W0, A, B: lora_linear(x, W0, None, A, B, scaling), x_, W0_, A_, B_)


@given(shape=shapes)
@SETTINGS
def test_fused_op_equals_composed_primitive_ops(shape):
    batch, n_in, n_out, r, bias = shape
    s = 1.7
    arrays = problem(batch, n_in, n_out, r, seed=1, bias=bias)

    def run(fused):
        x, W0, b, A, B = (Tensor(v, requires_grad=True) if v is not None else None for v in arrays)
        if fused:
            y = lora_linear(x, W0, b, A, B, s)
        else:
            y = x @ W0.T + ((x @ A.T) @ B.T) * s
            y = y + b if b is not None else y
        c = np.random.default_rng(2).standard_normal(y.shape)
        (y * c).sum().backward()
        return y.data, [t.grad for t in (x, W0, b, A, B) if t is not None]

    y1, g1 = run(True)
    y2, g2 = run(False)
    np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_pure_numpy_pair_matches_the_formulas():
    x, W0, b, A, B = problem((2, 3), 7, 5, 3, seed=3)
    s = 0.75
    y, cache = lora_forward(x, W0, b, A, B, s)
    np.testing.assert_allclose(y, x @ (W0 + s * B @ A).T + b, rtol=1e-12)
    dy = np.random.default_rng(4).standard_normal(y.shape)
    dx, dA, dB, db = lora_backward(dy, cache)
    X, DY = x.reshape(-1, 7), dy.reshape(-1, 5)
    np.testing.assert_allclose(dx, dy @ W0 + s * (dy @ B) @ A, rtol=1e-12)
    np.testing.assert_allclose(dA, s * (DY @ B).T @ X, rtol=1e-12)
    np.testing.assert_allclose(dB, s * DY.T @ (X @ A.T), rtol=1e-12)
    np.testing.assert_allclose(db, DY.sum(0), rtol=1e-12)


def test_frozen_W0_gets_no_gradient():
    x, W0, b, A, B = problem((4,), 6, 5, 2, seed=5)
    x_t, W0_t, b_t = Tensor(x), Tensor(W0), Tensor(b)
    A_t, B_t = Tensor(A, requires_grad=True), Tensor(B, requires_grad=True)
    lora_linear(x_t, W0_t, b_t, A_t, B_t, 2.0).sum().backward()
    assert W0_t.grad is None and b_t.grad is None and x_t.grad is None
    assert A_t.grad.shape == (2, 6) and B_t.grad.shape == (5, 2)
    assert np.abs(A_t.grad).max() > 0  # nonzero B makes dA nonzero


class Recording(np.ndarray):
    """An ndarray that logs the output shape of every matmul it takes part in."""

    log: list = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        def plain(a):
            return a.view(np.ndarray) if isinstance(a, Recording) else a

        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = tuple(plain(o) for o in outs)
        result = getattr(ufunc, method)(*(plain(i) for i in inputs), **kwargs)
        if ufunc is np.matmul:
            Recording.log.append(np.shape(result))
        if outs is not None:
            return outs[0] if len(outs) == 1 else outs
        return result.view(Recording) if isinstance(result, np.ndarray) else result


def test_backward_performs_no_dW_matmul():
    """No matmul in the backward produces an (out, in) matrix: dW0 is never formed."""
    n_in, n_out, r = 11, 7, 3
    x, W0, b, A, B = problem((5, 4), n_in, n_out, r, seed=6)
    _, cache = lora_forward(
        x.view(Recording), W0.view(Recording), b, A.view(Recording), B.view(Recording), 2.0
    )
    Recording.log.clear()
    dy = np.random.default_rng(7).standard_normal((5, 4, n_out)).view(Recording)
    lora_backward(dy, cache)
    assert Recording.log, "the recording array saw no matmul: the test would be vacuous"
    assert (n_out, n_in) not in Recording.log
    assert (r, n_in) in Recording.log and (n_out, r) in Recording.log  # dA and dB were formed
    # the same through the autograd op with W0 frozen
    Recording.log.clear()
    y = lora_linear(
        Tensor(x.view(Recording), requires_grad=True),
        Tensor(W0.view(Recording)),
        Tensor(b),
        Tensor(A.view(Recording), requires_grad=True),
        Tensor(B.view(Recording), requires_grad=True),
        2.0,
    )
    y.backward(dy)
    assert (n_out, n_in) not in Recording.log
    # ...and the recording does see dW0 when W0 is trainable: the check has teeth
    Recording.log.clear()
    y = lora_linear(
        Tensor(x.view(Recording)), Tensor(W0, requires_grad=True), None, Tensor(A), Tensor(B), 2.0
    )
    y.backward(dy)
    assert (n_out, n_in) in Recording.log


def test_dropout_mask_is_applied_to_the_branch_and_its_gradient():
    x, W0, b, A, B = problem((3,), 6, 4, 2, seed=8)
    mask = (np.random.default_rng(9).random(x.shape) > 0.5) / 0.5
    tensors = [Tensor(v, requires_grad=True) for v in (x, W0, b, A, B)]
    gradcheck(lambda *t: lora_linear(*t, 1.5, dropout_mask=mask), *tensors)
    y = lora_linear(*tensors, 1.5, dropout_mask=mask).data
    np.testing.assert_allclose(y, x @ W0.T + b + 1.5 * ((x * mask) @ A.T) @ B.T, rtol=1e-12)


def test_shape_errors_name_both_shapes():
    x, W0, b, A, B = problem((2,), 6, 4, 2)
    with pytest.raises(ValueError, match=r"expected x of shape \(\.\.\., 6\), got \(2, 5\)"):
        lora_linear(np.ones((2, 5)), W0, b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"expected B of shape \(4, 2\), got \(2, 4\)"):
        lora_linear(x, W0, b, A, B.T, 1.0)


@pytest.mark.parametrize(
    ("which", "value", "match"),
    [
        ("b", np.ones((2, 4)), r"expected b of shape \(4,\), got \(2, 4\)"),
        ("b", np.ones(3), r"expected b of shape \(4,\), got \(3,\)"),
        ("W0", np.ones(6), r"expected W0 of shape \(out, in\), got \(6,\)"),
        ("A", np.float64(1.0), r"expected A of shape \(r, 6\), got \(\)"),
        ("A", np.ones(6), r"expected A of shape \(r, 6\), got \(6,\)"),
        ("B", np.ones(4), r"expected B of shape \(4, 2\), got \(4,\)"),
    ],
)
def test_bad_bias_and_weight_ranks_are_named(which, value, match):
    """A (N, out) bias used to be accepted (and its gradient got the wrong shape); 0-d or 1-D
    weights used to raise IndexError or unpacking errors."""
    x, W0, b, A, B = problem((2,), 6, 4, 2)
    args = {"x": x, "W0": W0, "b": b, "A": A, "B": B, "scaling": 1.0}
    args[which] = value
    with pytest.raises(ValueError, match=match):
        lora_linear(**args)
