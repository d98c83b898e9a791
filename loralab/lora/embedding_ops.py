"""LoRA on an embedding table, in plain NumPy: forward and a hand backward that touch only used rows.

An embedding is a Linear layer fed one-hot vectors: looking up token t is multiplying the table
E (num_embeddings, embedding_dim) by e_t. So LoRA adapts it exactly as a Linear (the paper's
Section 4.2 applies to any dense matrix), with PEFT's names and shapes:

    lora_embedding_A : (r, num_embeddings)      lora_embedding_B : (embedding_dim, r)
    ΔE = s (B A)^T, shape (num_embeddings, embedding_dim)

and for token ids t (any shape)

$$h = E[t] + s \\, A^T[t] \\, B^T$$

where ``A^T[t]`` picks columns of A: the r-vector each token has in the low-rank space. Nothing
ever forms a one-hot matrix. PEFT initialises A = 0 and B ~ N(0, 1) for embeddings (the reverse
of Linear, following the LoRA authors' ``loralib``); ΔE is zero at the start either way.

Backward, with U = A^T[t] (N, r) and dY (N, dim) flattened over the batch:

    dB = s dY^T U                      (dim, r)
    dA[:, t_i] += s (dY B)_i           for every position i (repeated tokens accumulate)

so dA is non-zero only in the columns of tokens that occur; ids get no gradient and the frozen
table E none either (no dE: the saving LoRA is for). Imports nothing of loralab.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["EmbeddingLoRACache", "lora_embedding_forward", "lora_embedding_backward"]


class EmbeddingLoRACache(NamedTuple):
    """What `lora_embedding_forward` keeps for `lora_embedding_backward` (ids flattened)."""

    ids: np.ndarray  # (N,) flattened token ids
    u: np.ndarray  # (N, r): A^T[ids]
    A: np.ndarray  # (r, num_embeddings)
    B: np.ndarray  # (embedding_dim, r)
    scaling: float
    batch_shape: tuple[int, ...]


def lora_embedding_forward(
    ids: np.ndarray, E: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
) -> tuple[np.ndarray, EmbeddingLoRACache]:
    """h = E[ids] + s A^T[ids] B^T.

    Parameters
    ----------
    ids : int ndarray of any shape (...)
        Token ids in [0, num_embeddings).
    E : ndarray of shape (num_embeddings, embedding_dim)
        The frozen table (E may hold ΔE already when merged; then pass B = 0 or skip this op).
    A : ndarray of shape (r, num_embeddings)
    B : ndarray of shape (embedding_dim, r)
    scaling : float
        s = alpha / r (alpha / sqrt(r) for rsLoRA).

    Returns
    -------
    h : ndarray of shape (..., embedding_dim)
    cache : what `lora_embedding_backward` needs
    """
    flat = np.asarray(ids).reshape(-1)
    u = A.T[flat]  # (N, r): a gather, never a one-hot product
    h = E[flat] + scaling * (u @ B.T)
    cache = EmbeddingLoRACache(flat, u, A, B, scaling, np.shape(ids))
    return h.reshape(np.shape(ids) + (E.shape[1],)), cache


def lora_embedding_backward(
    dh: np.ndarray, cache: EmbeddingLoRACache
) -> tuple[np.ndarray, np.ndarray]:
    """(dA, dB) of `lora_embedding_forward`; dA is zero outside the columns of used tokens.

    Parameters
    ----------
    dh : ndarray of shape (..., embedding_dim)

    Returns
    -------
    dA : ndarray of shape (r, num_embeddings)
    dB : ndarray of shape (embedding_dim, r)
    """
    s = cache.scaling
    dh2 = dh.reshape(-1, dh.shape[-1])  # (N, dim)
    dB = s * (dh2.T @ cache.u)
    g = s * (dh2 @ cache.B)  # (N, r): each position's gradient in the low-rank space
    dA = np.zeros_like(cache.A)
    np.add.at(dA.T, cache.ids, g)  # scatter-add: a token seen twice gets both contributions
    return dA, dB
