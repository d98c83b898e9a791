"""`LoRAEmbedding`: a frozen embedding table plus a trainable rank-r update, and its Function.

Looking up token t in a table E (num_embeddings, embedding_dim) is multiplying E^T by the one-hot
vector e_t, so LoRA adapts an embedding as it adapts a Linear layer (with in = num_embeddings and
out = embedding_dim, as PEFT counts them):

    h = E[t] + s A^T[t] B^T            ΔE = s (B A)^T, shape (num_embeddings, embedding_dim)

with PEFT's names and shapes, ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B``
(embedding_dim, r), and s = alpha / r (alpha / sqrt(r) for rsLoRA). The math, a gather forward and a
scatter-add backward that touch only the used token columns of A, is `loralab.lora.embedding_ops`.

Initialisation follows PEFT's source (``peft/tuners/lora/layer.py``, ``reset_lora_parameters``):
A = 0 and B ~ N(0, 1), the reverse of LoRALinear's and the choice of the LoRA authors' ``loralib``
(its ``Embedding`` layer). ΔE = 0 at the start either way. PEFT draws the same values for
``init_lora_weights=True`` and ``"gaussian"``, so both inits give them here; PiSSA, OLoRA and DoRA
are not implemented for embeddings and are refused.

As in PEFT, ``dropout`` is accepted (a config sets it for every target) but an embedding's LoRA
branch applies none: its input is a token id, not a vector to drop entries from.

Named adapters: a LoRAEmbedding holds one adapter, named after the adapter it was made for
(PEFT's ``"default"`` unless named), and follows the protocol of `loralab.lora.linear_shared.LoRALayerMixin` for it
(``adapter_names``, ``active_adapter_names``, ``merged_adapters``, ``disabled``, ``mixed_rows``),
so `loralab.lora.set_adapter`, ``disable_adapters`` and ``mixed_batch`` switch it on and off
with the model's other layers. A second adapter on an embedding is not implemented.

`LoRAEmbeddingMixin` is what the NumPy layer here and the torch layer
(`loralab.torch.embedding.LoRAEmbedding`) share: validation, options, initialisation (in NumPy,
so both start equal bit for bit), ΔE, merging and the repr.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralab.lora.config import lora_scaling
from loralab.lora.embedding_ops import lora_embedding_backward, lora_embedding_forward
from loralab.lora.linear_shared import (
    BASE_ROWS,
    DEFAULT_ADAPTER,
    MIXED_BATCH_ATTRIBUTES,
    check_adapter_name,
    validate_lora_options,
)
from loralab.lora.variants import KINDS
from loralab.nn.layers import Embedding
from loralab.nn.module import Module, Parameter, make_rng
from loralab.tensor import Function, Tensor

__all__ = [
    "LoRAEmbedding",
    "LoRAEmbeddingFn",
    "LoRAEmbeddingMixin",
    "EMBEDDING_TYPES",
    "validate_embedding_options",
    "check_ids",
]

EMBEDDING_TYPES: list[type] = [Embedding]
"""The module types `LoRAEmbedding` wraps and `loralab.lora.inject_lora` targets as embeddings."""


def validate_embedding_options(
    num_embeddings: int,
    embedding_dim: int,
    r: Any,
    alpha: Any,
    dropout: Any,
    init: Any,
    use_rslora: Any = False,
    use_dora: Any = False,
) -> None:
    """Raise a clear error for a bad option of a LoRAEmbedding (shared by both backends and injection).

    The same validators as `loralab.lora.linear_shared.validate_lora_options` (r at most
    min(num_embeddings, embedding_dim)); DoRA and the W0-splitting inits are refused.
    """
    where = f"LoRAEmbedding(num_embeddings={num_embeddings}, embedding_dim={embedding_dim})"
    validate_lora_options(
        num_embeddings, embedding_dim, r, alpha, dropout, init, use_rslora, use_dora, where=where
    )
    if use_dora or init not in ("kaiming", "gaussian"):
        raise ValueError(
            f"{where}: use_dora={use_dora}, init={init!r} are not implemented for embeddings; "
            "use init='kaiming' or 'gaussian' (both give PEFT's A = 0, B ~ N(0, 1)) without DoRA"
        )


def check_ids(where: str, ids: Any, num_embeddings: int) -> np.ndarray:
    """``ids`` as an integer ndarray with every entry in [0, num_embeddings); else a named error."""
    ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{where}: expected integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_embeddings):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"{where}: token id {bad} outside [0, {num_embeddings})")
    return ids


class LoRAEmbeddingMixin:
    """What the NumPy and torch `LoRAEmbedding` share; a backend class supplies
    ``_parameter(array)`` (a trainable parameter holding ``array``, on the table's device) and
    ``_table_array(base)`` (the table E as an ndarray)."""

    _quiet = MIXED_BATCH_ATTRIBUTES  # set for every batch (``Module._quiet``)

    base: Any
    lora_embedding_A: Any
    lora_embedding_B: Any
    num_embeddings: int
    embedding_dim: int
    in_features: int
    out_features: int
    r: int
    alpha: float
    dropout: float
    init: str
    use_rslora: bool
    use_dora: bool
    scaling: float
    merged: bool
    adapter_names: list[str]
    active_adapter_names: list[str]
    disabled: bool
    mixed_rows: list[str] | None

    def _parameter(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def _table_array(self, base: Any) -> np.ndarray:
        raise NotImplementedError

    def _init_lora(
        self,
        base: Any,
        rng: np.random.Generator,
        r: Any,
        alpha: Any,
        dropout: Any,
        init: Any,
        use_rslora: Any,
        use_dora: Any,
        adapter_name: Any = DEFAULT_ADAPTER,
    ) -> None:
        """Validate the options, freeze ``base``, then create A = 0 and B ~ N(0, 1) (PEFT's init)."""
        n, d = base.num_embeddings, base.embedding_dim
        check_adapter_name(adapter_name, "LoRAEmbedding")
        validate_embedding_options(n, d, r, alpha, dropout, init, use_rslora, use_dora)
        base.requires_grad_(False)
        self.base = base
        self.num_embeddings, self.embedding_dim = n, d
        self.in_features, self.out_features = n, d  # PEFT's names for the same sizes
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.init, self.use_rslora, self.use_dora = init, bool(use_rslora), False
        self.scaling = lora_scaling(self.alpha, self.r, self.use_rslora)
        dtype = self._table_array(base).dtype
        # Drawn and cast in NumPy, so float32 values agree bit for bit between the backends.
        self.lora_embedding_A = self._parameter(np.zeros((self.r, n), dtype=dtype))
        self.lora_embedding_B = self._parameter(rng.standard_normal((d, self.r)).astype(dtype))
        self.merged = False
        self.adapter_names, self.active_adapter_names = [adapter_name], [adapter_name]
        self.disabled, self.mixed_rows = False, None

    # ----- its one named adapter (the protocol of loralab.lora.linear_shared.LoRALayerMixin) -----
    @property
    def merged_adapters(self) -> list[str]:
        return list(self.adapter_names) if self.merged else []

    def adapter(self, name: str) -> Any:
        """The holder of adapter ``name``'s A, B and options: the layer itself."""
        if name not in self.adapter_names:
            raise ValueError(
                f"{self._describe()}: no adapter {name!r}; its adapter is {self.adapter_names}"
            )
        return self

    def holders(self, names: list[str]) -> list[Any]:
        """``[self.adapter(n) for n in names]``."""
        return [self.adapter(n) for n in names]

    def adapter_parameters(self, name: str) -> dict[str, Any]:
        """``{"lora_embedding_A": ..., "lora_embedding_B": ...}`` of adapter ``name``."""
        self.adapter(name)
        return {
            "lora_embedding_A": self.lora_embedding_A,
            "lora_embedding_B": self.lora_embedding_B,
        }

    def _names_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapter_names if adapter_names is None else adapter_names
        return [n for n in names if n in self.adapter_names]

    def _rows(self, ids_shape: tuple[int, ...]) -> np.ndarray | None:
        """Which rows (first axis of the ids) add the adapter: None for all; a bool (batch,) array
        in a mixed batch (`loralab.lora.mixed_batch`)."""
        if self.mixed_rows is None:
            return None
        if len(ids_shape) < 1 or ids_shape[0] != len(self.mixed_rows):
            raise ValueError(
                f"{self._describe()}: mixed_batch got {len(self.mixed_rows)} adapter names but the "
                f"ids have shape {tuple(ids_shape)}; expected ({len(self.mixed_rows)}, ...), one "
                "name per row"
            )
        return np.array([n == self.adapter_names[0] for n in self.mixed_rows])

    def _adds_adapter(self) -> bool:
        """Whether the forward adds the adapter at all (not merged, not disabled, active or mixed)."""
        if self.merged or self.disabled:
            return False
        if self.mixed_rows is not None:
            return any(n != BASE_ROWS and n in self.adapter_names for n in self.mixed_rows)
        return self.adapter_names[0] in self.active_adapter_names

    @property
    def kind(self) -> Any:
        """Plain LoRA (`loralab.lora.variants.KINDS[False]`): no parameters beyond A and B."""
        return KINDS[False]

    @property
    def weight(self) -> Any:
        """The table E (ΔE included while merged); a tied output head reads it."""
        return self.base.weight

    def delta_weight(self) -> Any:
        """ΔE = s (B A)^T, of shape (num_embeddings, embedding_dim), outside any graph."""
        return self.scaling * (self.lora_embedding_B.data @ self.lora_embedding_A.data).T

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add ΔE into E in place: a lookup then costs what the plain table costs.

        ``adapter_names`` (default: the active ones) that do not name this layer's adapter
        merge nothing.
        """
        if not self._names_to_merge(adapter_names):
            return
        if self.merged:
            raise ValueError(
                "LoRAEmbedding.merge(): the layer is already merged; call unmerge() first"
            )
        self.base.weight.data += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔE from E again, restoring the pre-trained table (up to round-off)."""
        if not self.merged:
            raise ValueError("LoRAEmbedding.unmerge(): the layer is not merged; nothing to unmerge")
        self.base.weight.data -= self.delta_weight()
        self.merged = False

    def _describe(self) -> str:
        return (
            f"LoRAEmbedding(num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, r={self.r})"
        )

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}, "
            f"alpha={self.alpha:g}{rs}, merged={self.merged}"
        )


class LoRAEmbeddingFn(Function):
    """``h = E[ids] + s A^T[ids] B^T`` over (ids, E, A, B), the backward of
    `loralab.lora.embedding_ops.lora_embedding_backward`. With ``rows`` (bool, shape (batch,)) only
    those rows of a mixed batch add the adapter; the others are E[ids].

    ids get no gradient (they are integers); dA touches only the columns of used tokens; dE is
    formed (a scatter-add of dh into the used rows) only if E itself requires a gradient.
    """

    @staticmethod
    def forward(ctx, ids, E, A, B, scaling, rows=None):
        h, cache = lora_embedding_forward(ids, E, A, B, scaling)
        if rows is not None:  # a mixed batch: the other rows get E[ids] alone
            keep = rows.reshape((-1,) + (1,) * (h.ndim - 1))
            h = np.where(keep, h, E[ids])
        ctx.save_for_backward(cache, E.shape, rows)
        return h

    @staticmethod
    def backward(ctx, grad):
        cache, e_shape, rows = ctx.saved
        dlora = grad if rows is None else grad * rows.reshape((-1,) + (1,) * (grad.ndim - 1))
        dA, dB = lora_embedding_backward(dlora, cache)
        dE = None
        if ctx.needs_input_grad[1]:  # full fine-tuning of the table only: LoRA never needs it
            dE = np.zeros(e_shape, dtype=grad.dtype)
            np.add.at(dE, cache.ids, grad.reshape(-1, e_shape[1]))
        return None, dE, dA, dB


class LoRAEmbedding(LoRAEmbeddingMixin, Module):
    """A frozen embedding table plus a trainable rank-r update.

    $$h = E[t] + \\frac{\\alpha}{r} A^T[t] \\, B^T$$

    Parameters
    ----------
    base : loralab.nn.Embedding
        The pre-trained table E (num_embeddings, embedding_dim); kept as ``base`` and frozen.
    r : int, default 8
        Rank of the update, 1 <= r <= min(num_embeddings, embedding_dim).
    alpha : float, default 8
        scaling = alpha / r (alpha / sqrt(r) with ``use_rslora``).
    dropout : float in [0, 1), default 0.0
        Stored for the adapter's config; not applied (as in PEFT, see the module docstring).
    init : "kaiming" or "gaussian"
        Both give PEFT's embedding init: A = 0, B ~ N(0, 1).
    use_rslora : bool, default False
    use_dora : bool, default False
        Only False: DoRA on embeddings is not implemented.
    adapter_name : str, default "default"
        The name of its one adapter (PEFT's).
    seed, rng : source of B's initial values.

    Attributes
    ----------
    lora_embedding_A : Parameter of shape (r, num_embeddings)
    lora_embedding_B : Parameter of shape (embedding_dim, r)
    scaling : float
    merged : bool
        Whether ΔE is currently added into ``base.weight``.

    Examples
    --------
    >>> from loralab.nn import Embedding
    >>> layer = LoRAEmbedding(Embedding(10, 6, seed=0), r=2, alpha=4, seed=1)
    >>> layer.lora_embedding_A.shape, layer.lora_embedding_B.shape, layer.scaling
    ((2, 10), (6, 2), 2.0)
    >>> bool((layer(np.array([[1, 2, 2]])).data == layer.base.weight.data[[[1, 2, 2]]]).all())
    True
    """

    def __init__(
        self,
        base: Any,
        *,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ):
        if not isinstance(base, tuple(EMBEDDING_TYPES)):
            raise TypeError(
                f"LoRAEmbedding: base must be a loralab.nn.Embedding, got {type(base).__name__}"
            )
        super().__init__()
        rng = make_rng(seed, rng)
        self._init_lora(base, rng, r, alpha, dropout, init, use_rslora, use_dora, adapter_name)

    def _parameter(self, array: np.ndarray) -> Parameter:
        return Parameter(array)

    def _table_array(self, base: Any) -> np.ndarray:
        return base.weight.data

    def forward(self, ids: Any) -> Tensor:
        """Integer ids of any shape (...) -> h of shape (..., embedding_dim)."""
        ids = check_ids(self._describe(), ids, self.num_embeddings)
        rows = self._rows(ids.shape)  # a mixed batch's row count is checked even if no row adapts
        if not self._adds_adapter():
            return self.base(ids)
        A, B, s = self.lora_embedding_A, self.lora_embedding_B, self.scaling
        return LoRAEmbeddingFn.apply(ids, self.base.weight, A, B, scaling=s, rows=rows)
