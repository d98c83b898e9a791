"""loralab's gradient checks: central differences, and gradcheck's teeth (it can fail)."""

import importlib.util
import re

import numpy as np
import pytest

import loralab
from loralab import Function, GradcheckError, Tensor, gradcheck, numerical_grad


def rand(shape, seed=0, requires_grad=True):
    x = np.random.default_rng(seed).standard_normal(shape)
    return Tensor(x, requires_grad=requires_grad)


def test_numerical_grad_matches_the_derivative_and_restores_x():
    x = np.random.default_rng(0).standard_normal((3, 2))
    before = x.copy()
    grad = numerical_grad(lambda: float((x**3).sum()), x, eps=1e-6)
    # central differences are exact for a cubic up to eps^2 (times the third derivative, 6)
    np.testing.assert_allclose(grad, 3 * before**2, rtol=0, atol=1e-8)
    np.testing.assert_array_equal(x, before)


class WrongSquare(Function):
    """x^2 with a planted bug in its backward (x instead of 2x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return (grad * x,)


def test_gradcheck_passes_a_right_backward_and_catches_a_planted_wrong_one():
    x = rand((3, 2), 10)
    assert gradcheck(lambda t: t * t, x) is True
    with pytest.raises(
        GradcheckError,
        match=r"gradient of input 0 \(shape \(3, 2\)\) is wrong at index \(0, 0\): got .* expected",
    ):
        gradcheck(WrongSquare.apply, x)


def test_gradcheck_names_the_input_that_is_wrong():
    """Only inputs that require a gradient are checked; the message gives the input's position."""
    a, b = rand((2,), 1), rand((2,), 2)
    constant = rand((2,), 3, requires_grad=False)
    gradcheck(lambda a, c, b: a * c + b * b, a, constant, b)
    with pytest.raises(GradcheckError, match="gradient of input 2"):
        gradcheck(lambda a, c, b: a * c + WrongSquare.apply(b), a, constant, b)


def test_gradcheck_fails_with_a_bad_epsilon():
    """A step far too large for a curved function must fail: the check has teeth."""
    x = rand((4,), 11)
    gradcheck(lambda t: t.exp() * t.tanh(), x)
    with pytest.raises(GradcheckError):
        gradcheck(lambda t: t.exp() * t.tanh(), x, eps=1.0)


def test_gradcheck_refuses_when_there_is_nothing_to_check():
    with pytest.raises(ValueError, match="no input has requires_grad=True"):
        gradcheck(lambda t: t * 2.0, rand((2,), requires_grad=False))


def test_loralab_gradcheck_is_the_function_and_no_module_shadows_it():
    assert callable(loralab.gradcheck) and loralab.gradcheck is gradcheck
    assert importlib.util.find_spec("loralab.gradcheck") is None
    assert gradcheck.__module__ == "loralab._gradcheck"


def test_gradcheck_prints_plain_numbers_not_numpy_reprs():
    with pytest.raises(GradcheckError) as info:
        gradcheck(WrongSquare.apply, rand((3, 2), 10))
    message = str(info.value)
    assert "np.float" not in message
    assert re.search(r"got -?\d[\d.e+-]*, expected -?\d[\d.e+-]* from central", message), message
