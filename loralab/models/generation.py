"""Text generation with a key/value cache: greedy and sampled decoding for GPT-2 and LLaMA.

The prompt goes through the model once (the *prefill*), filling the cache with every layer's
keys and values; then each new token costs one position: its logits come from
``model.logits(next_ids, cache)``, which attends to the cached keys and values and appends its
own. Without the cache, step t would recompute all t earlier positions: O(T^2) positions in
all instead of O(T).

Greedy decoding takes the most likely token at each step (``temperature=0``); sampling draws
from softmax(logits / temperature), optionally among the ``top_k`` most likely only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralab._validate import non_negative_int, non_negative_number
from loralab.models.kv_cache import KVCache

__all__ = ["generate"]


def _next_token(logits: np.ndarray, temperature: float, top_k: int | None, rng) -> np.ndarray:
    """One id per row from logits (batch, vocab)."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens, one at a time, with a key/value cache.

    Parameters
    ----------
    model : a model with ``logits(ids, cache)`` and ``config`` (`GPT2`, `Llama`)
    prompt : str, or int array of shape (t,) or (batch, t)
        A string is encoded with ``model.tokenizer`` and the result decoded back to a string.
    max_new_tokens : int
    temperature : float, default 0.0
        0 is greedy (the argmax, as ``transformers``' ``generate(do_sample=False)``); above 0 the
        logits are divided by it before the softmax.
    top_k : int, optional
        Sample among the k most likely tokens only.
    seed : int, optional
        Seed of the sampling generator: the same seed gives the same text.
    eos_token_id : int, optional
        Stop once every row has produced it (rows that finished early repeat it).

    Returns
    -------
    str for a string prompt, else int64 array (batch, t + new) (or (t + new,) for a 1-D prompt)
    """
    max_new_tokens = non_negative_int("max_new_tokens", max_new_tokens, "generate")
    temperature = non_negative_number("temperature", temperature, "generate")
    if top_k is not None:
        top_k = non_negative_int("top_k", top_k, "generate")
        if top_k == 0:
            raise ValueError("generate: top_k must be at least 1 (or None for every token)")
    text = isinstance(prompt, str)
    if text:
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "generate: a text prompt needs model.tokenizer (a folder with tokenizer.json)"
            )
        ids = np.asarray([model.tokenizer.encode(prompt)], dtype=np.int64)
    else:
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2):
            raise ValueError(
                f"generate: prompt must be integer ids (t,) or (batch, t), got {ids.dtype} {ids.shape}"
            )
        ids = ids.astype(np.int64).reshape(-1, ids.shape[-1])
    if ids.shape[1] == 0:
        raise ValueError("generate: the prompt holds no token")
    limit = getattr(model, "context_length", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"generate: {ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the "
            f"model's context of {limit} positions"
        )
    rng = np.random.default_rng(seed)
    n_layers = (
        model.config.n_layer if hasattr(model.config, "n_layer") else model.config.num_hidden_layers
    )
    cache = KVCache(n_layers)
    out = [ids]
    done = np.zeros(ids.shape[0], dtype=bool)
    logits = model.logits(ids, cache)[:, -1]
    for step in range(max_new_tokens):
        token = _next_token(logits, temperature, top_k, rng)
        if eos_token_id is not None:
            token = np.where(done, eos_token_id, token)
            done |= token == eos_token_id
        out.append(token[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and done.all()):
            break
        logits = model.logits(token[:, None], cache)[:, -1]
    result = np.concatenate(out, axis=1)
    if text:
        return model.tokenizer.decode(result[0])
    return result[0] if np.ndim(prompt) == 1 else result
