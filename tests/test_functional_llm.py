"""LLaMA's ops (loralab/functional_llm.py): gradchecks in float64 on random shapes with batch dims,
and the same values and gradients as PyTorch's autograd (and HF's rotate_half) in float64.

The gradchecks run without torch; the comparisons skip when torch is missing.
"""

import numpy as np
import pytest

from loralab import Tensor, gradcheck
from loralab import functional as F
from loralab.functional_llm import RotaryFn


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def rand_shape(rng, n_batch, last):
    return tuple(int(s) for s in rng.integers(1, 4, n_batch)) + tuple(last)


def leaf(rng, shape, scale=1.0):
    return Tensor(rng.standard_normal(shape) * scale, requires_grad=True)


# ----- gradchecks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_rms_norm_gradcheck(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 7))
    x, w = leaf(rng, rand_shape(rng, seed + 1, (d,))), leaf(rng, (d,))
    assert gradcheck(lambda x, w: F.rms_norm(x, w, 1e-3), x, w)


@pytest.mark.parametrize("seed", range(3))
def test_rotary_gradcheck(seed):
    rng = np.random.default_rng(seed)
    T, hd = int(rng.integers(1, 5)), 2 * int(rng.integers(1, 4))
    cos, sin = F.rope_tables(T, hd, 100.0, start=int(rng.integers(0, 9)))
    x = leaf(rng, rand_shape(rng, 2, (T, hd)))
    assert gradcheck(lambda x: F.rotary(x, cos, sin), x)


@pytest.mark.parametrize("seed", range(3))
def test_silu_and_swiglu_gradcheck(seed):
    rng = np.random.default_rng(seed)
    shape = rand_shape(rng, 2, (int(rng.integers(1, 6)),))
    gate, up = leaf(rng, shape, 3.0), leaf(rng, shape)
    assert gradcheck(F.silu, gate)
    assert gradcheck(F.swiglu, gate, up)


@pytest.mark.parametrize(
    "H, H_kv, T, S", [(6, 2, 3, 3), (4, 4, 4, 4), (3, 1, 2, 2), (4, 2, 2, 5), (2, 1, 1, 4)]
)
def test_grouped_query_attention_gradcheck(H, H_kv, T, S):
    """Shared key/value heads (H_kv < H), plain multi-head (H_kv = H), multi-query (H_kv = 1), and
    keys longer than queries (S > T, as with a cache: query t at position S - T + t)."""
    rng = np.random.default_rng(H * 100 + S)
    B, hd = int(rng.integers(1, 3)), 4
    q, k, v = leaf(rng, (B, H, T, hd)), leaf(rng, (B, H_kv, S, hd)), leaf(rng, (B, H_kv, S, hd))
    assert gradcheck(F.grouped_query_attention, q, k, v)


def test_a_planted_bug_in_the_rotary_backward_fails_the_gradcheck(monkeypatch):
    """The gradcheck can fail: forgetting that rotate_half^T = -rotate_half (a common slip)."""
    rng = np.random.default_rng(0)
    cos, sin = F.rope_tables(3, 4, 10.0, start=1)
    x = leaf(rng, (2, 3, 4))

    def wrong(ctx, grad):
        cos, sin = ctx.saved
        return grad * cos + F.rotate_half(grad * sin), None, None

    monkeypatch.setattr(RotaryFn, "backward", staticmethod(wrong))
    with pytest.raises(AssertionError, match="gradient of input 0"):
        gradcheck(lambda x: F.rotary(x, cos, sin), x)


# ----- the math, without torch --------------------------------------------------------------------
def test_rotary_turns_pairs_i_and_i_plus_half_and_attention_sees_relative_positions():
    rng = np.random.default_rng(1)
    hd, theta = 8, 50.0
    q, k = rng.standard_normal(hd), rng.standard_normal(hd)

    def rot(x, m):
        cos, sin = F.rope_tables(1, hd, theta, start=m)
        return F.rotary(x[None], cos, sin).data[0]

    y = rot(q, 3)
    omega = F.rope_inv_freq(hd, theta)
    half = hd // 2
    for i in range(half):  # pair (i, i + hd/2) turned by the angle 3 omega_i
        c, s = np.cos(3 * omega[i]), np.sin(3 * omega[i])
        np.testing.assert_allclose(
            [y[i], y[i + half]], [q[i] * c - q[i + half] * s, q[i + half] * c + q[i] * s]
        )
    np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(q))  # a rotation
    # q_m . k_n depends on m - n only
    np.testing.assert_allclose(rot(q, 7) @ rot(k, 2), rot(q, 15) @ rot(k, 10), rtol=1e-12)


def test_rotate_half_equals_the_interleaved_form_after_permuting_each_heads_coordinates():
    """Meta's original code rotates neighbours (2i, 2i+1) as complex numbers; HF's rotate_half the
    halves (i, i + d/2). Permuting coordinates (what HF's conversion does to Wq, Wk) maps one onto
    the other."""
    rng = np.random.default_rng(2)
    T, hd = 5, 8
    x = rng.standard_normal((T, hd))
    omega = F.rope_inv_freq(hd, 10000.0)
    angles = np.arange(T)[:, None] * omega
    interleaved = x[:, 0::2] + 1j * x[:, 1::2]  # pair (2i, 2i+1) as one complex number
    turned = interleaved * np.exp(1j * angles)
    expected = np.empty_like(x)
    expected[:, 0::2], expected[:, 1::2] = turned.real, turned.imag
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])  # (0,2,4,6,1,3,5,7)
    cos, sin = F.rope_tables(T, hd, 10000.0)
    got = F.rotary(x[:, perm], cos, sin).data
    np.testing.assert_allclose(got, expected[:, perm], rtol=1e-12, atol=1e-15)
    assert not np.allclose(F.rotary(x, cos, sin).data, expected)  # without the permutation: wrong


def test_grouped_attention_equals_multi_head_attention_with_repeated_kv_heads():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 6, 4, 8))
    k, v = rng.standard_normal((2, 2, 4, 8)), rng.standard_normal((2, 2, 4, 8))
    grouped = F.grouped_query_attention(q, k, v).data
    repeated = F.grouped_query_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)).data
    np.testing.assert_allclose(grouped, repeated, rtol=1e-13)


def test_attention_with_a_longer_key_prefix_equals_the_last_rows_of_the_full_one():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 4, 6, 8))
    k, v = rng.standard_normal((1, 2, 6, 8)), rng.standard_normal((1, 2, 6, 8))
    full = F.grouped_query_attention(q, k, v).data
    tail = F.grouped_query_attention(q[:, :, 4:], k, v).data
    np.testing.assert_allclose(tail, full[:, :, 4:], rtol=1e-13)


def test_silu_does_not_overflow_for_large_inputs():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise"):
        y = F.silu(x).data
    np.testing.assert_allclose(y, [0.0, -50.0 / (1 + np.exp(50.0)), 0.0, 50.0, 1000.0])


def test_llama3_frequencies_keep_short_wavelengths_and_stretch_long_ones():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    plain = F.rope_inv_freq(32, 500000.0)
    scaled = F.rope_inv_freq(32, 500000.0, scaling)
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelen < 16], plain[wavelen < 16])
    np.testing.assert_allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8)
    middle = (wavelen >= 16) & (wavelen <= 64)
    assert middle.any() and np.all(
        (scaled[middle] <= plain[middle]) & (scaled[middle] >= plain[middle] / 8)
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.rms_norm(np.ones((2, 4)), np.ones(3)), "rms_norm: expected weight of shape"),
        (lambda: F.rms_norm(np.ones((2, 4)), np.ones(4), eps=-1.0), "eps must be"),
        (lambda: F.rotary(np.ones((2, 3, 5)), np.ones((3, 5)), np.ones((3, 5))), "head_dim even"),
        (lambda: F.rotary(np.ones((2, 3, 4)), np.ones((2, 4)), np.ones((2, 4))), r"shape \(3, 4\)"),
        (lambda: F.swiglu(np.ones((2, 3)), np.ones((2, 4))), "swiglu: expected gate and up"),
        (lambda: F.rope_tables(4, 5), "head_dim must be a positive even"),
        (lambda: F.rope_inv_freq(8, 1e4, {"rope_type": "yarn"}), "'yarn' is not implemented"),
        (
            lambda: F.grouped_query_attention(np.ones((1, 3, 2, 4)), *[np.ones((1, 2, 2, 4))] * 2),
            "H_kv must divide H",
        ),
        (
            lambda: F.grouped_query_attention(np.ones((1, 2, 3, 4)), *[np.ones((1, 2, 2, 4))] * 2),
            "S >= T",
        ),
    ],
)
def test_bad_inputs_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----- against PyTorch (float64) ------------------------------------------------------------------
def compare_with_torch(torch, ours, theirs, *arrays, rtol=1e-12):
    """Same output and same gradients (for a random upstream gradient) as torch's autograd."""
    rng = np.random.default_rng(0)
    xs = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = ours(*xs), theirs(*ts)
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=rtol, atol=1e-13)
    c = rng.standard_normal(out.shape)
    (out * c).sum().backward()
    (ref * torch.tensor(c)).sum().backward()
    for i, (x, t) in enumerate(zip(xs, ts)):
        np.testing.assert_allclose(
            x.grad, t.grad.numpy(), rtol=rtol, atol=1e-13, err_msg=f"input {i}"
        )


def test_rms_norm_matches_torch(torch):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 3, 16)), rng.standard_normal(16)

    def theirs(x, w):  # HF's LlamaRMSNorm, without its cast to float32
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    compare_with_torch(torch, lambda x, w: F.rms_norm(x, w, 1e-5), theirs, x, w)
    if hasattr(torch.nn.functional, "rms_norm"):  # torch >= 2.4 has it built in
        ref = torch.nn.functional.rms_norm(torch.tensor(x), (16,), torch.tensor(w), eps=1e-5)
        np.testing.assert_allclose(F.rms_norm(x, w, 1e-5).data, ref.numpy(), rtol=1e-12)


def test_rotary_matches_hf_apply_rotary_pos_emb(torch):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    rng = np.random.default_rng(6)
    B, H, T, hd = 2, 3, 5, 8
    cos, sin = F.rope_tables(T, hd, 10000.0, start=4)
    q, k = rng.standard_normal((B, H, T, hd)), rng.standard_normal((B, 1, T, hd))
    tc, ts = torch.tensor(cos)[None], torch.tensor(sin)[None]  # HF's (batch, T, hd)

    def theirs_q(x):
        return modeling.apply_rotary_pos_emb(x, x, tc, ts)[0]

    compare_with_torch(torch, lambda x: F.rotary(x, cos, sin), theirs_q, q)
    compare_with_torch(torch, lambda x: F.rotary(x, cos, sin), theirs_q, k)


def test_rope_frequencies_match_hf_default_and_llama3(torch):
    """HF computes the frequencies in float32 (loralab in float64): equal to float32 precision."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    sizes = dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=256)
    config = LlamaConfig(**sizes, rope_theta=500000.0)
    theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    np.testing.assert_allclose(F.rope_inv_freq(32, 500000.0), theirs.numpy(), rtol=1e-6)
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(**sizes, rope_scaling=scaling, rope_theta=500000.0)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    ours = F.rope_inv_freq(32, 500000.0, scaling)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert not np.allclose(ours, F.rope_inv_freq(32, 500000.0), rtol=1e-3)  # scaling changed some


def test_silu_and_swiglu_match_torch(torch):
    rng = np.random.default_rng(7)
    g, u = rng.standard_normal((2, 3, 10)) * 4, rng.standard_normal((2, 3, 10))
    compare_with_torch(torch, F.silu, torch.nn.functional.silu, g)
    compare_with_torch(torch, F.swiglu, lambda g, u: torch.nn.functional.silu(g) * u, g, u)


@pytest.mark.parametrize("H, H_kv, T, S", [(6, 2, 5, 5), (4, 1, 3, 7), (4, 4, 4, 4)])
def test_grouped_query_attention_matches_torch(torch, H, H_kv, T, S):
    """Against HF's recipe: repeat_kv (each kv head copied for its g query heads), then attention."""
    rng = np.random.default_rng(8)
    hd = 8
    q, k, v = (rng.standard_normal((2, n, L, hd)) for n, L in ((H, T), (H_kv, S), (H_kv, S)))

    def theirs(q, k, v):
        k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
        scores = q @ k.transpose(-1, -2) / hd**0.5
        future = torch.ones(T, S, dtype=torch.bool).triu(S - T + 1)
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v

    compare_with_torch(torch, F.grouped_query_attention, theirs, q, k, v)
