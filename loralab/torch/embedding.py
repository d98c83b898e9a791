"""``LoRAEmbedding`` in PyTorch, with the same hand-derived backward as the NumPy Function.

`LoRAEmbeddingFunction` is `loralab.lora.embedding_ops` written in torch: a gather forward and a
scatter-add backward (``index_add_``) into the columns of A that the batch used; the ids get no
gradient and the frozen table E none. Importing this module registers the layer's converters with
`loralab.torch.convert` (``to_torch`` / ``to_numpy``), as `loralab.torch.gpt` does for the GPT.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loralab import lora, nn
from loralab._validate import boolean
from loralab.lora.embedding_layer import LoRAEmbeddingMixin
from loralab.nn.module import make_rng
from loralab.torch.convert import (
    _EMBEDDING_DEFAULTS,
    lora_twin,
    param_to_numpy,
    param_to_torch,
    register_converter,
    register_numpy_converter,
)

__all__ = ["LoRAEmbedding", "LoRAEmbeddingFunction"]


class LoRAEmbeddingFunction(torch.autograd.Function):
    """``h = E[ids] + s A^T[ids] B^T`` with the backward derived by hand.

    With U = A^T[ids] (N, r) and dh flattened to (N, dim)::

        dB = s dh^T U        dA[:, ids_i] += s (dh B)_i        (dE[ids_i] += dh_i only if E trains)

    Inputs (to ``apply``): ids (long, any shape), E (num_embeddings, dim), A (r, num_embeddings),
    B (dim, r), scaling (float), rows (bool, shape (batch,), or None: in a mixed batch, the rows
    that add the adapter). Returns h of shape (*ids.shape, dim).
    """

    @staticmethod
    def forward(ctx, ids, E, A, B, scaling, rows=None):
        flat = ids.reshape(-1)
        u = A.T[flat]  # (N, r): a gather, never a one-hot product
        h = E[flat] + scaling * (u @ B.T)
        keep = None
        if rows is not None:  # a mixed batch: the other rows get E[ids] alone
            keep = rows.reshape(-1, *(1,) * (ids.ndim - 1)).expand(ids.shape).reshape(-1, 1)
            h = torch.where(keep, h, E[flat])
        ctx.save_for_backward(flat, u, B, keep)
        ctx.scaling, ctx.sizes = scaling, (E.shape[0], A.shape[0])
        return h.reshape(*ids.shape, E.shape[1])

    @staticmethod
    def backward(ctx, dh):
        flat, u, B, keep = ctx.saved_tensors
        s, (n, r) = ctx.scaling, ctx.sizes
        _, need_E, need_A, need_B = ctx.needs_input_grad[:4]
        dh_all = dh.reshape(-1, dh.shape[-1])  # (N, dim)
        dh2 = dh_all if keep is None else dh_all * keep  # only the rows that add the adapter
        dB = s * (dh2.T @ u) if need_B else None
        dA = None
        if need_A:  # scatter-add into the used columns: a token seen twice gets both
            dA = torch.zeros(n, r, dtype=dh.dtype, device=dh.device)
            dA.index_add_(0, flat, s * (dh2 @ B))
            dA = dA.T
        dE = None
        if need_E:
            dE = torch.zeros(n, dh2.shape[1], dtype=dh.dtype, device=dh.device)
            dE.index_add_(0, flat, dh_all)
        return None, dE, dA, dB, None, None


class LoRAEmbedding(LoRAEmbeddingMixin, torch.nn.Module):
    """A frozen ``torch.nn.Embedding`` plus a trainable rank-r update: h = E[t] + s A^T[t] B^T.

    The twin of `loralab.lora.LoRAEmbedding`, sharing its code (`LoRAEmbeddingMixin`): same
    parameter names (``base.weight``, ``lora_embedding_A``, ``lora_embedding_B``), the same initial
    values for the same ``seed``, bit for bit.

    Parameters
    ----------
    base : torch.nn.Embedding
        Without ``padding_idx``, ``max_norm`` or ``scale_grad_by_freq`` (loralab's table has none).
    r, alpha, dropout, init, use_rslora, use_dora, adapter_name, seed, rng
        As in `loralab.lora.LoRAEmbedding`.
    use_custom_backward : bool, default True
        Run through `LoRAEmbeddingFunction` (the hand backward) or, when False, through plain
        autograd on ``F.embedding`` calls (PEFT's formula). Both give the same gradients.

    Examples
    --------
    >>> layer = LoRAEmbedding(torch.nn.Embedding(10, 6), r=2, alpha=4, seed=1)
    >>> tuple(layer.lora_embedding_A.shape), tuple(layer.lora_embedding_B.shape), layer.scaling
    ((2, 10), (6, 2), 2.0)
    """

    def __init__(
        self,
        base: torch.nn.Embedding,
        *,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        use_custom_backward: bool = True,
        adapter_name: str = "default",
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ):
        if not isinstance(base, torch.nn.Embedding):
            raise TypeError(
                f"LoRAEmbedding: base must be a torch.nn.Embedding, got {type(base).__name__}"
            )
        for option, default in _EMBEDDING_DEFAULTS.items():  # the options to_numpy refuses too
            value = getattr(base, option)
            if value != default:
                raise ValueError(
                    f"LoRAEmbedding: a base with {option}={value} is not supported "
                    f"(loralab.nn.Embedding implements only {option}={default})"
                )
        super().__init__()
        self.use_custom_backward = boolean(
            "use_custom_backward", use_custom_backward, "LoRAEmbedding"
        )
        rng = make_rng(seed, rng)
        self._init_lora(base, rng, r, alpha, dropout, init, use_rslora, use_dora, adapter_name)

    def _parameter(self, array: np.ndarray) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.from_numpy(array).to(self.base.weight.device))

    def _table_array(self, base: torch.nn.Embedding) -> np.ndarray:
        return base.weight.detach().cpu().numpy()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Integer ids of any shape (...) -> h of shape (..., embedding_dim)."""
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(
                f"{self._describe()}: expected integer token ids, got dtype {ids.dtype}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise ValueError(
                f"{self._describe()}: token id {bad} outside [0, {self.num_embeddings})"
            )
        rows = self._rows(tuple(ids.shape))  # a mixed batch's row count, even if no row adapts
        if not self._adds_adapter():
            return self.base(ids)
        E, A, B, s = self.base.weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling
        keep = None if rows is None else torch.from_numpy(rows).to(ids.device)
        if self.use_custom_backward:
            return LoRAEmbeddingFunction.apply(ids.long(), E, A, B, s, keep)
        branch = s * (F.embedding(ids, A.T) @ B.T)
        if keep is not None:
            branch = branch * keep.reshape(-1, *(1,) * (branch.ndim - 1)).to(branch.dtype)
        return F.embedding(ids, E) + branch


def _to_torch(m: Any, convert: Any, dtype: Any) -> torch.nn.Module:
    """A `loralab.lora.LoRAEmbedding` as a `LoRAEmbedding`, values and flags copied."""
    t = lora_twin(LoRAEmbedding, m, convert)
    t.lora_embedding_A = param_to_torch(m.lora_embedding_A, dtype)
    t.lora_embedding_B = param_to_torch(m.lora_embedding_B, dtype)
    t.init, t.scaling, t.merged = m.init, m.scaling, m.merged
    t.adapter_names, t.active_adapter_names = list(m.adapter_names), list(m.active_adapter_names)
    return t


def _to_numpy(t: Any, convert: Any) -> nn.Module:
    """A `LoRAEmbedding` as a `loralab.lora.LoRAEmbedding`, values and flags copied."""
    m = lora_twin(lora.LoRAEmbedding, t, convert)
    m.lora_embedding_A = param_to_numpy(t.lora_embedding_A)
    m.lora_embedding_B = param_to_numpy(t.lora_embedding_B)
    m.init, m.scaling, m.merged = t.init, t.scaling, t.merged
    m.adapter_names, m.active_adapter_names = list(t.adapter_names), list(t.active_adapter_names)
    return m


register_converter(lora.LoRAEmbedding, _to_torch)
register_numpy_converter(LoRAEmbedding, _to_numpy)
