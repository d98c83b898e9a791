"""torch.optim.Adam, AdamW and SGD are the twins of loralab.optim's: same updates on the same gradients."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loralab import nn, optim  # noqa: E402

pytestmark = pytest.mark.torch

CASES = [
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.3}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.5, "weight_decay": 0.01}),
    ("SGD", {}),
]


def _run(name, options, lr, torch_lr, seed=0):
    """Eight steps of loralab's and torch's optimizer on the same gradients: (numpy, torch) params."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,), (2, 2)]
    np_params = [nn.Parameter(rng.normal(size=s)) for s in shapes]
    t_params = [torch.nn.Parameter(torch.tensor(p.data)) for p in np_params]
    np_opt = getattr(optim, name)(np_params, lr=lr, **options)
    t_opt = getattr(torch.optim, name)(t_params, lr=torch_lr, **options)
    for _ in range(8):
        for p, t in zip(np_params, t_params, strict=True):
            g = rng.normal(size=p.shape) * rng.uniform(0.01, 10)
            p.grad, t.grad = g.copy(), torch.tensor(g)
        np_opt.step()
        t_opt.step()
    return [p.data for p in np_params], [t.detach().numpy() for t in t_params]


def _assert_same(np_values, torch_values):
    for p, t in zip(np_values, torch_values, strict=True):
        np.testing.assert_allclose(t, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_same_parameters_after_several_steps(name, options):
    _assert_same(*_run(name, options, lr=0.05, torch_lr=0.05))


@pytest.mark.parametrize(("name", "options"), CASES)
def test_the_comparison_can_fail(name, options):
    """The same eight steps with torch's lr off by 1%: the comparison above must notice."""
    with pytest.raises(AssertionError):
        _assert_same(*_run(name, options, lr=0.05, torch_lr=0.0505))
