"""Differentiable functions on tensors (import as ``F``), each a fused op with a hand-written backward.

Fusing (one `loralab.tensor.Function` per layer-sized operation instead of a chain of
primitive ops) keeps the graph short, which is what makes the engine nearly as fast as a training
step written by hand in NumPy. Every function accepts Tensors or ndarrays (ndarrays are constants).
The ops of LLaMA-style models (`rms_norm`, `rotary`, `swiglu`, `grouped_query_attention`, ...) are
written in `loralab.functional_llm` and re-exported here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from loralab._deprecated import moved_attribute
from loralab._validate import boolean, probability
from loralab.functional_llm import (
    grouped_query_attention,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    rotary,
    rotate_half,
    silu,
    swiglu,
)
from loralab.tensor import Function, Tensor, as_tensor

__all__ = [
    "linear",
    "relu",
    "gelu",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "mse_loss",
    "layer_norm",
    "embedding",
    "dropout",
    "dropout_mask",
    # LLaMA's ops, written in loralab.functional_llm
    "rms_norm",
    "rope_inv_freq",
    "rope_tables",
    "rotary",
    "rotate_half",
    "silu",
    "swiglu",
    "grouped_query_attention",
]

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _data(t: Any) -> np.ndarray:
    return t.data if isinstance(t, Tensor) else np.asarray(t)


def _check_last_dim(name: str, x: Any, expected: int, what: str) -> None:
    shape = np.shape(_data(x))
    if len(shape) == 0 or shape[-1] != expected:
        raise ValueError(f"{what}: expected {name} of shape (..., {expected}), got {shape}")


# ----- linear ---------------------------------------------------------------------------------------
class LinearFn(Function):
    """y = x W^T + b. Backward: dx = dy W, dW = dy^T x, db = sum dy (each only when needed)."""

    @staticmethod
    def forward(ctx, x, W, b):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ W.T
        if b is not None:
            y += b
        ctx.save_for_backward(x2, W, x.shape, b is not None)
        return y.reshape(x.shape[:-1] + (W.shape[0],))

    @staticmethod
    def backward(ctx, grad):
        x2, W, x_shape, has_bias = ctx.saved
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_W, need_b = ctx.needs_input_grad
        dx = (g @ W).reshape(x_shape) if need_x else None
        dW = g.T @ x2 if need_W else None
        db = g.sum(axis=0) if has_bias and need_b else None
        return dx, dW, db


def linear(x: Any, weight: Any, bias: Any = None) -> Tensor:
    """Affine map ``y = x W^T + b`` (PyTorch's layout).

    Parameters
    ----------
    x : Tensor of shape (..., in_features)
    weight : Tensor of shape (out_features, in_features)
    bias : Tensor of shape (out_features,), optional

    Returns
    -------
    Tensor of shape (..., out_features)
    """
    w_shape = np.shape(_data(weight))
    if len(w_shape) != 2:
        raise ValueError(
            f"linear: expected weight of shape (out_features, in_features), got {w_shape}"
        )
    what = f"linear(weight of shape {w_shape})"
    _check_last_dim("x", x, w_shape[1], what)
    # A bias of shape (N, out) would broadcast in the forward, but its gradient is (out,).
    if bias is not None and np.shape(_data(bias)) != w_shape[:1]:
        raise ValueError(
            f"{what}: expected bias of shape ({w_shape[0]},), got {np.shape(_data(bias))}"
        )
    return LinearFn.apply(as_tensor(x), weight, bias)


# ----- activations --------------------------------------------------------------------------------
def relu(x: Any) -> Tensor:
    """max(x, 0), elementwise."""
    return as_tensor(x).relu()


class GELUFn(Function):
    """GELU, tanh approximation: y = x h with h = 0.5 (1 + tanh z), z = k (x + c x^3),
    k = sqrt(2/pi), c = 0.044715.

    Backward: dh/dz = 0.5 (1 - tanh^2 z) = 2 h (1 - h) and dz/dx = k (1 + 3 c x^2), so
    dy/dx = h + x dh/dx = h (1 + 2 (1 - h) x dz/dx).

    Both directions update a buffer in place (``*=``, ``+=``) rather than making a new array per
    operation: on activations this size a temporary array costs about as much as the arithmetic.
    """

    @staticmethod
    def forward(ctx, x):
        h = _GELU_C * x * x  # h becomes z = k x (1 + c x^2), then 0.5 (1 + tanh z)
        h += 1.0
        h *= x
        h *= _GELU_K
        h = np.tanh(h)
        h += 1.0
        h *= 0.5
        ctx.save_for_backward(x, h)
        return x * h

    @staticmethod
    def backward(ctx, grad):
        x, h = ctx.saved
        d = x * x  # d becomes dz/dx = k (1 + 3 c x^2), then dy/dx, then grad * dy/dx
        d *= 3.0 * _GELU_C
        d += 1.0
        d *= _GELU_K
        d *= x
        d *= 1.0 - h
        d *= 2.0
        d += 1.0
        d *= h
        d *= grad
        return (d,)


def gelu(x: Any) -> Tensor:
    """GELU with the tanh approximation, equal to PyTorch's ``gelu(x, approximate="tanh")``."""
    return GELUFn.apply(as_tensor(x))


class SoftmaxFn(Function):
    """y = exp(x) / sum(exp(x)) along ``axis``. Backward: dx = y * (dy - sum(dy * y)),
    the softmax Jacobian (diag(y) - y y^T) applied to dy without forming it.
    """

    @staticmethod
    def forward(ctx, x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(y, axis)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, axis = ctx.saved
        return (y * (grad - (grad * y).sum(axis=axis, keepdims=True)),)


def softmax(x: Any, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis``, computed stably (the max is subtracted first)."""
    return SoftmaxFn.apply(as_tensor(x), axis=axis)


class LogSoftmaxFn(Function):
    """y = x - log(sum(exp(x))) along ``axis``. Backward: dx = dy - softmax(x) * sum(dy),
    with softmax(x) = exp(y).
    """

    @staticmethod
    def forward(ctx, x, axis):
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(y, axis)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, axis = ctx.saved
        return (grad - np.exp(y) * grad.sum(axis=axis, keepdims=True),)


def log_softmax(x: Any, axis: int = -1) -> Tensor:
    """log(softmax(x)) along ``axis``, computed stably as x - max - log(sum(exp(x - max)))."""
    return LogSoftmaxFn.apply(as_tensor(x), axis=axis)


# ----- losses -------------------------------------------------------------------------------------
class CrossEntropyFn(Function):
    """Mean over positions of -log softmax(logits)[target]; backward (softmax - onehot) / N."""

    @staticmethod
    def forward(ctx, logits, targets):
        z = logits.reshape(-1, logits.shape[-1])
        t = targets.reshape(-1)
        shifted = z - z.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        logp = shifted - logsumexp
        rows = np.arange(len(t))
        ctx.save_for_backward(logp, t, logits.shape)
        return np.asarray(-logp[rows, t].mean(), dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        logp, t, shape = ctx.saved
        d = np.exp(logp)
        d[np.arange(len(t)), t] -= 1.0
        d *= grad / len(t)
        return d.reshape(shape), None


def cross_entropy(logits: Any, targets: Any) -> Tensor:
    """Cross-entropy loss with integer class targets, averaged over all positions.

    Parameters
    ----------
    logits : Tensor of shape (N, C) or (..., C)
        Unnormalised scores.
    targets : int array of shape (N,) or (...)
        Class indices in [0, C).

    Returns
    -------
    Tensor of shape ()
    """
    z_shape = np.shape(_data(logits))
    t = np.asarray(_data(targets))
    if len(z_shape) < 1 or t.shape != z_shape[:-1]:
        raise ValueError(
            f"cross_entropy: expected targets of shape {z_shape[:-1]} for logits of shape "
            f"{z_shape}, got {t.shape}"
        )
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= z_shape[-1]):
        bad = t.min() if t.min() < 0 else t.max()
        raise ValueError(f"cross_entropy: target {bad} outside [0, {z_shape[-1]})")
    return CrossEntropyFn.apply(as_tensor(logits), t)


class MSELossFn(Function):
    """L = mean((p - t)^2) over all n elements. Backward: dp = 2 (p - t) dL / n, dt = -dp."""

    @staticmethod
    def forward(ctx, pred, target):
        diff = pred - target
        ctx.save_for_backward(diff)
        return np.asarray((diff * diff).mean(), dtype=diff.dtype)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved
        d = diff * (2.0 * grad / diff.size)
        return d, (-d if ctx.needs_input_grad[1] else None)


def mse_loss(pred: Any, target: Any) -> Tensor:
    """Mean squared error, mean over every element. ``pred`` and ``target`` have the same shape."""
    p_shape, t_shape = np.shape(_data(pred)), np.shape(_data(target))
    if p_shape != t_shape:
        raise ValueError(f"mse_loss: expected target of shape {p_shape}, got {t_shape}")
    return MSELossFn.apply(as_tensor(pred), target)


# ----- normalisation and lookup --------------------------------------------------------------------
class LayerNormFn(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance, as PyTorch).

    With xhat the normalised input and sigma = sqrt(var + eps), the backward is
    dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sigma, where dxhat = dy * w.
    """

    @staticmethod
    def forward(ctx, x, w, b, eps):
        xhat = x - x.mean(axis=-1, keepdims=True)  # centred now, normalised in place below
        var = (xhat * xhat).mean(axis=-1, keepdims=True)
        inv_sigma = 1.0 / np.sqrt(var + eps)
        xhat *= inv_sigma
        ctx.save_for_backward(xhat, inv_sigma, w)
        y = xhat * w if w is not None else xhat.copy()
        if b is not None:
            y += b
        return y

    @staticmethod
    def backward(ctx, grad):
        xhat, inv_sigma, w = ctx.saved
        need_x, need_w, need_b = ctx.needs_input_grad
        batch_axes = tuple(range(grad.ndim - 1))
        dw = (grad * xhat).sum(axis=batch_axes) if need_w else None
        db = grad.sum(axis=batch_axes) if need_b else None
        dx = None
        if need_x:
            dxhat = grad * w if w is not None else grad
            dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
            dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
            dx *= inv_sigma
        return dx, dw, db


def layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the last axis.

    Parameters
    ----------
    x : Tensor of shape (..., d)
    weight, bias : Tensor of shape (d,), optional
    eps : float
        Added to the variance.

    Returns
    -------
    Tensor of shape (..., d)
    """
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            d = np.shape(_data(p))
            if len(d) != 1:
                raise ValueError(f"layer_norm: expected {name} of shape (d,), got {d}")
            _check_last_dim("x", x, d[0], f"layer_norm({name} of shape {d})")
    return LayerNormFn.apply(as_tensor(x), weight, bias, eps=eps)


class EmbeddingFn(Function):
    """y = W[indices]. Backward: each row of dy is added into the row of dW it was read
    from (``np.add.at``: a token used twice gets both contributions); other rows stay 0.
    """

    @staticmethod
    def forward(ctx, indices, weight):
        ctx.save_for_backward(indices, weight.shape, weight.dtype)
        return weight[indices]

    @staticmethod
    def backward(ctx, grad):
        indices, shape, dtype = ctx.saved
        dw = np.zeros(shape, dtype=dtype)
        np.add.at(dw, indices.reshape(-1), grad.reshape(-1, shape[1]))  # repeats add up
        return None, dw


def embedding(indices: Any, weight: Any) -> Tensor:
    """Rows of ``weight`` picked by integer ``indices``.

    Parameters
    ----------
    indices : int array of shape (...)
    weight : Tensor of shape (num_embeddings, embedding_dim)

    Returns
    -------
    Tensor of shape (..., embedding_dim)
    """
    idx = np.asarray(_data(indices))
    w_shape = np.shape(_data(weight))
    if len(w_shape) != 2:
        raise ValueError(
            f"embedding: expected weight of shape (num_embeddings, embedding_dim), got {w_shape}"
        )
    n = w_shape[0]
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding: indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise ValueError(f"embedding: index {bad} outside [0, {n})")
    return EmbeddingFn.apply(idx, weight)


# ----- dropout ------------------------------------------------------------------------------------
def dropout_mask(
    shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype: Any = np.float32
) -> np.ndarray:
    """Inverted-dropout mask of ``shape``: 0 with probability p, else 1 / (1 - p)."""
    keep = rng.random(shape) >= p
    return keep.astype(dtype) / np.asarray(1.0 - p, dtype=dtype)


def dropout(
    x: Any, p: float = 0.5, training: bool = True, rng: np.random.Generator | None = None
) -> Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1 / (1 - p).

    Parameters
    ----------
    x : Tensor of any shape
    p : float in [0, 1)
    training : bool
        When False (or p == 0) ``x`` is returned unchanged.
    rng : numpy.random.Generator, optional
        Source of the mask; a fresh unseeded generator when omitted.
    """
    p = probability("p", p, "dropout")
    training = boolean("training", training, "dropout")
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    rng = rng if rng is not None else np.random.default_rng()
    return x * dropout_mask(x.shape, p, rng, x.dtype)


if not TYPE_CHECKING:  # mypy would otherwise accept any attribute of F

    def __getattr__(name: str) -> Any:
        """0.1's names (``F.lora_linear``, ``F.Linear``, ...) with a DeprecationWarning; removed in 0.3."""
        return moved_attribute(__name__, name)
