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


@pytest.mark.parametrize(("name", "options"), CASES)
def test_same_parameters_after_several_steps(name, options):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 2)]
    np_params = [nn.Parameter(rng.normal(size=s)) for s in shapes]
    t_params = [torch.nn.Parameter(torch.tensor(p.data)) for p in np_params]
    np_opt = getattr(optim, name)(np_params, lr=0.05, **options)
    t_opt = getattr(torch.optim, name)(t_params, lr=0.05, **options)
    for _ in range(8):
        for p, t in zip(np_params, t_params, strict=True):
            g = rng.normal(size=p.shape) * rng.uniform(0.01, 10)
            p.grad, t.grad = g.copy(), torch.tensor(g)
        np_opt.step()
        t_opt.step()
    for p, t in zip(np_params, t_params, strict=True):
        np.testing.assert_allclose(t.detach().numpy(), p.data, rtol=1e-12, atol=1e-14)
    # the comparison can fail: a different learning rate is caught
    other = [torch.nn.Parameter(torch.tensor(p.data)) for p in np_params]
    other_opt = getattr(torch.optim, name)(other, lr=0.06, **options)
    for t in other:
        t.grad = torch.ones_like(t)
    other_opt.step()
    assert not np.allclose(other[0].detach().numpy(), np_params[0].data, rtol=1e-12, atol=1e-14)
