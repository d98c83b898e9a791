"""The autograd engine: a thin ``Tensor`` over ``np.ndarray`` and ops with hand-written backwards.

Every op is a small `Function` whose ``forward`` and ``backward`` sit side by side, so the
whole chain rule of an op fits on one screen. ``Function.apply`` records the op in the graph only
when some input requires a gradient: a frozen weight (``requires_grad=False``) costs nothing.

A Function is named ``XFn`` (``AddFn``, ``MatMulFn``; ``LinearFn`` in `loralab.functional`) so
that it is never mistaken for a module of the same idea (``loralab.nn.Linear``).

``Tensor.backward`` walks the graph in reverse topological order (found iteratively, so deep
graphs never hit Python's recursion limit) and *accumulates* gradients, so a tensor used twice
(``a + a``) receives the sum of both contributions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from loralab._deprecated import moved_attribute
from loralab._validate import boolean

__all__ = [
    "Tensor",
    "Function",
    "Context",
    "no_grad",
    "is_grad_enabled",
    "as_tensor",
]

# Grad mode: whether `Function.apply` records the graph. One switch for the whole process
# (PyTorch keeps one per thread); only `no_grad` flips it, and it always restores the old value.
_grad_enabled = True


def is_grad_enabled() -> bool:
    """Whether new operations are recorded for backpropagation."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context manager in which no graph is recorded (inference, optimizer updates).

    >>> import loralab
    >>> w = loralab.Tensor([1.0, 2.0], requires_grad=True)
    >>> with loralab.no_grad():
    ...     y = w * 3.0
    >>> y.requires_grad
    False
    """
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


class Context:
    """What a ``Function.forward`` leaves for its ``backward``.

    Attributes
    ----------
    saved : tuple
        Whatever ``forward`` passed to `save_for_backward`.
    needs_input_grad : tuple of bool
        One flag per positional input: whether that input needs a gradient. A backward uses
        it to skip work, e.g. the fused LoRA op never forms dW0 for a frozen W0.
    """

    __slots__ = ("saved", "needs_input_grad")

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self.saved: tuple = ()
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *values: Any) -> None:
        self.saved = values


class Function:
    """Base class of every differentiable op.

    Subclasses define two static methods on plain ``np.ndarray`` values::

        forward(ctx, *inputs, **options) -> ndarray
        backward(ctx, grad) -> tuple      # one gradient (or None) per positional input

    and are called through `apply`, which unwraps tensors, runs ``forward`` and, only when
    some input requires a gradient and grad mode is on, links the result into the graph.
    """

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad: np.ndarray) -> tuple:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> Tensor:
        needs = tuple(isinstance(t, Tensor) and t.requires_grad for t in inputs)
        record = _grad_enabled and any(needs)
        ctx = Context(needs)
        arrays = [t.data if isinstance(t, Tensor) else t for t in inputs]
        out = Tensor(cls.forward(ctx, *arrays, **kwargs))
        if record:
            out.requires_grad = True
            out._ctx = ctx
            out._op = cls
            out._parents = inputs
        return out


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched, back to ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1
    )
    grad = grad.sum(axis=axes, keepdims=True) if axes else grad
    return grad.reshape(shape)


class Tensor:
    """An ``np.ndarray`` that remembers how it was made, so gradients can flow back through it.

    Parameters
    ----------
    data : array_like
        The values. Kept as given (``np.asarray``); a float32 array stays float32.
    requires_grad : bool, default False
        Whether ``backward`` should compute and store ``.grad`` for this tensor. Only floating
        point tensors can require a gradient.

    Attributes
    ----------
    data : ndarray
        The values.
    grad : ndarray or None
        Accumulated gradient of the loss with respect to ``data`` (same shape), set by
        `backward` on tensors that require a gradient and were not produced by an op.

    Examples
    --------
    >>> import loralab
    >>> x = loralab.Tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> loss = (x * x).sum()
    >>> loss.backward()
    >>> x.grad
    array([2., 4., 6.])
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_op", "_parents", "__weakref__")
    __array_priority__ = 100  # ndarray (op) Tensor defers to Tensor's reflected operators

    def __init__(self, data: Any, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        self.data: np.ndarray = data if isinstance(data, np.ndarray) else np.asarray(data)
        if requires_grad and not np.issubdtype(self.data.dtype, np.floating):
            raise TypeError(
                f"Tensor(requires_grad=True) needs floating point data, got dtype {self.data.dtype}"
            )
        self.grad: np.ndarray | None = None
        self.requires_grad = boolean("requires_grad", requires_grad, "Tensor")
        self._ctx: Context | None = None
        self._op: type[Function] | None = None
        self._parents: tuple = ()

    # ----- array-like properties -----------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, prefix='Tensor(')}{grad})"

    def numpy(self) -> np.ndarray:
        """The values as an ``np.ndarray`` (the same array, not a copy)."""
        return self.data

    def item(self) -> float:
        """The value of a one-element tensor as a Python number."""
        return self.data.item()

    def detach(self) -> Tensor:
        """A tensor sharing the values but cut from the graph (no gradient flows through it)."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        """Forget the accumulated gradient (``grad = None``)."""
        self.grad = None

    def astype(self, dtype: Any) -> Tensor:
        """A copy with another dtype, cut from the graph; keeps ``requires_grad``."""
        return Tensor(self.data.astype(dtype), requires_grad=self.requires_grad)

    # ----- backpropagation -------------------------------------------------------------------
    def backward(self, grad: Any = None) -> None:
        """Backpropagate from this tensor, accumulating ``.grad`` on every leaf that requires one.

        Parameters
        ----------
        grad : array_like of shape ``self.shape``, optional
            The gradient of the final scalar with respect to this tensor. Defaults to 1 when this
            tensor holds a single value; required otherwise.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() called on a tensor that does not require a gradient: no input of the "
                "computation had requires_grad=True (or it ran under no_grad())"
            )
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient works only for a single value; this tensor has "
                    f"shape {self.shape}: pass grad of shape {self.shape}"
                )
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(
                    f"backward(grad): expected grad of shape {self.shape}, got {grad.shape}"
                )

        grads: dict[int, np.ndarray] = {id(self): grad}
        for node in _reverse_topological(self):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            op, ctx = node._op, node._ctx
            if op is None or ctx is None:  # a leaf (apply sets both or neither): store its gradient
                if node.grad is not None:
                    node.grad = node.grad + g
                elif g is grad or not (g.flags.owndata and g.flags.writeable):
                    # the caller's array, a broadcast view or a slice of another gradient:
                    # a leaf's .grad is always its own writable array, as in PyTorch
                    node.grad = g.copy()
                else:
                    node.grad = g
                continue
            parent_grads = op.backward(ctx, g)
            for parent, pg in zip(node._parents, parent_grads):
                if pg is None or not isinstance(parent, Tensor) or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg

    # ----- operators -----------------------------------------------------------------------------
    def _lift(self, other: Any) -> Any:
        """Python scalars and arrays become constants of this tensor's dtype (no float64 upcast)."""
        if isinstance(other, Tensor):
            return other
        return np.asarray(other, dtype=self.dtype)

    def __add__(self, other: Any) -> Tensor:
        return AddFn.apply(self, self._lift(other))

    def __radd__(self, other: Any) -> Tensor:
        return AddFn.apply(self._lift(other), self)

    def __sub__(self, other: Any) -> Tensor:
        return SubFn.apply(self, self._lift(other))

    def __rsub__(self, other: Any) -> Tensor:
        return SubFn.apply(self._lift(other), self)

    def __mul__(self, other: Any) -> Tensor:
        return MulFn.apply(self, self._lift(other))

    def __rmul__(self, other: Any) -> Tensor:
        return MulFn.apply(self._lift(other), self)

    def __truediv__(self, other: Any) -> Tensor:
        return DivFn.apply(self, self._lift(other))

    def __rtruediv__(self, other: Any) -> Tensor:
        return DivFn.apply(self._lift(other), self)

    def __neg__(self) -> Tensor:
        return NegFn.apply(self)

    def __pow__(self, exponent: float) -> Tensor:
        if isinstance(exponent, Tensor) or np.ndim(exponent) != 0:
            raise TypeError(f"Tensor ** exponent needs a scalar exponent, got {type(exponent)}")
        return PowFn.apply(self, exponent=float(exponent))

    def __matmul__(self, other: Any) -> Tensor:
        return MatMulFn.apply(self, self._lift(other))

    def __rmatmul__(self, other: Any) -> Tensor:
        return MatMulFn.apply(self._lift(other), self)

    def __getitem__(self, index: Any) -> Tensor:
        return GetItemFn.apply(self, index=index)

    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Sum over ``axis`` (all axes by default)."""
        return SumFn.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Mean over ``axis`` (all axes by default)."""
        return MeanFn.apply(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape: Any) -> Tensor:
        """The same values in another shape (``-1`` allowed once)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return ReshapeFn.apply(self, shape=shape)

    def transpose(self, *axes: int) -> Tensor:
        """Permute axes (reverse them when none are given), like ``np.transpose``."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return TransposeFn.apply(self, axes=axes or None)

    @property
    def T(self) -> Tensor:
        """All axes reversed, as NumPy's ``.T``."""
        return TransposeFn.apply(self, axes=None)

    def exp(self) -> Tensor:
        return ExpFn.apply(self)

    def log(self) -> Tensor:
        return LogFn.apply(self)

    def tanh(self) -> Tensor:
        return TanhFn.apply(self)

    def relu(self) -> Tensor:
        return ReLUFn.apply(self)


def as_tensor(value: Any) -> Tensor:
    """``value`` if it is a Tensor, else a constant Tensor wrapping it."""
    return value if isinstance(value, Tensor) else Tensor(value)


def _reverse_topological(root: Tensor) -> list[Tensor]:
    """Nodes reachable from ``root``, each after every node that uses it (iterative DFS)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:  # every input of node is already in order: node may follow them
            order.append(node)
            continue
        # Mark a node when it is expanded, not when it is pushed: a node pushed twice (an input
        # of two ops) must be finished before the first op that uses it finishes.
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if isinstance(parent, Tensor) and parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


# ----- elementwise arithmetic (broadcasting: gradients are summed back to each input's shape) -----
class AddFn(Function):
    """``a + b``: the gradient passes unchanged to both, summed back over broadcast axes."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(np.shape(a), np.shape(b))
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.saved
        need_a, need_b = ctx.needs_input_grad
        return (
            unbroadcast(grad, a_shape) if need_a else None,
            unbroadcast(grad, b_shape) if need_b else None,
        )


class SubFn(Function):
    """``a - b``: da = grad, db = -grad, each summed back over broadcast axes."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(np.shape(a), np.shape(b))
        return a - b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.saved
        need_a, need_b = ctx.needs_input_grad
        return (
            unbroadcast(grad, a_shape) if need_a else None,
            unbroadcast(-grad, b_shape) if need_b else None,
        )


class MulFn(Function):
    """``a * b``: da = grad * b, db = grad * a (the product rule), summed back to each shape."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        da = unbroadcast(grad * b, np.shape(a)) if ctx.needs_input_grad[0] else None
        db = unbroadcast(grad * a, np.shape(b)) if ctx.needs_input_grad[1] else None
        return da, db


class DivFn(Function):
    """``a / b``: da = grad / b, db = -grad * a / b^2, summed back to each shape."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        da = unbroadcast(grad / b, np.shape(a)) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-grad * a / (b * b), np.shape(b)) if ctx.needs_input_grad[1] else None
        return da, db


class NegFn(Function):
    """``-a``: da = -grad."""

    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return (-grad,)


class PowFn(Function):
    """``a ** p`` for a scalar exponent p: d/da = p a^(p-1)."""

    @staticmethod
    def forward(ctx, a, exponent):
        ctx.save_for_backward(a, exponent)
        return a**exponent

    @staticmethod
    def backward(ctx, grad):
        a, p = ctx.saved
        return (grad * (p * a ** (p - 1)),)


class MatMulFn(Function):
    """``a @ b`` with NumPy's rules (batch dimensions broadcast; 1-D operands promoted).

    For 2-D operands, C = A B gives dA = dC B^T and dB = A^T dC; batch dimensions that were
    broadcast are summed back.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        # A 1-D operand is a matrix with one row (a) or one column (b), as NumPy promotes it;
        # the gradient gets the matching axis back, and loses it again at the end.
        a2 = a[None, :] if a.ndim == 1 else a  # (k,) -> (1, k)
        b2 = b[:, None] if b.ndim == 1 else b  # (k,) -> (k, 1)
        g = grad
        if b.ndim == 1:  # first, so that a scalar (vector @ vector) becomes (1,) then (1, 1)
            g = np.expand_dims(g, -1)
        if a.ndim == 1:
            g = np.expand_dims(g, -2)
        need_a, need_b = ctx.needs_input_grad
        da = unbroadcast(g @ np.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape) if need_a else None
        db = unbroadcast(np.swapaxes(a2, -1, -2) @ g, b2.shape).reshape(b.shape) if need_b else None
        return da, db


# ----- reductions and shape ops ---------------------------------------------------------------
def _expand_reduced(
    grad: np.ndarray, shape: tuple[int, ...], axis: Any, keepdims: bool
) -> np.ndarray:
    """Broadcast the gradient of a reduction back over the reduced axes."""
    if axis is not None and not keepdims:
        axes = (axis,) if np.ndim(axis) == 0 else tuple(axis)
        grad = np.expand_dims(grad, tuple(a % len(shape) for a in axes))
    return np.broadcast_to(grad, shape)


class SumFn(Function):
    """Sum over ``axis``: every summed element gets the gradient of the sum."""

    @staticmethod
    def forward(ctx, a, axis, keepdims):
        ctx.save_for_backward(a.shape, axis, keepdims)
        return np.asarray(a.sum(axis=axis, keepdims=keepdims))

    @staticmethod
    def backward(ctx, grad):
        shape, axis, keepdims = ctx.saved
        return (_expand_reduced(grad, shape, axis, keepdims),)


class MeanFn(Function):
    """Mean over ``axis``: every element gets the gradient of the mean divided by the count."""

    @staticmethod
    def forward(ctx, a, axis, keepdims):
        out = np.asarray(a.mean(axis=axis, keepdims=keepdims))
        ctx.save_for_backward(a.shape, axis, keepdims, a.size // max(out.size, 1))
        return out

    @staticmethod
    def backward(ctx, grad):
        shape, axis, keepdims, count = ctx.saved
        return (_expand_reduced(grad / count, shape, axis, keepdims),)


class ReshapeFn(Function):
    """The same values in another shape: the gradient is reshaped back."""

    @staticmethod
    def forward(ctx, a, shape):
        ctx.save_for_backward(a.shape)
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (shape,) = ctx.saved
        return (grad.reshape(shape),)


class TransposeFn(Function):
    """Axes permuted: the gradient goes back through the inverse permutation."""

    @staticmethod
    def forward(ctx, a, axes):
        ctx.save_for_backward(axes)
        return np.transpose(a, axes)

    @staticmethod
    def backward(ctx, grad):
        (axes,) = ctx.saved
        inverse = None if axes is None else tuple(np.argsort(axes))
        return (np.transpose(grad, inverse),)


def _is_advanced(index: Any) -> bool:
    """Whether ``index`` holds an integer or boolean array (NumPy's advanced indexing)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


class GetItemFn(Function):
    """``a[index]``; the backward scatters the gradient back, adding where an index repeats."""

    @staticmethod
    def forward(ctx, a, index):
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        ctx.save_for_backward(a.shape, a.dtype, index)
        return np.asarray(a[index])

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, index = ctx.saved
        out = np.zeros(shape, dtype=dtype)
        if _is_advanced(index):
            np.add.at(out, index, grad)  # repeated indices must add, not overwrite
        else:
            out[index] = grad
        return (out,)


# ----- elementwise functions --------------------------------------------------------------------
class ExpFn(Function):
    """y = exp(a): dy/da = exp(a) = y, so the output is saved rather than the input."""

    @staticmethod
    def forward(ctx, a):
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad * out,)


class LogFn(Function):
    """y = log(a): dy/da = 1 / a."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.log(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad / a,)


class TanhFn(Function):
    """y = tanh(a): dy/da = 1 - y^2."""

    @staticmethod
    def forward(ctx, a):
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad * (1 - out * out),)


class ReLUFn(Function):
    """y = max(a, 0): the gradient passes where a > 0 and is 0 elsewhere."""

    @staticmethod
    def forward(ctx, a):
        if ctx.needs_input_grad[0]:  # (only the backward needs the mask)
            ctx.save_for_backward(a > 0)
        return np.maximum(a, 0)  # (a * (a > 0) would make relu(-inf) = -inf * 0 = nan)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved
        return (grad * mask,)


if not TYPE_CHECKING:  # mypy would otherwise accept any attribute of loralab.tensor

    def __getattr__(name: str) -> Any:
        """0.1's ``Add``, ``MatMul``, ... (now ``AddFn``, ...), with a DeprecationWarning."""
        return moved_attribute(__name__, name)
