"""A small decoder-only transformer (GPT) on loralab's engine, small enough to read end to end.

Token and position embeddings, ``n_layers`` pre-LayerNorm blocks of causal multi-head
self-attention (whose projections are Linear children named ``q``, ``k``, ``v``, ``o``, the
paper's Wq, Wk, Wv, Wo) and a GELU MLP (``fc``, ``proj``), a final LayerNorm and a head that is
tied to the token embedding or a Linear of its own. Module names follow nanoGPT, so
``inject_lora(gpt, ["q", "v"])`` adapts Wq and Wv of every block, as in the LoRA paper.

The attention is one fused op (:class:`CausalSelfAttention`'s ``Attention``) with a hand-written
backward, gradchecked in ``tests/test_models_gpt.py``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from loralab import functional as F
from loralab._validate import boolean, non_negative_int, non_negative_number, positive_int
from loralab.fileio import atomic_write
from loralab.nn import GELU, Embedding, LayerNorm, Linear, Module, Sequential
from loralab.nn.module import make_rng
from loralab.tensor import Function, Tensor, no_grad

__all__ = ["GPT", "Block", "CausalSelfAttention", "causal_attention", "load_gpt", "GPT_CHECKPOINT"]

GPT_CHECKPOINT = "checkpoints/gpt_genesis.safetensors"  # inside the package's data folder


@functools.lru_cache(maxsize=8)
def _causal_bias(T: int, dtype: np.dtype) -> np.ndarray:
    """The mask M of shape (T, T): 0 on and below the diagonal, -inf above it (built once per T)."""
    bias = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    bias.flags.writeable = False
    return bias


class Attention(Function):
    """Causal scaled dot-product attention over heads, fused: forward and backward side by side.

    Shapes: q, k, v are (B, T, d) with d = H * hd. Split into heads (B, H, T, hd), every head of
    every sequence at once (batched ``@``, no Python loop):

        S = (q / sqrt(hd)) k^T + M        (M = -inf above the diagonal: no peeking ahead)
        P = softmax(S)  (over the last axis)
        O = P v                           -> merged back to (B, T, d)

    Backward, with dO given:
        dP = dO v^T,   dv = P^T dO,
        dS = P * (dP - rowsum(dP * P)),   (the softmax's Jacobian-vector product)
        dq = dS k / sqrt(hd),   dk = dS^T q / sqrt(hd).

    Two savings that do not change the math: 1/sqrt(hd) scales q (T hd numbers per head) rather
    than S (T^2), and rowsum(dP * P) = rowsum(dO * O), because sum_j (dO_i . v_j) P_ij = dO_i . O_i:
    a (T, hd) product instead of a (T, T) one (the identity FlashAttention uses).
    """

    @staticmethod
    def forward(ctx, q, k, v, n_heads):
        B, T, d = q.shape
        hd = d // n_heads

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(B, T, n_heads, hd).transpose(0, 2, 1, 3)

        scale = np.asarray(1.0 / math.sqrt(hd), dtype=q.dtype)
        qh, kh, vh = heads(q) * scale, heads(k), heads(v)
        S = qh @ kh.transpose(0, 1, 3, 2)
        S += _causal_bias(T, S.dtype)
        S -= S.max(axis=-1, keepdims=True)
        P = np.exp(S, out=S)
        P /= P.sum(axis=-1, keepdims=True)
        O = P @ vh
        ctx.save_for_backward(qh, kh, vh, P, O, scale)
        return O.transpose(0, 2, 1, 3).reshape(B, T, d)

    @staticmethod
    def backward(ctx, grad):
        qh, kh, vh, P, O, scale = ctx.saved  # qh already holds q / sqrt(hd)
        B, H, T, hd = qh.shape
        dO = grad.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        dv = P.transpose(0, 1, 3, 2) @ dO
        dS = dO @ vh.transpose(0, 1, 3, 2)  # dP, turned into dS in place
        dS -= (dO * O).sum(axis=-1, keepdims=True)
        dS *= P
        dq = (dS @ kh) * scale
        dk = dS.transpose(0, 1, 3, 2) @ qh

        def merge(t: np.ndarray) -> np.ndarray:
            return t.transpose(0, 2, 1, 3).reshape(B, T, H * hd)

        return merge(dq), merge(dk), merge(dv)


def causal_attention(q: Any, k: Any, v: Any, n_heads: int) -> Tensor:
    """Causal multi-head attention of already projected q, k, v.

    Parameters
    ----------
    q, k, v : Tensor of shape (batch, T, d)
        d must be divisible by ``n_heads``.
    n_heads : int

    Returns
    -------
    Tensor of shape (batch, T, d)
        Position t attends to positions 0..t only.
    """
    shapes = {np.shape(getattr(t, "data", t)) for t in (q, k, v)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(
            f"causal_attention: expected q, k, v of one shape (batch, T, d), got {sorted(shapes)}"
        )
    d = next(iter(shapes))[2]
    n_heads = positive_int("n_heads", n_heads, "causal_attention")
    if d % n_heads:
        raise ValueError(f"causal_attention: d={d} is not divisible by n_heads={n_heads}")
    return Attention.apply(q, k, v, n_heads=n_heads)


class CausalSelfAttention(Module):
    """h -> o(attention(q(h), k(h), v(h))), with Linear children ``q``, ``k``, ``v``, ``o`` (d -> d)."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear

    def __init__(self, d_model: int, n_heads: int, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        self.n_heads = n_heads
        for name in ("q", "k", "v", "o"):
            setattr(self, name, Linear(d_model, d_model, rng=rng, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.o(causal_attention(self.q(x), self.k(x), self.v(x), self.n_heads))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


class Block(Module):
    """A pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        self.ln1 = LayerNorm(d_model, dtype=dtype)
        self.attn = CausalSelfAttention(d_model, n_heads, rng=rng, dtype=dtype)
        self.ln2 = LayerNorm(d_model, dtype=dtype)
        self.mlp = Sequential()
        self.mlp.fc = Linear(d_model, 4 * d_model, rng=rng, dtype=dtype)
        self.mlp.act = GELU()
        self.mlp.proj = Linear(4 * d_model, d_model, rng=rng, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(Module):
    """A decoder-only transformer language model.

    Parameters
    ----------
    vocab_size : int
    context_length : int
        Longest input (number of learned positions).
    d_model : int
        Width of the residual stream.
    n_layers : int
    n_heads : int
        Must divide ``d_model``.
    seed : int, optional
        Initial values: Linear layers as ``loralab.nn.Linear``, embeddings N(0, 0.02^2).
    dtype : numpy dtype, default float32
    tied_head : bool, default True
        Whether the output head reuses the token embedding (logits = h E^T) or is a Linear ``head``.

    Attributes
    ----------
    tok_emb : Embedding, weight of shape (vocab_size, d_model)
    pos_emb : Embedding, weight of shape (context_length, d_model)
    blocks : Sequential of ``n_layers`` :class:`Block` (named "0", "1", ...)
    ln_f : LayerNorm
    head : Linear (d_model -> vocab_size, no bias), only when ``tied_head=False``

    Examples
    --------
    >>> gpt = GPT(96, context_length=16, d_model=32, n_layers=2, n_heads=4, seed=0)
    >>> gpt(np.zeros((3, 10), dtype=np.int64)).shape
    (3, 10, 96)
    >>> [n for n, _ in gpt.named_modules() if n.endswith(".q")]
    ['blocks.0.attn.q', 'blocks.1.attn.q']
    """

    lora_refused_targets = {
        "pos_emb": "GPT.forward reads its table directly (pos_emb.weight[:T]) instead of calling it"
    }

    def __init__(
        self,
        vocab_size: int,
        *,
        context_length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        seed: int | None = None,
        dtype: Any = np.float32,
        tied_head: bool = True,
    ):
        sizes = {
            "vocab_size": vocab_size,
            "context_length": context_length,
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
        }
        config: dict[str, Any] = {k: positive_int(k, v, "GPT") for k, v in sizes.items()}
        config["tied_head"] = boolean("tied_head", tied_head, "GPT")
        if d_model % n_heads:
            raise ValueError(f"GPT: d_model={d_model} is not divisible by n_heads={n_heads}")
        super().__init__()
        self.config = config
        rng = make_rng(seed)
        self.tok_emb = Embedding(vocab_size, d_model, rng=rng, dtype=dtype)
        self.pos_emb = Embedding(context_length, d_model, rng=rng, dtype=dtype)
        for emb in (self.tok_emb, self.pos_emb):
            emb.weight.data *= np.asarray(0.02, dtype=dtype)
        self.blocks = Sequential(
            *(Block(d_model, n_heads, rng=rng, dtype=dtype) for _ in range(n_layers))
        )
        self.ln_f = LayerNorm(d_model, dtype=dtype)
        if not tied_head:
            self.head = Linear(d_model, vocab_size, bias=False, rng=rng, dtype=dtype)

    @property
    def context_length(self) -> int:
        return self.config["context_length"]

    def forward(self, idx: Any) -> Tensor:
        """Integer tokens of shape (batch, T), 1 <= T <= context_length -> logits (batch, T, vocab_size)."""
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"GPT: expected integer token ids, got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"GPT: expected token ids of shape (batch, T), got shape {idx.shape}")
        if idx.shape[1] > self.context_length:
            raise ValueError(f"GPT: T={idx.shape[1]} exceeds context_length={self.context_length}")
        if idx.shape[1] == 0:
            raise ValueError(
                f"GPT: expected at least one token per row (T >= 1), got shape {idx.shape}"
            )
        x = self.tok_emb(idx) + self.pos_emb.weight[: idx.shape[1]]
        x = self.ln_f(self.blocks(x))
        if self.config["tied_head"]:
            return F.LinearFn.apply(x, self.tok_emb.weight, None)
        return self.head(x)

    def loss(self, x: np.ndarray, y: np.ndarray) -> Tensor:
        """Mean next-token cross-entropy (nats per character) of inputs ``x`` and targets ``y``, both (batch, T)."""
        return F.cross_entropy(self(x), y)

    def evaluate(self, ids: np.ndarray, *, batch_size: int = 64) -> float:
        """Mean cross-entropy (nats per character) over consecutive windows covering ``ids`` (shape (n,)).

        Deterministic: the stream is cut into non-overlapping windows of ``context_length``.
        """
        T = self.context_length
        n = (len(ids) - 1) // T
        x = ids[: n * T].reshape(n, T)
        y = ids[1 : n * T + 1].reshape(n, T)
        total = 0.0
        with no_grad():
            for i in range(0, n, batch_size):
                total += float(
                    self.loss(x[i : i + batch_size], y[i : i + batch_size]).item()
                ) * len(x[i : i + batch_size])
        return total / n

    def generate(
        self, prompt: Any, n: int, temperature: float = 1.0, seed: int | None = None
    ) -> Any:
        """Sample ``n`` tokens after ``prompt``, one at a time.

        Parameters
        ----------
        prompt : str or int array of shape (t,)
            A string is encoded with :class:`~loralab.models.data.CharTokenizer` (so the model's
            vocabulary must be its 96 characters) and the result decoded back to a string.
        n : int
            Number of new tokens.
        temperature : float, default 1.0
            Logits are divided by it; 0 picks the most likely token every time (greedy).
        seed : int, optional
            Seed of the sampling generator: the same seed gives the same text.

        Returns
        -------
        str (prompt plus continuation) for a string prompt, else int64 array of shape (t + n,)
        """
        from loralab.models.data import CharTokenizer

        tok = CharTokenizer() if isinstance(prompt, str) else None
        ids = list(tok.encode(prompt) if tok else np.asarray(prompt, dtype=np.int64).reshape(-1))
        if not ids:
            raise ValueError("GPT.generate: prompt must hold at least one token")
        n = non_negative_int("n", n, "GPT.generate")
        temperature = non_negative_number("temperature", temperature, "GPT.generate")
        rng = np.random.default_rng(seed)
        with no_grad():
            for _ in range(n):
                context = np.asarray(ids[-self.context_length :])[None]
                logits = self(context).data[0, -1].astype(np.float64)
                if temperature == 0:
                    ids.append(int(np.argmax(logits)))
                    continue
                z = logits / temperature
                p = np.exp(z - z.max())
                ids.append(int(rng.choice(len(p), p=p / p.sum())))
        out = np.asarray(ids, dtype=np.int64)
        return tok.decode(out) if tok else out

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the weights and config to one safetensors file, atomically.

        The config goes into the file's metadata (``"config"``, JSON), so :meth:`load` rebuilds
        the model without any other file.
        """
        from safetensors.numpy import save_file

        meta = {"format": "np", "config": json.dumps(self.config), **(metadata or {})}
        state = {k: np.ascontiguousarray(v) for k, v in self.state_dict().items()}
        return atomic_write(path, lambda tmp: save_file(state, tmp, meta))

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: Any = np.float32) -> GPT:
        """Rebuild a model saved with :meth:`save` (no pickle)."""
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(
                f"GPT.load: {str(path)!r} has no 'config' metadata; not a GPT checkpoint"
            )
        model = cls(**json.loads(meta["config"]), seed=0, dtype=dtype)
        model.load_state_dict(load_file(str(path)))
        return model

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def load_gpt(*, dtype: Any = np.float32) -> GPT:
    """The GPT pre-trained on Genesis that ships with loralab (``loralab/data/checkpoints``).

    Regenerate it with ``python -m loralab.models.pretrain`` (deterministic from its seed).
    """
    from importlib import resources

    ref = resources.files("loralab.data").joinpath(GPT_CHECKPOINT)
    with resources.as_file(ref) as path:
        return GPT.load(path, dtype=dtype)
