"""loralab.optim: updates written out from the formulas, and against torch.optim."""

import math

import numpy as np
import pytest

from loralab import Tensor
from loralab.optim import SGD, Adam, AdamW


def params_and_grads(seed=0, steps=5):
    g = np.random.default_rng(seed)
    p = Tensor(g.standard_normal((3, 4)), requires_grad=True)
    return p, [g.standard_normal((3, 4)) for _ in range(steps)]


def run(opt_cls, p, grads, **kw):
    opt = opt_cls([p], **kw)
    for grad in grads:
        p.grad = grad
        opt.step()
    return p.data


def adam_by_formula(p0, grads, lr, b1, b2, eps, wd, decoupled):
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_the_formulas(wd):
    p, grads = params_and_grads(0)
    p0 = p.data.copy()
    got = run(Adam, p, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    expected = adam_by_formula(p0, grads, 0.01, 0.8, 0.95, 1e-6, wd, decoupled=False)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_adamw_matches_the_formulas():
    p, grads = params_and_grads(1)
    p0 = p.data.copy()
    got = run(AdamW, p, grads, lr=0.01, weight_decay=0.3)
    expected = adam_by_formula(p0, grads, 0.01, 0.9, 0.999, 1e-8, 0.3, decoupled=True)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_sgd_with_momentum_matches_the_formulas():
    p, grads = params_and_grads(2)
    expected, buf = p.data.copy(), None
    for g in grads:
        g = g + 0.01 * expected
        buf = g if buf is None else 0.9 * buf + g
        expected = expected - 0.1 * buf
    got = run(SGD, p, grads, lr=0.1, momentum=0.9, weight_decay=0.01)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_first_adam_step_moves_each_weight_by_lr():
    """With bias correction, step 1 is lr * g / (|g| + eps): every weight moves by about lr."""
    p, grads = params_and_grads(3, steps=1)
    p0 = p.data.copy()
    run(Adam, p, grads, lr=0.5)
    np.testing.assert_allclose(np.abs(p.data - p0), 0.5, rtol=1e-6)


def test_state_only_for_updated_parameters_and_groups_have_their_own_lr():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    frozen = Tensor(np.ones(3), requires_grad=False)
    opt = Adam([{"params": [a]}, {"params": [b, frozen], "lr": 0.1}], lr=0.01)
    for t in (a, b, frozen):
        t.grad = np.ones(3)
    opt.step()
    assert set(opt.state) == {id(a), id(b)}
    np.testing.assert_allclose(1 - a.data, 0.01, rtol=1e-6)
    np.testing.assert_allclose(1 - b.data, 0.1, rtol=1e-6)
    np.testing.assert_array_equal(frozen.data, 1.0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_optimizer_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([])
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        SGD([Tensor(np.ones(1), requires_grad=True)], lr=-1)
    with pytest.raises(TypeError, match="expected Tensors, got ndarray"):
        SGD([np.ones(2)], lr=0.1)
    with pytest.raises(ValueError, match=r"betas must be in \[0, 1\)"):
        Adam([Tensor(np.ones(1), requires_grad=True)], betas=(1.0, 0.9))


@pytest.mark.parametrize(
    ("ours", "theirs", "kw"),
    [
        ("Adam", "Adam", {"lr": 0.01, "weight_decay": 0.05}),
        ("AdamW", "AdamW", {"lr": 0.01, "weight_decay": 0.05}),
        ("SGD", "SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    ],
)
def test_same_trajectory_as_torch_optim(ours, theirs, kw):
    torch = pytest.importorskip("torch")
    import loralab.optim as lo

    p, grads = params_and_grads(4, steps=20)
    tp = torch.tensor(p.data.copy(), requires_grad=True)
    topt = getattr(torch.optim, theirs)([tp], **kw)
    for g in grads:
        tp.grad = torch.tensor(g)
        topt.step()
    got = run(getattr(lo, ours), p, grads, **kw)
    scale = np.abs(got).max()
    assert np.abs(got - tp.detach().numpy()).max() <= 1e-13 * max(scale, 1.0) * math.sqrt(20)
