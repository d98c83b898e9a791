"""The PyTorch twin of :class:`loralab.models.llama.Llama`: same modules, same names, same numbers.

``to_torch(llama)`` and ``to_numpy(torch_llama)`` convert through the registry of
:mod:`loralab.torch.convert`; LoRA layers inside (``model.layers.0.self_attn.q_proj`` ...)
convert with them. RMSNorm, RoPE, SwiGLU and grouped-query attention are written here with plain
torch ops, so autograd derives their backward: the equivalence tests compare the hand-written
NumPy backwards of `loralab.functional_llm` with an independent derivation. The RoPE tables
(constants) come from the same `loralab.functional.rope_tables`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from loralab import functional as LF
from loralab.models.llama import (
    Llama,
    LlamaAttention,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    RMSNorm,
)
from loralab.nn import Module
from loralab.torch.convert import (
    param_to_numpy,
    param_to_torch,
    register_converter,
    register_numpy_converter,
)
from loralab.torch.gpt import _bare, _children_to_numpy, _children_to_torch

__all__ = [
    "TorchLlama",
    "TorchLlamaModel",
    "TorchLlamaDecoderLayer",
    "TorchLlamaAttention",
    "TorchLlamaMLP",
    "TorchRMSNorm",
    "rotate_half",
    "grouped_query_attention",
]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1), halves of the last axis (HF's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, q (B, H, T, hd), k and v (B, H_kv, T, hd): each kv head repeated for its
    H / H_kv query heads (HF's ``repeat_kv``), then softmax(q k^T / sqrt(hd) + mask) v."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


class TorchRMSNorm(torch.nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), in the input's dtype."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class TorchLlamaAttention(torch.nn.Module):
    """Children ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Linear or LoRALinear), as the NumPy layer."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.reshape(B, T, n, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x), self.n_heads)
        k = heads(self.k_proj(x), self.n_kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        o = grouped_query_attention(q, k, heads(self.v_proj(x), self.n_kv_heads))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class TorchLlamaMLP(torch.nn.Module):
    """down_proj(silu(gate_proj x) * up_proj x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TorchLlamaDecoderLayer(torch.nn.Module):
    """x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x))."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TorchLlamaModel(torch.nn.Module):
    """Children ``embed_tokens``, ``layers``, ``norm``."""


class TorchLlama(torch.nn.Module):
    """The torch LLaMA: children ``model`` and (untied) ``lm_head``.

    Built by :func:`loralab.torch.to_torch` from a :class:`loralab.models.llama.Llama`, not directly.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config

    def forward(self, ids: Any) -> torch.Tensor:
        """Integer ids (batch, T) -> logits (batch, T, vocab)."""
        ids = torch.as_tensor(ids)
        c, m = self.config, self.model
        weight = m.embed_tokens.weight
        cos, sin = (
            torch.from_numpy(t).to(dtype=weight.dtype, device=weight.device)
            for t in LF.rope_tables(ids.shape[1], c.head_dim, c.rope_theta, scaling=c.rope_scaling)
        )
        x = m.embed_tokens(ids)
        for layer in m.layers:
            x = layer(x, cos, sin)
        x = m.norm(x)
        return F.linear(x, weight) if c.tie_word_embeddings else self.lm_head(x)

    def loss(self, x: Any, y: Any) -> torch.Tensor:
        """Mean next-token cross-entropy of inputs and targets of shape (batch, T)."""
        logits = self(x)
        y = torch.as_tensor(y, device=logits.device).reshape(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y)


def _rmsnorm_to_torch(m: RMSNorm, convert: Any, dtype: Any) -> torch.nn.Module:
    t = TorchRMSNorm(m.eps)
    t.weight = param_to_torch(m.weight, dtype)
    return t


def _rmsnorm_to_numpy(t: TorchRMSNorm, convert: Any) -> Module:
    m = _bare(RMSNorm)
    m.eps = t.eps
    m.weight = param_to_numpy(t.weight)
    return m


def _attention_to_numpy(t: TorchLlamaAttention, convert: Any) -> Module:
    m = _bare(LlamaAttention)
    m.n_heads, m.n_kv_heads, m.head_dim = t.n_heads, t.n_kv_heads, t.head_dim
    return _children_to_numpy(t, m, convert)


def _llama_to_numpy(t: TorchLlama, convert: Any) -> Module:
    m = _bare(Llama)
    m.config = t.config
    m.tokenizer = None
    return _children_to_numpy(t, m, convert)


def _plain(np_cls: type, torch_cls: type) -> None:
    """Register a module that is only its children, both ways."""
    register_converter(
        np_cls, lambda m, convert, dtype: _children_to_torch(m, torch_cls(), convert)
    )
    register_numpy_converter(
        torch_cls, lambda t, convert: _children_to_numpy(t, _bare(np_cls), convert)
    )


register_converter(RMSNorm, _rmsnorm_to_torch)
register_numpy_converter(TorchRMSNorm, _rmsnorm_to_numpy)
register_converter(
    LlamaAttention,
    lambda m, convert, dtype: _children_to_torch(
        m, TorchLlamaAttention(m.n_heads, m.n_kv_heads, m.head_dim), convert
    ),
)
register_numpy_converter(TorchLlamaAttention, _attention_to_numpy)
_plain(LlamaMLP, TorchLlamaMLP)
_plain(LlamaDecoderLayer, TorchLlamaDecoderLayer)
_plain(LlamaModel, TorchLlamaModel)
register_converter(
    Llama, lambda m, convert, dtype: _children_to_torch(m, TorchLlama(m.config), convert)
)
register_numpy_converter(TorchLlama, _llama_to_numpy)
