"""LLaMA (and Mistral, SmolLM, TinyLlama) on loralab's engine, with the checkpoint's own module names.

A LLaMA block differs from GPT-2's in four ops, each in `loralab.functional_llm` with its backward:
RMSNorm instead of LayerNorm, rotary position embedding (RoPE) instead of a table of learned
positions, a gated SwiGLU MLP instead of GELU, and grouped-query attention (fewer key/value heads
than query heads). No Linear has a bias. Module names are Hugging Face's, so a PEFT ``LoraConfig``
or adapter written for the model works unchanged (``target_modules=["q_proj", "v_proj"]``)::

    model.embed_tokens                                   token table (vocab, d)
    model.layers.{i}.input_layernorm                     RMSNorm before attention
    model.layers.{i}.self_attn.q_proj, k_proj, v_proj    Wq (H hd, d), Wk and Wv (H_kv hd, d)
    model.layers.{i}.self_attn.o_proj                    Wo (d, H hd)
    model.layers.{i}.post_attention_layernorm            RMSNorm before the MLP
    model.layers.{i}.mlp.gate_proj, up_proj, down_proj   (f, d), (f, d), (d, f)
    model.norm                                           the final RMSNorm
    lm_head                                              (vocab, d); absent when tied to embed_tokens

Build one with `from_hf` (a config dict and a state dict) or `loralab.models.hf.from_pretrained`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loralab import functional as F
from loralab.models.kv_cache import KVCache
from loralab.nn import Embedding, Linear, Module, Parameter, Sequential
from loralab.nn.module import make_rng
from loralab.tensor import Tensor, no_grad

__all__ = ["Llama", "LlamaConfig", "RMSNorm", "from_hf", "to_hf"]

MODEL_TYPES = ("llama", "mistral")


def _refuse(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"LlamaConfig: {key}={value!r} {why}")


def _size(config: dict[str, Any], key: str, default: Any = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(key, value, "must be a positive integer")
    return value


def _flag(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise _refuse(key, value, "must be true or false")
    return value


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling or None) from either spelling of config.json.

    Checkpoints write ``rope_theta`` and ``rope_scaling`` (null or a dict with ``rope_type``, or
    ``type`` in older files); transformers 5 writes one dict ``rope_parameters``.
    """
    params = config.get("rope_parameters")
    scaling = params if params is not None else config.get("rope_scaling")
    theta = config.get("rope_theta", 10000.0)
    if params is not None:
        if not isinstance(params, dict):
            raise _refuse("rope_parameters", params, "must be a dict")
        if "rope_theta" in config and params.get("rope_theta", theta) != theta:
            raise _refuse("rope_theta", theta, f"disagrees with rope_parameters {params}")
        old = config.get("rope_scaling") or {}
        if any(params.get("rope_type" if k == "type" else k) != v for k, v in old.items()):
            raise _refuse("rope_scaling", old, f"disagrees with rope_parameters {params}")
        theta = params.get("rope_theta", theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        raise _refuse("rope_theta", theta, "must be a positive number")
    if scaling is not None and not isinstance(scaling, dict):
        raise _refuse("rope_scaling", scaling, "must be null or a dict")
    partial = (scaling or {}).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _refuse(
            "partial_rotary_factor", partial, "(RoPE on part of each head) is not implemented"
        )
    if scaling is None:
        return float(theta), None
    key = "rope_parameters" if params is not None else "rope_scaling"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise _refuse(
            key,
            scaling,
            f"asks for RoPE scaling {kind!r}, which changes the math and is not implemented "
            "(implemented: none, 'llama3')",
        )
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for name in fields:
        value = scaling.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _refuse(key, scaling, f"needs a positive number {name!r} for 'llama3' scaling")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise _refuse(key, scaling, "needs high_freq_factor > low_freq_factor")
    return float(theta), {"rope_type": "llama3", **{name: scaling[name] for name in fields}}


@dataclass
class LlamaConfig:
    """The fields of an HF ``LlamaConfig`` / ``MistralConfig`` (config.json) that the math uses, checked.

    Build it with `LlamaConfig.from_hf`. Every field that would change the computed function and is
    not implemented here is refused by name, never ignored: another ``model_type``, an activation
    other than SiLU, biases (``attention_bias``, ``mlp_bias``), attention dropout, RoPE scaling
    other than "llama3", partial rotary, a sliding window shorter than the context, quantized
    weights. (``pretraining_tp`` is accepted: it only split Meta's matmuls into slices, the same
    function, and transformers no longer reads it.)

    Attributes
    ----------
    vocab_size, hidden_size, intermediate_size, num_hidden_layers : int
    num_attention_heads, num_key_value_heads, head_dim : int
        H, H_kv (dividing H) and hd (even; ``hidden_size // H`` unless config.json says otherwise).
    max_position_embeddings : int
        The longest context.
    rms_norm_eps : float
    rope_theta : float
    rope_scaling : dict or None
        The "llama3" frequency scaling (see `loralab.functional.rope_inv_freq`), or None.
    tie_word_embeddings : bool
        Whether the logits reuse ``embed_tokens`` (no ``lm_head`` then).
    model_type : "llama" or "mistral"
    raw : dict
        config.json as given (written back by `to_hf`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    model_type: str = "llama"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """Check an HF config dict (config.json) and keep the fields the math needs."""
        if not isinstance(config, dict):
            raise TypeError(
                f"LlamaConfig: expected the config as a dict, got {type(config).__name__}"
            )
        kind = config.get("model_type")
        if kind not in MODEL_TYPES:
            raise _refuse(
                "model_type", kind, f"is not a LLaMA-family model (supported: {MODEL_TYPES})"
            )
        sizes = {
            key: _size(config, key)
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
            )
        }
        H = sizes["num_attention_heads"]
        kv = config.get("num_key_value_heads")
        H_kv = H if kv is None else _size(config, "num_key_value_heads")
        if H % H_kv:
            raise _refuse(
                "num_key_value_heads", H_kv, f"must divide num_attention_heads={H} (grouped heads)"
            )
        if config.get("head_dim") is None:
            if sizes["hidden_size"] % H:
                raise _refuse(
                    "hidden_size",
                    sizes["hidden_size"],
                    f"is not divisible by num_attention_heads={H}",
                )
            head_dim = sizes["hidden_size"] // H
        else:
            head_dim = _size(config, "head_dim")
        if head_dim % 2:
            raise _refuse("head_dim", head_dim, "must be even (RoPE rotates pairs of coordinates)")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise _refuse("hidden_act", act, "is not implemented (LLaMA's MLP uses 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if _flag(config, key, False):
                raise _refuse(key, True, "adds biases that LLaMA does not have; not implemented")
        dropout = config.get("attention_dropout", 0.0)
        if dropout not in (0, 0.0) or isinstance(dropout, bool):
            raise _refuse("attention_dropout", dropout, "is not implemented (only 0.0)")
        tp = config.get("pretraining_tp", 1)
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise _refuse("pretraining_tp", tp, "must be a positive integer")
        window = config.get("sliding_window", 4096 if kind == "mistral" else None)
        if config.get("use_sliding_window") is True or (
            window is not None and window < sizes["max_position_embeddings"]
        ):
            raise _refuse(
                "sliding_window",
                window,
                "limits attention to a window shorter than max_position_embeddings="
                f"{sizes['max_position_embeddings']}; sliding-window attention is not implemented",
            )
        if config.get("quantization_config") is not None:
            raise _refuse("quantization_config", config["quantization_config"], "is not supported")
        eps = config.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise _refuse("rms_norm_eps", eps, "must be a finite number >= 0")
        theta, scaling = _rope(config)
        return cls(
            **sizes,
            num_key_value_heads=H_kv,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_flag(config, "tie_word_embeddings", False),
            model_type=kind,
            raw=dict(config),
        )

    def to_dict(self) -> dict[str, Any]:
        """config.json as it was given."""
        return dict(self.raw)


class RMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis (HF's ``LlamaRMSNorm``).

    Attributes
    ----------
    weight : Parameter of shape (d,), ones
    """

    def __init__(self, d: int, eps: float = 1e-6, *, dtype: Any = np.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(np.ones(d, dtype=dtype))

    def forward(self, x: Any) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LlamaAttention(Module):
    """Grouped-query self-attention with RoPE: children ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``."""

    def __init__(self, c: LlamaConfig, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        d, q_out, kv_out = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        )
        self.q_proj = Linear(d, q_out, bias=False, rng=rng, dtype=dtype)
        self.k_proj = Linear(d, kv_out, bias=False, rng=rng, dtype=dtype)
        self.v_proj = Linear(d, kv_out, bias=False, rng=rng, dtype=dtype)
        self.o_proj = Linear(q_out, d, bias=False, rng=rng, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        cos: np.ndarray,
        sin: np.ndarray,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x (B, T, d), RoPE tables (T, hd) of the T positions -> (B, T, d).

        With a cache, k and v of the new positions are appended to it and q attends to all of
        them (no gradient flows into the cache).
        """
        B, T, _ = x.shape
        hd = self.head_dim

        def heads(t: Tensor, n: int) -> Tensor:  # (B, T, n hd) -> (B, n, T, hd)
            return t.reshape(B, T, n, hd).transpose(0, 2, 1, 3)

        q = F.rotary(heads(self.q_proj(x), self.n_heads), cos, sin)
        k = F.rotary(heads(self.k_proj(x), self.n_kv_heads), cos, sin)
        v = heads(self.v_proj(x), self.n_kv_heads)
        if cache is not None:
            k, v = (Tensor(a) for a in cache.append(layer, k.data, v.data))
        o = F.grouped_query_attention(q, k, v)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, self.n_heads * hd))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"


class LlamaMLP(Module):
    """down_proj(silu(gate_proj x) * up_proj x): children ``gate_proj``, ``up_proj``, ``down_proj``."""

    def __init__(self, c: LlamaConfig, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = Linear(d, f, bias=False, rng=rng, dtype=dtype)
        self.up_proj = Linear(d, f, bias=False, rng=rng, dtype=dtype)
        self.down_proj = Linear(f, d, bias=False, rng=rng, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(Module):
    """x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x))."""

    def __init__(self, c: LlamaConfig, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(c, rng=rng, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(c, rng=rng, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        cos: np.ndarray,
        sin: np.ndarray,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(Module):
    """HF's ``LlamaModel``: ``embed_tokens``, the decoder ``layers`` and the final ``norm``."""

    def __init__(self, c: LlamaConfig, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, rng=rng, dtype=dtype)
        self.layers = Sequential(
            *(LlamaDecoderLayer(c, rng=rng, dtype=dtype) for _ in range(c.num_hidden_layers))
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)


class Llama(Module):
    """A LLaMA-family causal language model (HF's ``LlamaForCausalLM``) on the engine.

    ``model(ids)`` maps integer ids (batch, T) to logits (batch, T, vocab) as a Tensor
    (differentiable: train LoRA on it); ``model.logits(ids, cache)`` is the no-grad path of
    generation, with a `loralab.models.kv_cache.KVCache`.

    Parameters
    ----------
    config : LlamaConfig
    seed : int, optional
        Initial values (Linear layers as `loralab.nn.Linear`, tables N(0, 1)); `from_hf`
        replaces them with the checkpoint's.
    dtype : numpy dtype, default float32

    Examples
    --------
    >>> cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=50, hidden_size=16,
    ...     intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
    ...     num_key_value_heads=2, max_position_embeddings=32))
    >>> Llama(cfg, seed=0)(np.zeros((2, 5), dtype=np.int64)).shape
    (2, 5, 50)
    """

    def __init__(self, config: LlamaConfig, *, seed: int | None = None, dtype: Any = np.float32):
        if not isinstance(config, LlamaConfig):
            raise TypeError(
                f"Llama: expected a LlamaConfig (LlamaConfig.from_hf(config_dict)), got "
                f"{type(config).__name__}"
            )
        super().__init__()
        self.config = config
        rng = make_rng(seed)
        self.model = LlamaModel(config, rng=rng, dtype=dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, bias=False, rng=rng, dtype=dtype
            )
        self.tokenizer: Any = (
            None  # a loralab.tokenizer.BPETokenizer when from_pretrained finds one
        )

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def _ids(self, ids: Any, start: int) -> np.ndarray:
        ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"Llama: expected integer ids of shape (batch, T), T >= 1, got {ids.dtype} {ids.shape}"
            )
        if start + ids.shape[1] > self.context_length:
            raise ValueError(
                f"Llama: positions up to {start + ids.shape[1]} exceed "
                f"max_position_embeddings={self.context_length}"
            )
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(
                f"Llama: ids must lie in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        return ids

    def _run(self, ids: np.ndarray, cache: KVCache | None, start: int) -> Tensor:
        c = self.config
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = (
            t.astype(dtype)
            for t in F.rope_tables(
                ids.shape[1], c.head_dim, c.rope_theta, start, scaling=c.rope_scaling
            )
        )
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i)
        x = self.model.norm(x)
        if c.tie_word_embeddings:
            return F.LinearFn.apply(x, self.model.embed_tokens.weight, None)
        return self.lm_head(x)

    def forward(self, ids: Any) -> Tensor:
        """Logits (batch, T, vocab) of integer ids (batch, T), positions 0 .. T - 1."""
        return self._run(self._ids(ids, 0), None, 0)

    def loss(self, x: np.ndarray, y: np.ndarray) -> Tensor:
        """Mean next-token cross-entropy of inputs ``x`` and targets ``y``, both (batch, T)."""
        return F.cross_entropy(self(x), y)

    def logits(
        self, ids: Any, cache: KVCache | None = None, start_pos: int | None = None
    ) -> np.ndarray:
        """Logits (batch, T, vocab) of ids (batch, T) at positions start_pos .. start_pos + T - 1, no grad.

        With a cache, ``start_pos`` is the number of positions it holds (the default) and the new
        positions' keys and values are appended to it: generation feeds the prompt once, then one
        token per step. Without one, ``start_pos`` (default 0) only moves the RoPE angles, which
        leaves the logits unchanged up to rounding (attention sees relative positions only).
        """
        held = cache.length if cache is not None else 0
        if start_pos is None:
            start_pos = held
        if (
            isinstance(start_pos, bool)
            or not isinstance(start_pos, (int, np.integer))
            or start_pos < 0
        ):
            raise ValueError(f"Llama.logits: start_pos must be an integer >= 0, got {start_pos!r}")
        if cache is not None and start_pos != held:
            raise ValueError(
                f"Llama.logits: start_pos={start_pos} but the cache holds {held} positions; the new "
                "ids must follow the cached ones"
            )
        ids = self._ids(ids, int(start_pos))
        with no_grad():
            return self._run(ids, cache, int(start_pos)).data

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{c.model_type}: layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}, kv_heads={c.num_key_value_heads}, vocab={c.vocab_size}"
        )


def _listed(names: list[str]) -> str:
    return ", ".join(map(repr, names[:4])) + (
        f" and {len(names) - 4} more" if len(names) > 4 else ""
    )


def from_hf(
    config: dict[str, Any], tensors: dict[str, np.ndarray], *, dtype: Any = np.float32
) -> Llama:
    """A `Llama` from an HF config dict and state dict (NumPy arrays keyed as in model.safetensors).

    Parameters
    ----------
    config : dict
        config.json, checked by `LlamaConfig.from_hf`.
    tensors : dict of str to ndarray
        HF's keys (``model.layers.0.self_attn.q_proj.weight`` (H hd, d), ...). With tied
        embeddings ``lm_head.weight`` may be absent or equal to ``model.embed_tokens.weight``;
        the RoPE buffers some old files hold (``...rotary_emb.inv_freq``) are skipped (computed
        here). Every other key must be a parameter of the model, with its shape, and every
        parameter must be given: anything else is refused by name before anything is built.
    dtype : numpy dtype, default float32

    Returns
    -------
    Llama
    """
    cfg = LlamaConfig.from_hf(config)
    model = Llama(cfg, seed=0, dtype=dtype)
    params = dict(model.named_parameters())
    chosen: dict[str, np.ndarray] = {}
    unexpected, wrong = [], []
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            table = tensors.get("model.embed_tokens.weight")
            if table is None or not np.array_equal(value, table):
                raise ValueError(
                    "from_hf(llama): lm_head.weight differs from model.embed_tokens.weight, but "
                    "tie_word_embeddings=true says they are one matrix"
                )
            continue
        if key not in params:
            unexpected.append(key)
            continue
        value = np.asarray(value)
        if value.shape != params[key].shape:
            wrong.append(f"{key!r} has shape {value.shape}, expected {params[key].shape}")
        chosen[key] = value
    missing = sorted(set(params) - set(chosen))
    if unexpected:
        raise ValueError(f"from_hf(llama): unexpected tensors {_listed(sorted(unexpected))}")
    if missing:
        raise ValueError(f"from_hf(llama): missing tensors {_listed(missing)}")
    if wrong:
        raise ValueError(f"from_hf(llama): {'; '.join(wrong[:4])}")
    for key, value in chosen.items():  # a copy: a memory-mapped file's arrays are read-only
        params[key].data = np.array(value, dtype=dtype, order="C", copy=True)
    return model


def to_hf(model: Llama) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, state dict) in HF's ``LlamaForCausalLM`` layout, for ``save_pretrained``.

    LoRA layers must be merged (`loralab.lora.merge_lora`): their ``base.weight`` then holds
    W0 + ΔW and is written under the plain name; A and B are left out. An unmerged LoRA layer
    is refused by name. With tied embeddings no ``lm_head.weight`` is written (as HF does).
    """
    from loralab.lora import lora_layers

    if not isinstance(model, Llama):
        raise TypeError(f"to_hf(llama): expected a Llama, got {type(model).__name__}")
    unmerged = [name for name, layer in lora_layers(model) if not getattr(layer, "merged", False)]
    if unmerged:
        raise ValueError(
            f"to_hf(llama): LoRA layers {_listed(unmerged)} are not merged: call "
            "loralab.lora.merge_lora(model) first (or save the adapter alone with save_adapter)"
        )
    tensors = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        tensors[name.replace(".base.", ".")] = np.ascontiguousarray(param.data)
    return model.config.to_dict(), tensors
