"""The autograd engine: every op against central differences, graph rules, accumulation, depth."""

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loralab
from loralab import Tensor, gradcheck, no_grad

SETTINGS = settings(max_examples=15, deadline=None)
dims = st.integers(min_value=1, max_value=4)


def rand(shape, seed=0, positive=False):
    x = np.random.default_rng(seed).standard_normal(shape)
    return Tensor(np.abs(x) + 0.5 if positive else x, requires_grad=True)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast together, e.g. (2, 3, 4) and (3, 1)."""
    shape = draw(st.lists(dims, min_size=1, max_size=3))
    other = [draw(st.sampled_from([n, 1])) for n in shape]
    other = other[draw(st.integers(0, len(other) - 1)) :]
    return tuple(shape), tuple(other)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@given(shapes=broadcast_pair(), swap=st.booleans())
@SETTINGS
def test_binary_ops_with_broadcasting(op, shapes, swap):
    a_shape, b_shape = shapes[::-1] if swap else shapes
    a, b = rand(a_shape, 1), rand(b_shape, 2, positive=(op == "div"))
    fn = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
    }[op]
    gradcheck(fn, a, b)
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


@given(shape=st.lists(dims, min_size=1, max_size=3))
@SETTINGS
def test_unary_ops(shape):
    x = rand(tuple(shape), 3)
    gradcheck(lambda t: -t, x)
    gradcheck(lambda t: t.exp(), x)
    gradcheck(lambda t: t.tanh(), x)
    gradcheck(lambda t: t**3, x)
    p = rand(tuple(shape), 4, positive=True)
    gradcheck(lambda t: t.log(), p)
    gradcheck(lambda t: t**0.5, p)
    gradcheck(lambda t: t**-1.5, p)


def test_relu_away_from_the_kink():
    x = Tensor(np.array([-2.0, -0.5, 0.3, 1.7]), requires_grad=True)
    gradcheck(lambda t: t.relu(), x)
    np.testing.assert_array_equal(x.grad != 0, x.data > 0)


@pytest.mark.parametrize("grad", [True, False])
def test_relu_of_infinities_and_nan(grad):
    """relu(-inf) is 0 (a * (a > 0) made it -inf * 0 = nan), nan stays nan, the dtype stays."""
    a = np.array([-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan], dtype=np.float32)
    x = Tensor(a, requires_grad=grad)
    y = x.relu()
    np.testing.assert_array_equal(y.data, [0.0, 0.0, 0.0, 2.0, np.inf, np.nan])
    assert y.data.dtype == np.float32
    if grad:
        y.sum().backward()
        np.testing.assert_array_equal(x.grad, [0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    with no_grad():
        np.testing.assert_array_equal(x.relu().data, y.data)


@st.composite
def matmul_shapes(draw):
    n, k, m = draw(dims), draw(dims), draw(dims)
    batch = tuple(draw(st.lists(dims, max_size=2)))
    b_batch = batch[draw(st.integers(0, len(batch))) :] if batch else ()
    kind = draw(st.sampled_from(["nd", "vec_left", "vec_right", "vec_vec"]))
    if kind == "vec_vec":
        return (k,), (k,)
    if kind == "vec_left":
        return (k,), b_batch + (k, m)
    if kind == "vec_right":
        return batch + (n, k), (k,)
    return batch + (n, k), b_batch + (k, m)


@given(shapes=matmul_shapes())
@SETTINGS
def test_matmul_with_batch_dimensions(shapes):
    a, b = rand(shapes[0], 5), rand(shapes[1], 6)
    gradcheck(lambda a, b: a @ b, a, b)
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


@given(shape=st.lists(dims, min_size=1, max_size=3), keepdims=st.booleans(), data=st.data())
@SETTINGS
def test_reductions(shape, keepdims, data):
    x = rand(tuple(shape), 7)
    axis = data.draw(st.sampled_from([None, 0, -1, tuple(range(len(shape)))]))
    gradcheck(lambda t: t.sum(axis=axis, keepdims=keepdims), x)
    gradcheck(lambda t: t.mean(axis=axis, keepdims=keepdims), x)


def test_shape_ops():
    x = rand((2, 3, 4), 8)
    gradcheck(lambda t: t.reshape(4, 6), x)
    gradcheck(lambda t: t.reshape(-1), x)
    gradcheck(lambda t: t.transpose(2, 0, 1), x)
    gradcheck(lambda t: t.transpose(), x)
    gradcheck(lambda t: t.T * Tensor(np.arange(24.0).reshape(4, 3, 2)), x)


def test_indexing_by_slices_and_integer_arrays_with_repeats():
    x = rand((5, 3), 9)
    gradcheck(lambda t: t[1:4, ::2], x)
    gradcheck(lambda t: t[2], x)
    gradcheck(lambda t: t[np.array([0, 2, 2, 4])], x)
    gradcheck(lambda t: t[np.array([1, 1, 3]), np.array([0, 2, 0])], x)
    gradcheck(lambda t: t[[0, 2, 2]], x)  # a list is an integer array too: repeats add
    gradcheck(lambda t: t[Tensor(np.array([3, 3]))], x)
    x.grad = None
    x[np.array([1, 1, 1])].sum().backward()
    assert x.grad[1].tolist() == [3.0, 3.0, 3.0]


def test_gradients_accumulate_for_reused_tensors():
    a = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (a + a).sum().backward()
    np.testing.assert_array_equal(a.grad, [2.0, 2.0, 2.0])
    b = Tensor(np.array(3.0), requires_grad=True)
    (b * b * b).backward()  # d/db b^3 = 3 b^2 = 27
    assert b.grad == pytest.approx(27.0)
    (b * 2.0).backward()  # a second backward adds to .grad, as PyTorch does
    assert b.grad == pytest.approx(29.0)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x + x * 2.0,  # x feeds an op and, directly, that op's consumer
        lambda x: x * 2.0 + x,
        lambda x: (x.exp() + x) * (x + 1.0) + x.tanh() * x,  # diamonds sharing x and x.exp()
        lambda x: ((x * x).sum() + x.sum()) * x,  # a residual around a reduction
    ],
)
def test_tensors_used_along_several_paths_get_every_contribution(fn):
    x = rand((3, 2), 12)
    gradcheck(fn, x)


def test_residual_connections_through_layers():
    h = rand((4, 3), 13)
    w = rand((3, 3), 14)

    def block(h, w):
        for _ in range(3):
            h = h + (h @ w).tanh()  # h is used by the matmul and by the residual add
        return h

    gradcheck(block, h, w)


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(sys.getrecursionlimit() * 3):
        y = y + 1e-3
    y.backward()
    assert x.grad == 1.0


def test_no_graph_without_requires_grad_or_under_no_grad():
    w = Tensor(np.ones(3))
    y = w * 2.0 + 1.0
    assert not y.requires_grad and y._parents == ()
    p = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        z = (p * 2.0).sum()
    assert not z.requires_grad and z._parents == ()
    assert loralab.is_grad_enabled()


def test_scalars_keep_the_tensor_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (2.0 * x + 1.5) / 3.0 - 0.5
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_backward_errors_are_clear():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\)"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"expected grad of shape \(2, 3\), got \(3,\)"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        Tensor(np.ones(2)).sum().backward()
    with pytest.raises(TypeError, match="floating point"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(TypeError, match="scalar exponent"):
        x ** np.ones(2)


def test_detach_numpy_and_zero_grad():
    x = Tensor(np.arange(3.0), requires_grad=True)
    d = x.detach()
    assert not d.requires_grad and d.numpy() is x.data
    (x * 2.0).sum().backward()
    x.zero_grad()
    assert x.grad is None


def test_leaf_gradients_are_their_own_writable_arrays():
    a = Tensor(np.ones((2, 3)), requires_grad=True)
    b = Tensor(np.ones((2, 3)), requires_grad=True)
    (a + b).backward(np.full((2, 3), 2.0))  # Add hands the same array to both inputs
    c = Tensor(np.ones(3), requires_grad=True)
    c.sum().backward()  # the gradient of a sum is a broadcast view
    for t in (a, b, c):
        assert t.grad.flags.writeable and t.grad.flags.owndata
    a.grad *= 0.0
    assert b.grad.sum() == 12.0
    dy = np.ones(3)
    leaf = Tensor(np.zeros(3), requires_grad=True)
    leaf.backward(dy)
    leaf.grad += 1.0
    assert dy.tolist() == [1.0, 1.0, 1.0]  # the caller's array is not the leaf's gradient


def test_no_grad_nests_and_restores_the_mode_even_after_an_error():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        with no_grad():
            pass
        assert not loralab.is_grad_enabled() and not (x * 2.0).requires_grad
    assert loralab.is_grad_enabled()
    with pytest.raises(ZeroDivisionError), no_grad():
        raise ZeroDivisionError
    assert loralab.is_grad_enabled() and (x * 2.0).requires_grad


def test_functions_are_named_apart_from_modules():
    """A Function is ``XFn`` (``AddFn``, ``MatMulFn``), never the name of a module (``nn.ReLU``)."""
    import loralab.tensor as T

    functions = [
        name
        for name, obj in vars(T).items()
        if isinstance(obj, type) and issubclass(obj, T.Function) and obj is not T.Function
    ]
    assert len(functions) == 16 and all(name.endswith("Fn") for name in functions), functions


def test_requires_grad_must_be_a_boolean():
    """A string such as "false" would be truthy: refused, as every flag in loralab."""
    with pytest.raises(TypeError, match="Tensor: requires_grad must be True or False, got 'false'"):
        Tensor(np.ones(2), requires_grad="false")
    assert Tensor(np.ones(2), requires_grad=np.bool_(True)).requires_grad is True
