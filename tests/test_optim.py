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
    with pytest.raises(
        TypeError, match="can only optimize Tensors, but one of the params is ndarray"
    ):
        SGD([np.ones(2)], lr=0.1)


def one_param():
    return [Tensor(np.ones(1), requires_grad=True)]


NAN, INF = float("nan"), float("inf")
# (optimizer, options, PyTorch's message). Stricter than torch: no infinite lr, no NaN lr in SGD.
BAD_OPTIONS = [
    ("Adam", {"lr": NAN}, "Invalid learning rate: nan"),
    ("SGD", {"lr": -0.1}, "Invalid learning rate: -0.1"),
    ("Adam", {"lr": -1e-3}, "Invalid learning rate: -0.001"),
    ("Adam", {"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
    ("AdamW", {"eps": NAN}, "Invalid epsilon value: nan"),
    ("Adam", {"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ("AdamW", {"weight_decay": NAN}, "Invalid weight_decay value: nan"),
    ("SGD", {"lr": 0.1, "weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
    ("SGD", {"lr": 0.1, "momentum": -0.5}, "Invalid momentum value: -0.5"),
    ("Adam", {"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0: 1.0"),
    ("Adam", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ("AdamW", {"betas": (NAN, 0.9)}, "Invalid beta parameter at index 0: nan"),
]


@pytest.mark.parametrize(("name", "options", "message"), BAD_OPTIONS)
def test_optimizers_refuse_what_torch_refuses_in_its_words(name, options, message):
    import loralab.optim as lo

    with pytest.raises(ValueError, match=f"^{name}: {message}"):
        getattr(lo, name)(one_param(), **options)


@pytest.mark.torch
@pytest.mark.parametrize(("name", "options", "message"), BAD_OPTIONS)
def test_torch_refuses_the_same_options_in_the_same_words(name, options, message):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=f"^{message}$"):
        getattr(torch.optim, name)([torch.ones(1, requires_grad=True)], **options)


@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        ("SGD", {"lr": INF}, ValueError, "Invalid learning rate: inf"),
        ("SGD", {"lr": NAN}, ValueError, "Invalid learning rate: nan"),
        ("Adam", {"lr": INF}, ValueError, "Invalid learning rate: inf"),
        ("SGD", {"lr": 0.1, "momentum": INF}, ValueError, "Invalid momentum value: inf"),
        (
            "Adam",
            {"betas": (0.9,)},
            ValueError,
            r"betas must be two numbers in \[0, 1\), got \(0.9,\)",
        ),
        ("Adam", {"betas": (0.9, 0.99, 0.1)}, ValueError, "betas must be two numbers"),
        ("Adam", {"betas": 0.9}, TypeError, "betas must be two numbers"),
        (
            "Adam",
            {"betas": ("0.9", 0.99)},
            TypeError,
            "beta parameter at index 0 must be a real number",
        ),
        ("SGD", {"lr": "0.1"}, TypeError, "lr must be a real number, got '0.1'"),
        ("Adam", {"lr": True}, TypeError, "lr must be a real number, got True"),
        ("Adam", {"eps": None}, TypeError, "eps must be a real number, got None"),
    ],
)
def test_optimizers_refuse_other_bad_options(name, options, error, match):
    import loralab.optim as lo

    with pytest.raises(error, match=match):
        getattr(lo, name)(one_param(), **options)


def test_parameter_groups_are_checked_like_the_defaults():
    p, q = one_param()[0], one_param()[0]
    with pytest.raises(
        ValueError, match=r"Adam: parameter group 1 has no 'params' \(keys: \['lr'\]\)"
    ):
        Adam([{"params": [p]}, {"lr": 0.1}])
    with pytest.raises(ValueError, match="Adam: Invalid learning rate: -1 in parameter group 1"):
        Adam([{"params": [p]}, {"params": [q], "lr": -1}])
    with pytest.raises(
        ValueError, match="Invalid beta parameter at index 1: 1.5 in parameter group 0"
    ):
        Adam([{"params": [p], "betas": (0.9, 1.5)}])
    with pytest.raises(TypeError, match="SGD: param_group must be a dict, but got Tensor"):
        SGD([{"params": [p]}, q], lr=0.1)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="Adam: a parameter appears twice in parameter group 0"):
        Adam([p, q, p])
    with pytest.raises(
        TypeError, match="should be an iterable of Tensors or dicts, but got Tensor"
    ):
        SGD(p, lr=0.1)
    with pytest.raises(TypeError, match="ordered collections"):
        SGD({p, q}, lr=0.1)


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
