"""Tests for loralab.models.adapt: LoRA on the shipped GPT, and the paper's Section 7 measurements."""

import numpy as np
import pytest

from loralab.lora import count_parameters, lora_layers
from loralab.models import load_gpt
from loralab.models.adapt import adapt, delta_w_vs_w, subspace_similarity

TINY = dict(r=2, steps=3, batch_size=2, context=8, val_tokens=256)


def test_a_short_run_trains_only_the_adapters_and_is_seeded():
    result = adapt(["q", "v"], **TINY, seed=1)
    layers = lora_layers(result.model)
    assert [name.rsplit(".", 1)[-1] for name, _ in layers] == ["q", "v"] * 2
    assert result.trainable == count_parameters(result.model)[0] == 4 * 2 * (64 + 64)
    assert len(result.losses) == 3 and np.isfinite(result.val_loss)
    assert result.seconds_per_step > 0
    again = adapt(["q", "v"], **TINY, seed=1)
    assert again.losses == result.losses and again.val_loss == result.val_loss


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"steps": 0}, ValueError, "adapt: steps must be a positive integer, got 0"),
        ({"batch_size": 2.0}, TypeError, "adapt: batch_size must be a positive integer, got 2.0"),
        ({"context": 65}, ValueError, "adapt: context=65 exceeds the model's context_length=64"),
        ({"context": "8"}, TypeError, "adapt: context must be a positive integer"),
        ({"lr": -1.0}, ValueError, "adapt: lr must be a positive number, got lr=-1.0"),
        ({"val_tokens": 0}, ValueError, "adapt: val_tokens must be a positive integer, got 0"),
        ({"corpus": "hamlet"}, ValueError, "load_corpus: name must be one of"),
    ],
)
def test_a_refused_call_leaves_the_base_unchanged(options, error, match):
    base = load_gpt()
    before = {k: v.copy() for k, v in base.state_dict().items()}
    with pytest.raises(error, match=match):
        adapt(["q", "v"], **{**TINY, **options, "base": base})
    assert lora_layers(base) == []
    after = base.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_subspace_similarity_is_one_for_the_same_span_and_zero_for_orthogonal_ones():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 10))
    phi = subspace_similarity(A, A)
    assert phi.shape == (4, 4)
    np.testing.assert_allclose(np.diag(phi), 1.0, rtol=1e-12)
    np.testing.assert_allclose(phi[-1], 1.0, rtol=1e-12)  # all 4 directions hold every top-j
    Q = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    np.testing.assert_allclose(subspace_similarity(Q[:3], Q[3:5]), 0.0, atol=1e-12)


def test_delta_w_vs_w_projects_w_on_each_matrix_s_top_directions():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6))
    out = delta_w_vs_w(W, W, 2, rng)
    assert out["delta_w"] == pytest.approx(out["w"], rel=1e-12)
    s = np.linalg.svd(W, compute_uv=False)
    assert out["w"] == pytest.approx(np.sqrt((s[:2] ** 2).sum()), rel=1e-12)
    assert out["norm_w"] == pytest.approx(np.linalg.norm(W)) == out["norm_delta"]
    # ||ΔW||_F over its projection on its own top-2 directions, from the SVD computed here
    expected = np.linalg.norm(W) / np.sqrt((s[:2] ** 2).sum())
    assert out["amplification"] == pytest.approx(expected, rel=1e-12)
