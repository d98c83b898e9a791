"""The key/value cache of generation: each layer's keys and values of the positions seen so far.

Generating one token at a time, the model would recompute every earlier position's keys and
values at each step. The cache keeps them: at step t only the new position's k and v are
computed and appended, and attention reads all of them. Its size grows as
2 x n_layers x batch x n_kv_heads x T x head_dim numbers (grouped-query attention stores
n_kv_heads, not n_heads: that is what it saves).
"""

from __future__ import annotations

import numpy as np

__all__ = ["KVCache"]


class KVCache:
    """Keys and values per layer, each of shape (batch, n_kv_heads, T, head_dim), growing in T.

    Parameters
    ----------
    n_layers : int

    Examples
    --------
    >>> cache = KVCache(2)
    >>> k = v = np.zeros((1, 4, 3, 8))
    >>> K, V = cache.append(0, k, v)
    >>> K.shape, cache.length
    ((1, 4, 3, 8), 0)
    >>> _ = cache.append(1, k, v); cache.length
    3
    """

    def __init__(self, n_layers: int):
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
            raise ValueError(f"KVCache: n_layers must be a positive integer, got {n_layers!r}")
        self.keys: list[np.ndarray | None] = [None] * n_layers
        self.values: list[np.ndarray | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Positions cached in every layer (the last layer's count: layers fill in order)."""
        last = self.keys[-1]
        return 0 if last is None else last.shape[2]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add new positions' k and v (batch, n_kv_heads, T_new, head_dim) to ``layer``; return all."""
        if k.shape != v.shape or k.ndim != 4:
            raise ValueError(
                f"KVCache.append: expected k and v of one shape (batch, heads, T, head_dim), "
                f"got {k.shape} and {v.shape}"
            )
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            if old_k.shape[:2] != k.shape[:2] or old_k.shape[3] != k.shape[3]:
                raise ValueError(
                    f"KVCache.append: layer {layer} holds {old_k.shape}, cannot append {k.shape}"
                )
            k, v = np.concatenate([old_k, k], axis=2), np.concatenate([old_v, v], axis=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v
