"""LoRA on an embedding table: forward as PEFT, hand backward = central differences = torch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import numerical_grad
from loralab.lora.embedding_ops import lora_embedding_backward, lora_embedding_forward


def _problem(rng, batch_shape, vocab, dim, r):
    ids = rng.integers(0, vocab, size=batch_shape)
    E = rng.normal(size=(vocab, dim))
    A = rng.normal(size=(r, vocab))
    B = rng.normal(size=(dim, r))  # nonzero on both sides so neither gradient is trivially zero
    return ids, E, A, B, float(rng.uniform(0.5, 3))


@settings(max_examples=20, deadline=None)
@given(
    batch_shape=st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple),
    vocab=st.integers(1, 7),
    dim=st.integers(1, 5),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_gradients_match_central_differences(batch_shape, vocab, dim, r, seed):
    rng = np.random.default_rng(seed)
    ids, E, A, B, s = _problem(rng, batch_shape, vocab, dim, r)
    c = rng.normal(size=batch_shape + (dim,))
    h, cache = lora_embedding_forward(ids, E, A, B, s)
    assert h.shape == batch_shape + (dim,)
    dA, dB = lora_embedding_backward(c, cache)

    def numeric(array):
        return numerical_grad(
            lambda: float((lora_embedding_forward(ids, E, A, B, s)[0] * c).sum()), array
        )

    np.testing.assert_allclose(dA, numeric(A), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dB, numeric(B), rtol=1e-6, atol=1e-7)


def test_forward_is_the_merged_table_and_unused_tokens_get_no_gradient():
    rng = np.random.default_rng(0)
    ids, E, A, B, s = _problem(rng, (3, 5), 10, 4, 2)
    ids[:] = rng.choice([1, 4, 4, 7], size=ids.shape)
    h, cache = lora_embedding_forward(ids, E, A, B, s)
    merged = E + s * (B @ A).T  # PEFT's get_delta_weight for embeddings: transpose(B @ A) * s
    np.testing.assert_allclose(h, merged[ids], rtol=1e-12, atol=1e-12)
    dA, _ = lora_embedding_backward(np.ones((3, 5, 4)), cache)
    unused = sorted(set(range(10)) - set(ids.ravel().tolist()))
    assert not dA[:, unused].any() and dA[:, 4].any()


def test_matches_torch_and_peft_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ids, E, A, B, s = _problem(rng, (2, 6), 9, 5, 3)
    c = rng.normal(size=(2, 6, 5))
    _, cache = lora_embedding_forward(ids, E, A, B, s)
    dA, dB = lora_embedding_backward(c, cache)
    tA = torch.tensor(A, requires_grad=True)
    tB = torch.tensor(B, requires_grad=True)
    tids = torch.tensor(ids)
    # PEFT's Embedding.forward: after_A = F.embedding(x, A.T); result += (after_A @ B.T) * s
    h = (
        torch.nn.functional.embedding(tids, torch.tensor(E))
        + (torch.nn.functional.embedding(tids, tA.T) @ tB.T) * s
    )
    (h * torch.tensor(c)).sum().backward()
    np.testing.assert_allclose(dA, tA.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dB, tB.grad.numpy(), rtol=1e-12, atol=1e-12)
