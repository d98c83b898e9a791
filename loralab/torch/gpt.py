"""The PyTorch twin of :class:`loralab.models.GPT`: same modules, same names, same numbers.

``to_torch(gpt)`` and ``to_numpy(torch_gpt)`` convert through the registry of
:mod:`loralab.torch.convert`; LoRA layers inside (``blocks.0.attn.q`` ...) convert with them.
The attention is written with plain torch ops (autograd derives its backward), so the
equivalence tests compare the NumPy hand-written backward against an independent derivation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from loralab.models.gpt import GPT, Block, CausalSelfAttention
from loralab.nn import Module
from loralab.torch.convert import register_converter, register_numpy_converter

__all__ = ["TorchGPT", "TorchBlock", "TorchCausalSelfAttention", "causal_attention"]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v over ``n_heads`` heads; (B, T, d) -> (B, T, d)."""
    B, T, d = q.shape
    hd = d // n_heads
    qh, kh, vh = (t.reshape(B, T, n_heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2).reshape(B, T, d)


class TorchCausalSelfAttention(torch.nn.Module):
    """Children ``q``, ``k``, ``v``, ``o`` (Linear or LoRALinear), as the NumPy layer."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(causal_attention(self.q(x), self.k(x), self.v(x), self.n_heads))


class TorchBlock(torch.nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(x)); children ``ln1``, ``attn``, ``ln2``, ``mlp``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(torch.nn.Module):
    """The torch GPT: children ``tok_emb``, ``pos_emb``, ``blocks``, ``ln_f`` (and ``head`` if untied).

    Built by :func:`loralab.torch.to_torch` from a :class:`loralab.models.GPT`, not directly.
    """

    lora_refused_targets = {
        "pos_emb": "GPT.forward reads its table directly (pos_emb.weight[:T]) instead of calling it"
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Integer tokens (batch, T) -> logits (batch, T, vocab_size)."""
        idx = torch.as_tensor(idx)
        if idx.ndim == 2 and idx.shape[1] == 0:  # as the NumPy GPT
            raise ValueError(
                f"GPT: expected at least one token per row (T >= 1), got shape {tuple(idx.shape)}"
            )
        x = self.tok_emb(idx) + self.pos_emb.weight[: idx.shape[1]]
        x = self.ln_f(self.blocks(x))
        if self.config["tied_head"]:
            return F.linear(x, self.tok_emb.weight)
        return self.head(x)

    def loss(self, x: Any, y: Any) -> torch.Tensor:
        """Mean next-token cross-entropy of inputs and targets of shape (batch, T)."""
        logits = self(torch.as_tensor(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(y).reshape(-1))


def _children_to_torch(m: Module, t: torch.nn.Module, convert: Any) -> torch.nn.Module:
    for name, child in m.named_children():
        t.add_module(name, convert(child))
    return t


def _children_to_numpy(t: torch.nn.Module, m: Module, convert: Any) -> Module:
    for name, child in t.named_children():
        setattr(m, name, convert(child))
    return m


def _bare(cls: type) -> Any:
    """A NumPy module of ``cls`` with no children yet (the converter adds them)."""
    m = cls.__new__(cls)
    Module.__init__(m)
    return m


def _attention_to_numpy(t: TorchCausalSelfAttention, convert: Any) -> Module:
    m = _bare(CausalSelfAttention)
    m.n_heads = t.n_heads
    return _children_to_numpy(t, m, convert)


def _gpt_to_numpy(t: TorchGPT, convert: Any) -> Module:
    m = _bare(GPT)
    m.config = dict(t.config)
    return _children_to_numpy(t, m, convert)


register_converter(
    CausalSelfAttention,
    lambda m, convert, dtype: _children_to_torch(m, TorchCausalSelfAttention(m.n_heads), convert),
)
register_converter(Block, lambda m, convert, dtype: _children_to_torch(m, TorchBlock(), convert))
register_converter(
    GPT, lambda m, convert, dtype: _children_to_torch(m, TorchGPT(m.config), convert)
)
register_numpy_converter(TorchCausalSelfAttention, _attention_to_numpy)
register_numpy_converter(
    TorchBlock, lambda t, convert: _children_to_numpy(t, _bare(Block), convert)
)
register_numpy_converter(TorchGPT, _gpt_to_numpy)
