"""Count LoRA parameters and estimate training memory from a transformer's shape.

LoRA freezes a pretrained weight W0 of shape (d, k) and trains ΔW = (alpha/r) B A with B of shape (d, r)
and A of shape (r, k), so one adapted matrix trains r (d + k) numbers instead of d k. This module
applies that count to whole transformers described by their published shapes (the presets in
``loralab/data/presets.json``) and turns counts into bytes for full fine-tuning and for LoRA.

Integer arithmetic, no arrays: the CLI (``loralab params``) and the tutorial notebooks both use
these functions.

>>> gpt3 = get_preset("gpt3-175b")
>>> lora_params_for_model(gpt3, 4, targets=("q", "v"))
18874368
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import cast

from loralab._validate import boolean, non_negative_int, one_of, positive_int

#: Matrices LoRA can adapt in one transformer block, in the block's order.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
#: Bytes per element of each supported dtype.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
#: Number of per-parameter state tensors each optimizer keeps (Adam: m and v; plain SGD: none).
OPTIMIZER_STATES = {"adam": 2, "sgd": 0}


def full_param_count(d: int, k: int) -> int:
    """Number of entries of a dense weight W0 of shape (d, k): ``d * k``.

    >>> full_param_count(4096, 4096)
    16777216
    """
    where = "full_param_count"
    return positive_int("d", d, where) * positive_int("k", k, where)


def lora_param_count(d: int, k: int, r: int) -> int:
    """Trainable parameters of a LoRA adapter on one (d, k) matrix: ``r * (d + k)``.

    B has shape (d, r) and A has shape (r, k), so the adapter holds d r + r k numbers.

    >>> lora_param_count(4096, 4096, 8)
    65536
    """
    where = "lora_param_count"
    r, d, k = (positive_int(name, v, where) for name, v in (("r", r), ("d", d), ("k", k)))
    return r * (d + k)


@dataclass(frozen=True)
class TransformerShape:
    """The shape of a decoder-only transformer, enough to count its parameters.

    Parameters
    ----------
    d_model : int
        Width of the residual stream.
    n_layers : int
        Number of transformer blocks.
    d_ff : int
        Hidden width of the MLP (of each of gate and up for a gated MLP).
    n_heads : int
        Number of query heads; head_dim = d_model / n_heads.
    n_kv_heads : int, optional
        Number of key/value heads (grouped-query attention); defaults to ``n_heads``. The k and v
        projections have shape (n_kv_heads * head_dim, d_model).
    vocab_size : int
        Rows of the token embedding.
    context_length : int
        Maximum sequence length; counts only when ``learned_positions`` is true.
    learned_positions : bool
        A learned position table of shape (context_length, d_model) (GPT-2/3); false for RoPE.
    gated_mlp : bool
        SwiGLU-style MLP with gate, up (d_ff, d_model) and down (d_model, d_ff) projections;
        otherwise up and down only.
    tied_embeddings : bool
        The output head reuses the token embedding; otherwise it adds vocab_size * d_model.
    bias : bool
        Linear layers have biases.
    norm : {"layernorm", "rmsnorm"}
        LayerNorm has a weight and a bias, RMSNorm only a weight; two per block plus a final one.
    name, source : str
        The preset's name and where its shape was published.
    published_params : int or None
        The size its source states, to compare with `num_params`.
    hf_id : str or None
        The Hugging Face hub id of the checkpoint with this shape (what
        `loralab.models.from_pretrained` takes), when one is published.
    """

    d_model: int
    n_layers: int
    d_ff: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = 0
    context_length: int = 0
    learned_positions: bool = False
    gated_mlp: bool = False
    tied_embeddings: bool = False
    bias: bool = False
    norm: str = "layernorm"
    name: str = "custom"
    source: str = field(default="", compare=False)
    published_params: int | None = field(default=None, compare=False)
    hf_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = "TransformerShape"
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("d_model", "n_layers", "d_ff", "n_heads"):
            positive_int(name, getattr(self, name), where)
        n_kv_heads = positive_int("n_kv_heads", self.n_kv_heads, where)
        for name in ("vocab_size", "context_length"):
            non_negative_int(name, getattr(self, name), where)
        for name in ("learned_positions", "gated_mlp", "tied_embeddings", "bias"):
            boolean(name, getattr(self, name), where)
        one_of("norm", self.norm, ("layernorm", "rmsnorm"), where)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={n_kv_heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Output width of the k and v projections: n_kv_heads * head_dim."""
        return cast(int, self.n_kv_heads) * self.head_dim  # __post_init__ replaced a None

    @property
    def targets(self) -> tuple[str, ...]:
        """The LoRA targets this model has (``gate`` only for a gated MLP)."""
        return tuple(t for t in TARGETS if t != "gate" or self.gated_mlp)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Weight shape (out_features, in_features) of each linear layer in one block.

        Returns
        -------
        dict of str to (int, int)
            Keys are `targets`; PyTorch layout, so W0 of ``"k"`` is (kv_dim, d_model).
        """
        d, kv, ff = self.d_model, self.kv_dim, self.d_ff
        shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d)}
        if self.gated_mlp:
            shapes["gate"] = (ff, d)
        shapes.update(up=(ff, d), down=(d, ff))
        return shapes

    def num_params(self) -> int:
        """Total parameters of the model: embeddings, blocks, final norm and output head."""
        d = self.d_model
        per_norm = 2 * d if self.norm == "layernorm" else d
        block = 2 * per_norm
        for out_features, in_features in self.linear_shapes().values():
            block += out_features * in_features + (out_features if self.bias else 0)
        total = self.vocab_size * d + self.n_layers * block + per_norm
        if self.learned_positions:
            total += self.context_length * d
        if not self.tied_embeddings:
            total += self.vocab_size * d
        return total


def load_presets() -> dict[str, TransformerShape]:
    """Read every preset from ``loralab/data/presets.json``.

    Returns
    -------
    dict of str to TransformerShape
        Keyed by preset name, in the file's order (GPT-2 sizes, GPT-3, Llama 2, Llama 3, Mistral).
    """
    text = resources.files("loralab").joinpath("data", "presets.json").read_text("utf-8")
    raw = json.loads(text)["presets"]
    return {name: TransformerShape(name=name, **spec) for name, spec in raw.items()}


def get_preset(name: str) -> TransformerShape:
    """The preset called ``name``; a ValueError lists the known names when there is none."""
    if not isinstance(name, str):
        raise TypeError(f"get_preset: name must be a str, got {name!r} ({type(name).__name__})")
    presets = load_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


def _check_targets(shape: TransformerShape, targets: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = targets.split(",")
    names = tuple(targets) if isinstance(targets, Iterable) else None
    if names is None or not all(isinstance(t, str) for t in names):
        raise TypeError(f"targets must be names (str), got {targets!r}")
    chosen = tuple(t.strip() for t in names)
    valid = shape.targets
    unknown = [t for t in chosen if t not in valid]
    if unknown or not chosen:
        why = "" if shape.gated_mlp else " (gate needs a gated MLP)"
        raise ValueError(
            f"targets={list(chosen)!r}: unknown {unknown!r}; valid targets for "
            f"{shape.name}: {', '.join(valid)}{why}"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"targets={list(chosen)!r} lists a target more than once")
    return chosen


def lora_params_by_target(
    shape: TransformerShape, r: int, targets: Iterable[str] | str = ("q", "v")
) -> dict[str, int]:
    """LoRA trainable parameters of each target summed over all layers.

    For a target with W0 of shape (out, in): ``n_layers * r * (in + out)``.

    Parameters
    ----------
    shape : TransformerShape
    r : int
        LoRA rank, 0 < r <= d_model (a larger r cannot raise the rank of ΔW).
    targets : iterable of str or str
        Names among `TransformerShape.targets` (``"q,v"`` also works).
    """
    r = positive_int("r", r, "lora_params_by_target")
    if r > shape.d_model:
        raise ValueError(
            f"r={r} exceeds d_model={shape.d_model}: ΔW = (alpha/r) B A of a (out, in) weight has rank at "
            "most min(out, in) <= d_model, so a larger r only adds parameters"
        )
    shapes = shape.linear_shapes()
    return {
        t: shape.n_layers * lora_param_count(*shapes[t], r) for t in _check_targets(shape, targets)
    }


def lora_params_for_model(
    shape: TransformerShape, r: int, targets: Iterable[str] | str = ("q", "v")
) -> int:
    """Total LoRA trainable parameters: ``n_layers * sum over targets of r * (in + out)``.

    The LoRA paper's GPT-3 175B with r=4 on q and v: 96 * 2 * 4 * (12288 + 12288) = 18,874,368.

    With grouped-query attention k and v are narrower: Llama 2 70B has W0 of q (8192, 8192) and
    of k (1024, 8192), so r=8 on q, k trains 80 * 8 * ((8192 + 8192) + (1024 + 8192)) parameters.

    >>> lora_params_for_model(get_preset("llama2-70b"), 8, targets=("q", "k"))
    16384000
    """
    return sum(lora_params_by_target(shape, r, targets).values())


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes held during training, split by kind (activations excluded)."""

    weights: int
    gradients: int
    optimizer_states: int

    @property
    def total(self) -> int:
        """weights + gradients + optimizer_states."""
        return self.weights + self.gradients + self.optimizer_states


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory of full fine-tuning against LoRA for one model.

    Built by `memory_estimate`; byte counts are ints, activations excluded.
    """

    dtype: str
    optimizer: str
    state_dtype: str
    r: int
    targets: tuple[str, ...]
    total_params: int
    trainable_params: int
    full: MemoryBreakdown
    lora: MemoryBreakdown
    adapter_bytes: int

    @property
    def trainable_fraction(self) -> float:
        """LoRA trainable parameters over the base model's total parameters."""
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (the ``loralab params --json`` keys)."""
        breakdown = {
            name: {
                "weights": part.weights,
                "gradients": part.gradients,
                "optimizer_states": part.optimizer_states,
                "total": part.total,
            }
            for name, part in (("full", self.full), ("lora", self.lora))
        }
        return {
            "r": self.r,
            "targets": list(self.targets),
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "state_dtype": self.state_dtype,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_fraction": self.trainable_fraction,
            "adapter_bytes": self.adapter_bytes,
            "memory_full_bytes": self.full.total,
            "memory_lora_bytes": self.lora.total,
            "memory_breakdown_bytes": breakdown,
            "activations_included": False,
            "allreduce_bytes_per_step_full": self.full.gradients,
            "allreduce_bytes_per_step_lora": self.lora.gradients,
        }


def ring_allreduce_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes each of N ranks sends (and receives) to all-reduce ``payload_bytes`` in a ring.

    Data-parallel training all-reduces one gradient per trainable parameter every step: the
    payload is the ``gradients`` entry of a `MemoryBreakdown` (``allreduce_bytes_per_step_*``
    in ``loralab params --json``). A ring all-reduce cuts it into N chunks and passes them round
    twice (reduce-scatter, then all-gather): ``2 (N - 1) / N`` times the payload per rank.

    >>> ring_allreduce_bytes(1000, 4)
    1500
    """
    where = "ring_allreduce_bytes"
    payload_bytes = non_negative_int("payload_bytes", payload_bytes, where)
    world_size = positive_int("world_size", world_size, where)
    return 2 * (world_size - 1) * payload_bytes // world_size


def memory_estimate(
    shape: TransformerShape,
    r: int,
    targets: Iterable[str] | str = ("q", "v"),
    *,
    dtype: str = "fp16",
    optimizer: str = "adam",
    state_dtype: str | None = None,
) -> MemoryEstimate:
    """Bytes for weights, gradients and optimizer states: full fine-tuning against LoRA.

    Conventions, for N = the model's parameters and P = LoRA's trainable parameters:

    - every weight and gradient is stored in ``dtype`` (b bytes each);
    - the optimizer keeps s state tensors per trainable parameter (Adam: 2, SGD without momentum:
      0) in ``state_dtype``, which defaults to ``dtype`` (pure half-precision training, no fp32
      master copy). Mixed precision with fp32 master weights and fp32 Adam states is
      ``dtype="fp16", state_dtype="fp32"`` plus the master copy, which this estimate leaves out;
    - full fine-tuning: weights N b, gradients N b, states N s b_state;
    - LoRA: weights (N + P) b (frozen W0 plus the adapter), gradients P b, states P s b_state;
    - ``adapter_bytes`` = P b, the size of the saved adapter tensors (file headers left out).

    Activations are **not** included: they depend on batch size, sequence length and
    checkpointing, and LoRA changes them little.

    Parameters
    ----------
    shape : TransformerShape
    r : int
        LoRA rank, > 0.
    targets : iterable of str or str
        LoRA targets, see `lora_params_for_model`.
    dtype : {"fp16", "bf16", "fp32"}
    optimizer : {"adam", "sgd"}
    state_dtype : {"fp16", "bf16", "fp32"} or None
        Dtype of the optimizer states; None means ``dtype``.

    Returns
    -------
    MemoryEstimate
    """
    where = "memory_estimate"
    one_of("dtype", dtype, DTYPE_BYTES, where)
    one_of("optimizer", optimizer, OPTIMIZER_STATES, where)
    if state_dtype is None:
        state_dtype = dtype
    one_of("state_dtype", state_dtype, DTYPE_BYTES, where)
    by_target = lora_params_by_target(shape, r, targets)
    trainable = sum(by_target.values())
    total = shape.num_params()
    b = DTYPE_BYTES[dtype]
    state_b = OPTIMIZER_STATES[optimizer] * DTYPE_BYTES[state_dtype]
    return MemoryEstimate(
        dtype=dtype,
        optimizer=optimizer,
        state_dtype=state_dtype,
        r=int(r),
        targets=tuple(by_target),
        total_params=total,
        trainable_params=trainable,
        full=MemoryBreakdown(total * b, total * b, total * state_b),
        lora=MemoryBreakdown((total + trainable) * b, trainable * b, trainable * state_b),
        adapter_bytes=trainable * b,
    )
