"""The grouped LoRA op (mixed-batch serving): equal to each row alone, gradients by hand = numeric."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import numerical_grad
from loralab.lora.grouped import group_rows, grouped_lora_backward, grouped_lora_forward


def _problem(rng, batch_shape, d_in, d_out, ranks):
    x = rng.normal(size=batch_shape + (d_in,))
    As = [rng.normal(size=(r, d_in)) for r in ranks]
    Bs = [rng.normal(size=(d_out, r)) for r in ranks]  # nonzero B: dA is not trivially zero
    scalings = list(rng.uniform(0.5, 4.0, size=len(ranks)))
    g = rng.integers(-1, len(ranks), size=batch_shape)
    return x, g, As, Bs, scalings


def _loss(x, g, As, Bs, scalings, c):
    return float((grouped_lora_forward(x, g, As, Bs, scalings)[0] * c).sum())


@settings(max_examples=25, deadline=None)
@given(
    batch_shape=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_each_row_alone(batch_shape, d_in, d_out, ranks, seed):
    rng = np.random.default_rng(seed)
    x, g, As, Bs, s = _problem(rng, batch_shape, d_in, d_out, ranks)
    y, _ = grouped_lora_forward(x, g, As, Bs, s)
    assert y.shape == batch_shape + (d_out,)
    for idx in np.ndindex(*batch_shape):
        k = g[idx]
        want = np.zeros(d_out) if k < 0 else s[k] * Bs[k] @ (As[k] @ x[idx])
        np.testing.assert_allclose(y[idx], want, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    batch_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    ranks=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_backward_matches_central_differences(batch_shape, d_in, d_out, ranks, seed):
    rng = np.random.default_rng(seed)
    x, g, As, Bs, s = _problem(rng, batch_shape, d_in, d_out, ranks)
    c = rng.normal(size=batch_shape + (d_out,))
    _, cache = grouped_lora_forward(x, g, As, Bs, s)
    dx, dAs, dBs = grouped_lora_backward(c, cache)

    def numeric(array):
        return numerical_grad(lambda: _loss(x, g, As, Bs, s, c), array)

    np.testing.assert_allclose(dx, numeric(x), rtol=1e-6, atol=1e-7)
    for k in range(len(ranks)):
        np.testing.assert_allclose(dAs[k], numeric(As[k]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dBs[k], numeric(Bs[k]), rtol=1e-6, atol=1e-7)


def test_a_wrong_backward_is_caught():
    """The check has teeth: central differences accept dA and reject dA without the scaling."""
    rng = np.random.default_rng(0)
    x, g, As, Bs, s = _problem(rng, (6,), 4, 3, [2, 2])
    g[:] = [0, 0, 1, 1, 0, 1]
    c = np.ones((6, 3))
    _, cache = grouped_lora_forward(x, g, As, Bs, s)
    _, dAs, _ = grouped_lora_backward(c, cache)
    numeric = numerical_grad(lambda: _loss(x, g, As, Bs, s, c), As[0])
    wrong = dAs[0] / s[0]
    assert np.allclose(dAs[0], numeric, rtol=1e-6, atol=1e-7)
    assert not np.allclose(wrong, numeric, rtol=1e-6, atol=1e-7)


def test_unused_adapter_and_base_rows_get_zero():
    rng = np.random.default_rng(1)
    x, _, As, Bs, s = _problem(rng, (5,), 4, 3, [2, 3, 1])
    g = np.array([-1, 0, -1, 0, 2])
    y, cache = grouped_lora_forward(x, g, As, Bs, s)
    assert not y[[0, 2]].any()
    dx, dAs, dBs = grouped_lora_backward(rng.normal(size=(5, 3)), cache)
    assert not dAs[1].any() and not dBs[1].any() and dAs[1].shape == (3, 4)
    assert not dx[[0, 2]].any()
    assert grouped_lora_backward(np.ones((5, 3)), cache, need_dx=False)[0] is None


def test_group_rows_is_one_stable_partition():
    g = np.array([2, -1, 0, 2, 0, 1, -1, 2])
    groups = group_rows(g, 4)
    assert [list(r) for r in groups] == [[2, 4], [5], [0, 3, 7], []]


def test_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, g, As, Bs, s = _problem(rng, (3, 4), 5, 6, [2, 4, 3])
    c = rng.normal(size=(3, 4, 6))
    _, cache = grouped_lora_forward(x, g, As, Bs, s)
    dx, dAs, dBs = grouped_lora_backward(c, cache)
    tx = torch.tensor(x, requires_grad=True)
    tA = [torch.tensor(A, requires_grad=True) for A in As]
    tB = [torch.tensor(B, requires_grad=True) for B in Bs]
    tg = torch.tensor(g)
    y = torch.zeros(3, 4, 6, dtype=torch.float64)
    for k in range(3):
        mask = (tg == k).unsqueeze(-1).double()
        y = y + mask * (s[k] * (tx @ tA[k].T) @ tB[k].T)
    (y * torch.tensor(c)).sum().backward()
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    for k in range(3):
        np.testing.assert_allclose(dAs[k], tA[k].grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dBs[k], tB[k].grad.numpy(), rtol=1e-12, atol=1e-12)
