"""The ops of LLaMA-style models (LLaMA 2/3, Mistral, SmolLM, TinyLlama), each with its backward.

Re-exported by `loralab.functional` (``F.rms_norm``, ``F.rotary``, ...); written here so that
each file stays short. As everywhere in the engine, every op is one `loralab.tensor.Function`
whose hand-written ``backward`` sits beside its ``forward``; ``tests/test_functional_llm.py``
gradchecks each one in float64 and compares it with PyTorch's autograd.

- `rms_norm`: y = x / sqrt(mean(x^2) + eps) * w (LLaMA's normalisation: no mean, no bias);
- `rotary` with `rope_tables`: rotary position embedding in Hugging Face's ``rotate_half`` form;
- `silu` and `swiglu`: the gated MLP, down(silu(gate x) * up x);
- `grouped_query_attention`: causal attention whose key/value heads each serve several query heads.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from loralab.tensor import Function, Tensor, as_tensor

__all__ = [
    "rms_norm",
    "rope_inv_freq",
    "rope_tables",
    "rotary",
    "rotate_half",
    "silu",
    "swiglu",
    "grouped_query_attention",
]


def _shape(t: Any) -> tuple[int, ...]:
    return np.shape(t.data if isinstance(t, Tensor) else t)


# ----- RMSNorm ------------------------------------------------------------------------------------
class RMSNormFn(Function):
    """y = xhat * w with xhat = x * rho, rho = 1 / sqrt(mean(x^2) + eps), over the last axis (size d).

    Backward: dw = sum over positions of dy * xhat; with g = dy * w,
    dx = rho * (g - xhat * mean(g * xhat)), because d rho / d x_j = -rho^3 x_j / d.
    (LayerNorm's backward without the mean-centring term.)
    """

    @staticmethod
    def forward(ctx, x, w, eps):
        rho = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        xhat = x * rho
        ctx.save_for_backward(xhat, rho, w)
        return xhat * w

    @staticmethod
    def backward(ctx, grad):
        xhat, rho, w = ctx.saved
        need_x, need_w = ctx.needs_input_grad
        dw = (grad * xhat).sum(axis=tuple(range(grad.ndim - 1))) if need_w else None
        dx = None
        if need_x:
            g = grad * w
            dx = g - xhat * (g * xhat).mean(axis=-1, keepdims=True)
            dx *= rho
        return dx, dw


def rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Tensor:
    """Root-mean-square normalisation over the last axis (HF's ``LlamaRMSNorm``).

    y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without subtracting the mean and without a
    bias. (HF computes it in float32 whatever the model's dtype, for bfloat16 training; here it is
    computed in the dtype of ``x``.)

    Parameters
    ----------
    x : Tensor of shape (..., d)
    weight : Tensor of shape (d,)
    eps : float, default 1e-6
        ``rms_norm_eps`` of the config.

    Returns
    -------
    Tensor of shape (..., d)
    """
    w_shape = _shape(weight)
    x_shape = _shape(x)
    if len(w_shape) != 1 or not x_shape or x_shape[-1] != w_shape[0]:
        raise ValueError(
            f"rms_norm: expected weight of shape (d,) and x of shape (..., d), got weight "
            f"{w_shape} and x {x_shape}"
        )
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")
    return RMSNormFn.apply(as_tensor(x), weight, eps=float(eps))


# ----- rotary position embedding ------------------------------------------------------------------
def rope_inv_freq(
    head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None
) -> np.ndarray:
    """The rotation frequencies omega_i = theta^(-2i / head_dim), i = 0 .. head_dim/2 - 1 (float64).

    Parameters
    ----------
    head_dim : int
        Even.
    theta : float, default 10000.0
        ``rope_theta`` (500000 for LLaMA 3).
    scaling : dict, optional
        ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"}`` (LLaMA 3.1/3.2): wavelengths 2 pi / omega longer
        than original / low_freq_factor are divided by ``factor``, shorter than
        original / high_freq_factor kept, those between interpolated smoothly (as HF's
        ``_compute_llama3_parameters``). No other kind is implemented.

    Returns
    -------
    ndarray of shape (head_dim // 2,)
    """
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"rope_inv_freq: head_dim must be a positive even integer, got {head_dim!r}"
        )
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope_inv_freq: rope scaling {kind!r} is not implemented (only 'llama3')")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def rope_tables(
    T: int,
    head_dim: int,
    theta: float = 10000.0,
    start: int = 0,
    *,
    scaling: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the angles m * omega_i of positions m = start .. start + T - 1 (float64).

    In HF's layout each frequency appears twice, at columns i and i + head_dim/2 (the two
    coordinates that `rotary` rotates together): ``cos[m, i] = cos[m, i + head_dim/2] =
    cos((start + m) omega_i)`` with omega from `rope_inv_freq`.

    Returns
    -------
    cos, sin : ndarray of shape (T, head_dim)
    """
    if not isinstance(T, int) or T < 0 or not isinstance(start, int) or start < 0:
        raise ValueError(f"rope_tables: T and start must be integers >= 0, got {T!r}, {start!r}")
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = np.arange(start, start + T, dtype=np.float64)[:, None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1), halves of the last axis: each pair (x_i, x_{i+d/2}) turned by 90 degrees."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RotaryFn(Function):
    """y = x * cos + rotate_half(x) * sin: the pair (x_i, x_{i+d/2}) rotated by the angle m omega_i.

    The rotation is orthogonal, so the backward rotates back, by -m omega_i:
    dx = dy * cos + rotate_half^T(dy * sin), with rotate_half^T(u) = -rotate_half(u) = (u2, -u1).
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved
        return grad * cos - rotate_half(grad * sin), None, None


def rotary(x: Any, cos: Any, sin: Any) -> Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021) in Hugging Face's ``rotate_half`` convention.

    Position m's vector is split into pairs, each rotated by its own angle m omega_i:

        (y_i, y_{i+d/2}) = (x_i cos - x_{i+d/2} sin,  x_{i+d/2} cos + x_i sin),  angle m omega_i

    so q_m . k_n depends on the positions only through m - n. **The pairs are (i, i + d/2)**,
    the two halves of the head: ``y = x cos + rotate_half(x) sin``. The RoFormer paper and Meta's
    original LLaMA code pair neighbours (2i, 2i + 1) instead ("interleaved"), as complex numbers
    x_{2i} + j x_{2i+1}. The two are the same rotation after a fixed permutation of each head's
    coordinates; HF's conversion script (``convert_llama_weights_to_hf.py``) applies that
    permutation to the rows of Wq and Wk, so an HF checkpoint is right with ``rotate_half`` and
    would be wrong with the interleaved form (and Meta's original weights wrong with this one).
    Only q and k are rotated, never v.

    Parameters
    ----------
    x : Tensor of shape (..., T, head_dim)
        Queries or keys, heads in front: (batch, heads, T, head_dim).
    cos, sin : ndarray of shape (T, head_dim)
        From `rope_tables` (constants: no gradient flows to them).

    Returns
    -------
    Tensor of the shape of x
    """
    x_shape, c_shape = _shape(x), _shape(cos)
    if len(x_shape) < 2 or x_shape[-1] % 2:
        raise ValueError(
            f"rotary: expected x of shape (..., T, head_dim), head_dim even, got {x_shape}"
        )
    if c_shape != x_shape[-2:] or _shape(sin) != c_shape:
        raise ValueError(
            f"rotary: expected cos and sin of shape {x_shape[-2:]} (T, head_dim) for x of shape "
            f"{x_shape}, got {c_shape} and {_shape(sin)}"
        )
    x = as_tensor(x)
    return RotaryFn.apply(x, np.asarray(cos, dtype=x.dtype), np.asarray(sin, dtype=x.dtype))


# ----- SiLU and SwiGLU ----------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow: exp only ever sees -|x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


class SiLUFn(Function):
    """y = x s with s = sigmoid(x). Backward: dy/dx = s + x s (1 - s) = s (1 + x (1 - s))."""

    @staticmethod
    def forward(ctx, x):
        s = _sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved
        return (grad * s * (1.0 + x * (1.0 - s)),)


def silu(x: Any) -> Tensor:
    """SiLU (swish), x * sigmoid(x), elementwise: HF's ``hidden_act="silu"``."""
    return SiLUFn.apply(as_tensor(x))


class SwiGLUFn(Function):
    """y = silu(g) * u (the gate of LLaMA's MLP), fused.

    Backward: du = dy * silu(g); dg = dy * u * s (1 + g (1 - s)), s = sigmoid(g).
    """

    @staticmethod
    def forward(ctx, gate, up):
        s = _sigmoid(gate)
        act = gate * s
        ctx.save_for_backward(gate, up, s, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        gate, up, s, act = ctx.saved
        need_gate, need_up = ctx.needs_input_grad
        dgate = grad * up * s * (1.0 + gate * (1.0 - s)) if need_gate else None
        dup = grad * act if need_up else None
        return dgate, dup


def swiglu(gate: Any, up: Any) -> Tensor:
    """silu(gate) * up: LLaMA's MLP is ``down_proj(swiglu(gate_proj(x), up_proj(x)))``.

    Parameters
    ----------
    gate, up : Tensor of shape (..., intermediate_size)

    Returns
    -------
    Tensor of shape (..., intermediate_size)
    """
    if _shape(gate) != _shape(up):
        raise ValueError(
            f"swiglu: expected gate and up of one shape, got {_shape(gate)} and {_shape(up)}"
        )
    return SwiGLUFn.apply(as_tensor(gate), as_tensor(up))


# ----- grouped-query attention --------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _future(T: int, S: int) -> np.ndarray:
    """(T, S) boolean: True where key s lies after query t, which sits at position S - T + t."""
    future = np.triu(np.ones((T, S), dtype=bool), k=S - T + 1)
    future.flags.writeable = False
    return future


class GroupedQueryAttentionFn(Function):
    """Causal attention where each of the H_kv key/value heads serves g = H / H_kv query heads.

    Query head h reads key/value head h // g (HF's ``repeat_kv``). Shapes: q (B, H, T, hd),
    k and v (B, H_kv, S, hd), S >= T. The queries are grouped as (B, H_kv, g, T, hd), so the
    g heads of a group meet their one k and v by broadcasting, without copying k or v g times:

        S = (q / sqrt(hd)) k^T + M    (B, H_kv, g, T, S);  M = -inf where key s > position of t
        P = softmax(S),   O = P v     (B, H_kv, g, T, hd) -> (B, H, T, hd)

    Backward, as `loralab.models.gpt.Attention`'s, except that a key/value head was used by g
    query heads, so its gradient is the sum of theirs:

        dv = sum over the group of P^T dO,   dS = P * (dO v^T - rowsum(dO * O)),
        dq = dS k / sqrt(hd),                dk = sum over the group of dS^T (q / sqrt(hd)).
    """

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, hd = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        g = H // Hkv
        scale = np.asarray(1.0 / math.sqrt(hd), dtype=q.dtype)
        qg = q.reshape(B, Hkv, g, T, hd) * scale
        kg, vg = k[:, :, None], v[:, :, None]  # (B, H_kv, 1, S, hd): shared by the group
        scores = qg @ kg.swapaxes(-1, -2)
        scores[..., _future(T, S)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        P = np.exp(scores, out=scores)
        P /= P.sum(axis=-1, keepdims=True)
        O = P @ vg
        ctx.save_for_backward(qg, kg, vg, P, O, scale)
        return O.reshape(B, H, T, hd)

    @staticmethod
    def backward(ctx, grad):
        qg, kg, vg, P, O, scale = ctx.saved
        need_q, need_k, need_v = ctx.needs_input_grad
        dO = grad.reshape(O.shape)
        dv = (P.swapaxes(-1, -2) @ dO).sum(axis=2) if need_v else None
        dS = dO @ vg.swapaxes(-1, -2)  # dP, turned into dS in place
        dS -= (dO * O).sum(axis=-1, keepdims=True)
        dS *= P
        dq = ((dS @ kg) * scale).reshape(grad.shape) if need_q else None
        dk = (dS.swapaxes(-1, -2) @ qg).sum(axis=2) if need_k else None
        return dq, dk, dv


def grouped_query_attention(q: Any, k: Any, v: Any) -> Tensor:
    """Causal attention with grouped key/value heads (GQA; multi-head when H_kv = H).

    LLaMA-2-70B, LLaMA 3, Mistral, SmolLM and TinyLlama keep fewer key/value heads than query
    heads (``num_key_value_heads`` < ``num_attention_heads``): each k/v head serves
    g = H / H_kv consecutive query heads, which shrinks the key/value cache g times.

    Parameters
    ----------
    q : Tensor of shape (batch, H, T, head_dim)
        Queries of the T newest positions (after `rotary`).
    k, v : Tensor of shape (batch, H_kv, S, head_dim), S >= T
        Keys and values of every position so far: S = T in training; in generation the cache's
        S positions, of which the last T belong to ``q``. Query t sits at position S - T + t and
        attends to keys 0 .. S - T + t.

    Returns
    -------
    Tensor of shape (batch, H, T, head_dim)
    """
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if len(qs) != 4 or len(ks) != 4 or ks != vs:
        raise ValueError(
            "grouped_query_attention: expected q (batch, H, T, head_dim) and k, v of one shape "
            f"(batch, H_kv, S, head_dim), got q {qs}, k {ks}, v {vs}"
        )
    if ks[0] != qs[0] or ks[3] != qs[3] or ks[1] < 1 or qs[1] % ks[1] or ks[2] < qs[2]:
        raise ValueError(
            f"grouped_query_attention: k and v {ks} do not fit q {qs}: batch and head_dim must "
            "match, H_kv must divide H, and S >= T"
        )
    return GroupedQueryAttentionFn.apply(as_tensor(q), as_tensor(k), as_tensor(v))
