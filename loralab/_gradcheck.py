"""Central-difference gradient checks: the test every hand-written backward must pass.

Use them from the package: ``from loralab import gradcheck, numerical_grad, GradcheckError``.
The module's name starts with an underscore so that ``loralab.gradcheck`` is one thing only,
the function (a module of the same name would be shadowed by it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.tensor import Tensor, no_grad

__all__ = ["gradcheck", "GradcheckError", "numerical_grad"]


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with central differences."""


def numerical_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for every index i.

    ``x`` is perturbed in place and restored; ``f`` reads it.

    Parameters
    ----------
    f : callable returning a float
    x : ndarray of any shape (float64 for meaningful results)
    eps : float

    Returns
    -------
    ndarray of the shape of ``x``
    """
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f()
        x[i] = old - eps
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(
    fn: Callable[..., Tensor],
    *inputs: Tensor,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
) -> bool:
    """Check the gradients of ``fn`` at ``inputs`` against central differences.

    The output is reduced to a scalar by a fixed random projection ``L = sum(c * fn(*inputs))``,
    so every output element takes part. Each input with ``requires_grad=True`` is checked.

    Parameters
    ----------
    fn : callable taking Tensors and returning a Tensor of any shape
    *inputs : Tensor
        Use float64 values; gradients of float32 functions are too noisy to check.
    eps, atol, rtol : float
        Step of the differences; a gradient element passes when
        ``|got - expected| <= atol + rtol * |expected|``.
    seed : int
        Seed of the projection c.

    Returns
    -------
    True when every gradient matches.

    Raises
    ------
    GradcheckError
        Naming the input, the first failing index, the value got and the value expected.
    """
    rng = np.random.default_rng(seed)
    checked = [(i, t) for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, nothing to check")
    for _, t in checked:
        t.grad = None
    out = fn(*inputs)
    c = rng.standard_normal(out.shape).astype(out.dtype)
    (out * c).sum().backward()

    def loss() -> float:
        with no_grad():
            return float((fn(*inputs).data * c).sum())

    for i, t in checked:
        got = t.grad if t.grad is not None else np.zeros_like(t.data)
        expected = numerical_grad(loss, t.data, eps)
        bad = np.abs(got - expected) > atol + rtol * np.abs(expected)
        if bad.any():
            idx = tuple(int(k) for k in np.argwhere(bad)[0])
            raise GradcheckError(
                f"gradcheck: gradient of input {i} (shape {t.shape}) is wrong at index {idx}: "
                f"got {float(got[idx])!r}, expected {float(expected[idx])!r} from central differences "
                f"({int(bad.sum())} of {bad.size} elements differ; max abs error "
                f"{np.abs(got - expected).max():.3g})"
            )
    return True
