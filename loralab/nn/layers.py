"""The standard layers, each a thin Module over a function of `loralab.functional`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from loralab import functional as F
from loralab._validate import boolean, one_of, positive_int, probability
from loralab.nn.module import Module, Parameter, make_rng
from loralab.tensor import Tensor, as_tensor

__all__ = ["Linear", "Embedding", "LayerNorm", "ReLU", "GELU", "Dropout", "Sequential", "MLP"]


def check_input(owner: str, x: Any, features: int) -> Tensor:
    """``x`` as a Tensor, after checking its last dimension is ``features`` (the message starts
    with ``owner``: ``Linear(in_features=64): expected x of shape (..., 64), got (32, 60)``)."""
    F._check_last_dim("x", x, features, owner)
    return as_tensor(x)


class Linear(Module):
    """Affine layer ``y = x W^T + b`` with PyTorch's layout and default initialisation.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    seed : int, optional
    rng : numpy.random.Generator, optional
        Source of the initial values (give ``seed`` or ``rng``, not both).
    dtype : numpy dtype, default float32

    Attributes
    ----------
    weight : Parameter of shape (out_features, in_features)
        Initialised U(-1/sqrt(in_features), 1/sqrt(in_features)) (kaiming_uniform with a=sqrt(5)).
    bias : Parameter of shape (out_features,) or None
        Initialised from the same distribution.

    Examples
    --------
    >>> layer = Linear(4, 3, seed=0)
    >>> layer(np.ones((2, 4))).shape
    (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        self.in_features = positive_int("in_features", in_features, "Linear")
        self.out_features = positive_int("out_features", out_features, "Linear")
        bias = boolean("bias", bias, "Linear")
        rng = make_rng(seed, rng)
        bound = 1.0 / math.sqrt(in_features)
        w = rng.uniform(-bound, bound, size=(out_features, in_features))
        self.weight = Parameter(w.astype(dtype))
        self.bias = (
            Parameter(rng.uniform(-bound, bound, out_features).astype(dtype)) if bias else None
        )

    def forward(self, x: Any) -> Tensor:
        """x of shape (..., in_features) -> y of shape (..., out_features)."""
        x = check_input(f"Linear(in_features={self.in_features})", x, self.in_features)
        return F.LinearFn.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table: integer indices of shape (...) -> vectors of shape (..., embedding_dim).

    Attributes
    ----------
    weight : Parameter of shape (num_embeddings, embedding_dim), initialised N(0, 1) as PyTorch.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        self.num_embeddings = positive_int("num_embeddings", num_embeddings, "Embedding")
        self.embedding_dim = positive_int("embedding_dim", embedding_dim, "Embedding")
        rng = make_rng(seed, rng)
        self.weight = Parameter(rng.standard_normal((num_embeddings, embedding_dim)).astype(dtype))

    def forward(self, indices: Any) -> Tensor:
        return F.embedding(indices, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Layer normalisation over the last axis, of size ``normalized_shape``.

    Attributes
    ----------
    weight : Parameter of shape (normalized_shape,), ones
    bias : Parameter of shape (normalized_shape,), zeros
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        *,
        dtype: Any = np.float32,
    ):
        super().__init__()
        self.normalized_shape = positive_int("normalized_shape", normalized_shape, "LayerNorm")
        elementwise_affine = boolean("elementwise_affine", elementwise_affine, "LayerNorm")
        self.eps = float(eps)
        self.weight = (
            Parameter(np.ones(normalized_shape, dtype=dtype)) if elementwise_affine else None
        )
        self.bias = (
            Parameter(np.zeros(normalized_shape, dtype=dtype)) if elementwise_affine else None
        )

    def forward(self, x: Any) -> Tensor:
        x = check_input(f"LayerNorm({self.normalized_shape})", x, self.normalized_shape)
        return F.LayerNormFn.apply(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class ReLU(Module):
    """max(x, 0) elementwise."""

    def forward(self, x: Any) -> Tensor:
        return F.relu(x)


class GELU(Module):
    """GELU, tanh approximation (PyTorch's ``GELU(approximate="tanh")``)."""

    def forward(self, x: Any) -> Tensor:
        return F.gelu(x)


class Dropout(Module):
    """Inverted dropout with probability ``p``, active in training mode only.

    Parameters
    ----------
    p : float in [0, 1)
    seed, rng : source of the masks
    """

    def __init__(
        self, p: float = 0.5, *, seed: int | None = None, rng: np.random.Generator | None = None
    ):
        super().__init__()
        self.p = probability("p", p, "Dropout")
        self.rng = make_rng(seed, rng)

    def forward(self, x: Any) -> Tensor:
        return F.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... as in PyTorch."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def forward(self, x: Any) -> Tensor:
        for m in self._modules.values():
            x = m(x)
        return x


class MLP(Sequential):
    """Multi-layer perceptron: Linear, activation, Linear, ..., Linear.

    Parameters
    ----------
    sizes : sequence of int
        ``[in, hidden_1, ..., out]``; ``len(sizes) - 1`` Linear layers, named "0", "2", "4", ...
        (activations take the odd names), as ``torch.nn.Sequential`` would name them.
    activation : "relu" or "gelu"
    bias : bool
    seed, rng : source of the initial values (all layers draw from one generator, in order)
    dtype : numpy dtype, default float32

    Examples
    --------
    >>> mlp = MLP([4, 8, 3], seed=0)
    >>> [name for name, _ in mlp.named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        activation: str = "relu",
        bias: bool = True,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP: sizes needs at least [in, out], got {sizes}")
        acts = {"relu": ReLU, "gelu": GELU}
        activation = one_of("activation", activation, acts, "MLP")
        rng = make_rng(seed, rng)
        layers: list[Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(acts[activation]())
            layers.append(Linear(n_in, n_out, bias, rng=rng, dtype=dtype))
        super().__init__(*layers)
        self.sizes = sizes
