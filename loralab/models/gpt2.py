"""GPT-2 on loralab's engine, with the checkpoint's own module names.

The architecture is `loralab.models.gpt.GPT`'s (pre-LayerNorm blocks, tanh GELU, learned
positions, a head tied to the token table); what differs is how Hugging Face's checkpoint
names and stores it, and this module answers to those names so that a PEFT ``LoraConfig`` or
adapter written for GPT-2 works unchanged:

    transformer.wte, transformer.wpe                   token (vocab, d) and position (n_positions, d) tables
    transformer.h.{i}.ln_1, .ln_2                      LayerNorms
    transformer.h.{i}.attn.c_attn                      Wq, Wk, Wv fused: d -> 3d (q, then k, then v)
    transformer.h.{i}.attn.c_proj                      Wo: d -> d
    transformer.h.{i}.mlp.c_fc, .mlp.c_proj            d -> 4d -> d
    transformer.ln_f                                   the final LayerNorm; logits = h wte^T

**Conv1D.** GPT-2 was written in TensorFlow, and HF keeps its ``Conv1D`` layers: a Linear whose
weight is stored transposed, shape (in, out), with y = x W + b. Loading transposes every Conv1D
weight into PyTorch's (out, in) layout, so each is a plain `loralab.nn.Linear` here (marked
``fan_in_fan_out = True``). LoRA's A (r, in) and B (out, r) have the same shapes either way:
PEFT's ``fan_in_fan_out=True`` only tells it to transpose ΔW = s B A before adding it into the
stored (in, out) weight, which is why a PEFT adapter for GPT-2 loads here unchanged.

**c_attn is three matrices.** ``target_modules=["c_attn"]`` adapts Wq, Wk and Wv together with one
A (r, d) and one B (3d, r): ΔW's rows for q, k and v share the r input directions of A. The
LoRA paper's Wq and Wv alone would be two separate adapters of rank r each on d -> d matrices;
on GPT-2 that needs a model whose c_attn is split (or PEFT's ``target_modules=["c_attn"]`` with
the k rows of B kept at zero, which no trainer does).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from loralab import functional as F
from loralab.models.gpt import causal_attention
from loralab.models.kv_cache import KVCache
from loralab.nn import GELU, Embedding, LayerNorm, Linear, Module, Sequential
from loralab.tensor import Tensor, no_grad

__all__ = ["GPT2", "GPT2Config", "from_hf", "to_hf", "CONV1D"]

#: The modules HF stores as Conv1D (weight (in, out)); `from_hf` and `to_hf` transpose them.
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# config.json fields and the only values whose math this module implements (anything else is
# refused by name): activation, attention scaling, cross-attention.
_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}


class GPT2Config:
    """The fields of an HF ``GPT2Config`` (config.json) that the math depends on, checked.

    Parameters
    ----------
    config : dict
        The parsed config.json: ``model_type`` "gpt2", ``vocab_size``, ``n_positions``,
        ``n_embd``, ``n_layer``, ``n_head``, optional ``n_inner`` (default 4 n_embd) and
        ``layer_norm_epsilon`` (default 1e-5).
    """

    def __init__(self, config: dict[str, Any]):
        if config.get("model_type") != "gpt2":
            raise ValueError(
                f"GPT2Config: model_type must be 'gpt2', got {config.get('model_type')!r}"
            )
        for key, allowed in _REQUIRED.items():
            value = config.get(key, allowed[0])
            if value not in allowed:
                raise ValueError(
                    f"GPT2Config: {key}={value!r} changes the math and is not implemented "
                    f"(supported: {', '.join(map(repr, allowed))})"
                )
        sizes = {}
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config: {key} must be a positive integer, got {value!r}")
            sizes[key] = value
        self.vocab_size, self.n_positions = sizes["vocab_size"], sizes["n_positions"]
        self.n_embd, self.n_layer, self.n_head = sizes["n_embd"], sizes["n_layer"], sizes["n_head"]
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        self.n_inner = config.get("n_inner") or 4 * self.n_embd
        self.layer_norm_epsilon = float(config.get("layer_norm_epsilon", 1e-5))
        self.raw = dict(config)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


class GPT2Attention(Module):
    """Causal self-attention with fused ``c_attn`` (d -> 3d: q, k, v) and ``c_proj`` (d -> d)."""

    def __init__(self, config: GPT2Config, dtype: Any):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.c_attn = Linear(d, 3 * d, dtype=dtype, seed=0)
        self.c_proj = Linear(d, d, dtype=dtype, seed=0)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.c_attn(x)
        d = qkv.shape[-1] // 3
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        return self.c_proj(causal_attention(q, k, v, self.n_head))

    def cached(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """The same for new positions only, attending to the cache's keys and values too (no grad)."""
        qkv = self.c_attn(x).data
        B, T, three_d = qkv.shape
        d, H = three_d // 3, self.n_head
        hd = d // H

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(B, T, H, hd).transpose(0, 2, 1, 3)

        q, k, v = heads(qkv[..., :d]), heads(qkv[..., d : 2 * d]), heads(qkv[..., 2 * d :])
        K, V = cache.append(layer, k, v)
        S = (q / np.asarray(math.sqrt(hd), dtype=q.dtype)) @ K.transpose(0, 1, 3, 2)
        start = K.shape[2] - T  # query t sits at position start + t and sees keys 0 .. start + t
        future = np.arange(K.shape[2])[None, :] > (start + np.arange(T))[:, None]
        S = np.where(future, -np.inf, S)
        S = np.exp(S - S.max(axis=-1, keepdims=True))
        O = (S / S.sum(axis=-1, keepdims=True)) @ V
        return self.c_proj(O.transpose(0, 2, 1, 3).reshape(B, T, d))


class GPT2MLP(Module):
    """``c_proj(gelu(c_fc(x)))`` with the tanh GELU (HF's "gelu_new")."""

    def __init__(self, config: GPT2Config, dtype: Any):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner, dtype=dtype, seed=0)
        self.act = GELU()
        self.c_proj = Linear(config.n_inner, config.n_embd, dtype=dtype, seed=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, dtype: Any):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps, dtype=dtype)
        self.attn = GPT2Attention(config, dtype)
        self.ln_2 = LayerNorm(config.n_embd, eps, dtype=dtype)
        self.mlp = GPT2MLP(config, dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(Module):
    """HF's ``GPT2Model``: the tables, the blocks ``h`` and the final LayerNorm ``ln_f``."""

    lora_refused_targets = {"wpe": "GPT2.forward reads its table directly (wpe.weight[:T])"}

    def __init__(self, config: GPT2Config, dtype: Any):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.n_embd, dtype=dtype, seed=0)
        self.wpe = Embedding(config.n_positions, config.n_embd, dtype=dtype, seed=0)
        self.h = Sequential(*(GPT2Block(config, dtype) for _ in range(config.n_layer)))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype=dtype)


class GPT2(Module):
    """GPT-2 (HF's ``GPT2LMHeadModel``) on the engine; build it with `from_hf` or `from_pretrained`.

    ``model(ids)`` takes integer ids (batch, T) and returns logits (batch, T, vocab) as a Tensor
    (differentiable: train LoRA on it); ``model.logits(ids, cache)`` is the no-grad path that
    generation uses, with a key/value cache.
    """

    def __init__(self, config: GPT2Config, *, dtype: Any = np.float32):
        super().__init__()
        self.config = config
        self.transformer = GPT2Transformer(config, dtype)
        self.tokenizer: Any = None  # a loralab.tokenizer.BPETokenizer when the folder has one

    @property
    def context_length(self) -> int:
        return self.config.n_positions

    def _ids(self, ids: Any, start: int = 0) -> np.ndarray:
        ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2:
            raise ValueError(
                f"GPT2: expected integer ids of shape (batch, T), got {ids.dtype} {ids.shape}"
            )
        if ids.shape[1] == 0:
            raise ValueError(f"GPT2: expected at least one token per row, got shape {ids.shape}")
        if start + ids.shape[1] > self.context_length:
            raise ValueError(
                f"GPT2: positions up to {start + ids.shape[1]} exceed n_positions={self.context_length}"
            )
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(
                f"GPT2: ids must lie in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        return ids

    def forward(self, ids: Any) -> Tensor:
        """Logits (batch, T, vocab) of ids (batch, T), T <= n_positions."""
        ids = self._ids(ids)
        t = self.transformer
        x = t.wte(ids) + t.wpe.weight[: ids.shape[1]]
        x = t.ln_f(t.h(x))
        return F.LinearFn.apply(x, t.wte.weight, None)

    def loss(self, x: np.ndarray, y: np.ndarray) -> Tensor:
        """Mean next-token cross-entropy of inputs ``x`` and targets ``y``, both (batch, T)."""
        return F.cross_entropy(self(x), y)

    def logits(self, ids: Any, cache: KVCache | None = None) -> np.ndarray:
        """Logits (batch, T, vocab) of new ids (batch, T) after the ``cache.length`` cached ones.

        Without a cache this equals ``self(ids).data``; with one, only the new positions are
        computed and their keys and values are appended to it (generation, one token a step).
        """
        cache = cache if cache is not None else KVCache(self.config.n_layer)
        start = cache.length
        ids = self._ids(ids, start)
        t = self.transformer
        with no_grad():
            x = t.wte(ids) + t.wpe.weight.data[start : start + ids.shape[1]]
            for i, block in enumerate(t.h):
                x = x + block.attn.cached(block.ln_1(x), cache, i)
                x = x + block.mlp(block.ln_2(x))
            return F.LinearFn.apply(t.ln_f(x), t.wte.weight, None).data

    def extra_repr(self) -> str:
        c = self.config
        return f"n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, vocab={c.vocab_size}"


def _hf_key(name: str) -> str:
    return name if name.startswith("transformer.") else f"transformer.{name}"


def from_hf(
    config: dict[str, Any], tensors: dict[str, np.ndarray], *, dtype: Any = np.float32
) -> GPT2:
    """A `GPT2` from an HF config dict and state dict (NumPy arrays keyed as in model.safetensors).

    Keys may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not (``GPT2Model``, as in
    the hub's original ``gpt2`` file); the causal-mask buffers ``attn.bias``/``attn.masked_bias``
    of old files are skipped; ``lm_head.weight``, when present, must equal ``wte`` (GPT-2 ties
    them). Conv1D weights (in, out) are transposed to (out, in). Every parameter must be present
    with its shape; unknown keys are refused by name.
    """
    cfg = GPT2Config(config)
    model = GPT2(cfg, dtype=dtype)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for raw_key, value in tensors.items():
        key = _hf_key(raw_key)
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask, a buffer: computed here, not stored
        if key == "transformer.lm_head.weight" or raw_key == "lm_head.weight":
            wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
            if wte is None or not np.array_equal(value, wte):
                raise ValueError(
                    "from_hf(gpt2): lm_head.weight differs from wte.weight; GPT-2 ties them"
                )
            continue
        if key not in params:
            raise ValueError(
                f"from_hf(gpt2): unexpected tensor {raw_key!r} (not a GPT-2 parameter)"
            )
        value = np.asarray(value)
        if key.endswith(".weight") and key.removesuffix(".weight").endswith(CONV1D):
            value = value.T  # Conv1D (in, out) -> Linear (out, in)
        if value.shape != params[key].data.shape:
            raise ValueError(
                f"from_hf(gpt2): tensor {raw_key!r} has shape {value.shape} (after any Conv1D "
                f"transpose), expected {params[key].data.shape}"
            )
        params[key].data = np.array(
            value, dtype=dtype, order="C"
        )  # a copy: never the read-only file map
        seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(
            f"from_hf(gpt2): missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    for name, module in model.named_modules():
        if name.endswith(CONV1D):
            module.fan_in_fan_out = True  # stored transposed in the checkpoint (PEFT's flag)
    return model


def to_hf(model: GPT2) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, state dict) in HF's GPT2LMHeadModel layout: Conv1D weights back to (in, out).

    LoRA layers must be merged (`loralab.lora.merge_lora`): their ``base.weight`` then holds
    W0 + ΔW and is written under the plain name; A and B are left out (an HF GPT-2 folder has no
    place for them). An unmerged LoRA layer is refused by name.
    """
    from loralab.lora import lora_layers

    unmerged = [name for name, layer in lora_layers(model) if not getattr(layer, "merged", False)]
    if unmerged:
        raise ValueError(
            f"to_hf(gpt2): LoRA layers {unmerged[:3]}{' ...' if len(unmerged) > 3 else ''} are not "
            "merged: call loralab.lora.merge_lora(model) first (or save the adapter alone with "
            "save_adapter)"
        )
    tensors = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        name = name.replace(".base.", ".")  # a merged LoRA layer's W0 + ΔW under its own name
        value = param.data
        if name.endswith(".weight") and name.removesuffix(".weight").endswith(CONV1D):
            value = value.T
        tensors[name] = np.ascontiguousarray(value)
    return model.config.to_dict(), tensors
