"""The grouped op on a batch sorted once (`group_batch`, `mixed_batch`'s routing): the same rows
as sorting in every layer, for every rank mix, empty adapters, tokens per row and gradients."""

import numpy as np
import pytest
from builders import nonzero_B

from loralab import gradcheck, nn
from loralab.lora import adapter_order, inject_lora, lora_layers, mixed_batch
from loralab.lora import grouped as G
from loralab.lora.engine_functions import GroupedLoRAFn, GroupedLoRALinearFn
from loralab.lora.linear_shared import route_rows
from loralab.tensor import Tensor


def _problem(rng, n_rows, tokens, d_in, d_out, ranks, scalings=None):
    x = rng.normal(size=(n_rows, tokens, d_in))
    As = [rng.normal(size=(r, d_in)) for r in ranks]
    Bs = [rng.normal(size=(d_out, r)) for r in ranks]
    if scalings is None:
        scalings = list(rng.uniform(0.5, 4.0, size=len(ranks)))
    return x, As, Bs, scalings


def _each_row(x, g, As, Bs, scalings, d_out):
    """The reference: row i (every token of it) through adapter g[i] alone."""
    want = np.zeros(x.shape[:-1] + (d_out,))
    for i, k in enumerate(g):
        if k >= 0:
            want[i] = scalings[k] * (x[i] @ As[k].T) @ Bs[k].T
    return want


@pytest.mark.parametrize(
    "ranks, same_scaling",
    [([3, 3, 3], True), ([3, 3, 3], False), ([1, 4, 2], False), ([2, 5], True)],
)
def test_rows_sorted_once_give_the_rows_alone(ranks, same_scaling):
    """Equal ranks and scalings take the one-buffer path; other mixes the per-adapter one."""
    rng = np.random.default_rng(len(ranks) + 10 * same_scaling)
    x, As, Bs, s = _problem(rng, 9, 2, 5, 4, ranks, [1.5] * len(ranks) if same_scaling else None)
    g = rng.integers(-1, len(ranks), size=9)
    groups = G.group_batch(g, len(ranks))
    y, _ = G.grouped_lora_forward(x, groups, As, Bs, s)
    np.testing.assert_allclose(y, _each_row(x, g, As, Bs, s, 4), rtol=1e-12, atol=1e-12)


def test_an_adapter_with_no_rows_gets_zero_gradients():
    rng = np.random.default_rng(1)
    x, As, Bs, s = _problem(rng, 6, 3, 4, 5, [2, 3, 2])
    g = np.array([0, 2, -1, 0, 2, 2])  # adapter 1: no row
    groups = G.group_batch(g, 3)
    assert groups.segments[1][0] == groups.segments[1][1]
    y, cache = G.grouped_lora_forward(x, groups, As, Bs, s)
    np.testing.assert_allclose(y, _each_row(x, g, As, Bs, s, 5), rtol=1e-12, atol=1e-12)
    dx, dAs, dBs = G.grouped_lora_backward(rng.normal(size=y.shape), cache)
    assert dAs[1].shape == (3, 4) and not dAs[1].any() and not dBs[1].any()
    assert not dx[2].any()  # the base-only row


def test_a_batch_with_no_adapter_rows_at_all():
    rng = np.random.default_rng(2)
    x, As, Bs, s = _problem(rng, 3, 1, 4, 2, [2])
    y, cache = G.grouped_lora_forward(x, G.group_batch(np.full(3, -1), 1), As, Bs, s)
    assert y.shape == (3, 1, 2) and not y.any()
    dx, dAs, _ = G.grouped_lora_backward(np.ones((3, 1, 2)), cache)
    assert not dx.any() and not dAs[0].any()


def test_rows_already_grouped_need_no_gather():
    g = np.array([-1, 0, 0, 1, 1, 1])
    groups = G.group_batch(g, 2)
    assert groups.identity and groups.segments == [(1, 3), (3, 6)]
    x = np.arange(12.0).reshape(6, 2)
    assert G._sorted(x, groups) is x  # a view of the batch itself, no copy
    assert not G.group_batch(np.array([1, 0]), 2).identity


@pytest.mark.parametrize("n_rows", [3, 40])  # long segments (chunked in place), short (one buffer)
def test_the_fused_linear_forward_equals_the_unfused_one(n_rows, monkeypatch):
    monkeypatch.setattr(G, "CHUNK_ROWS", 4)  # several chunks per segment, with a ragged last one
    rng = np.random.default_rng(n_rows)
    x, As, Bs, s = _problem(rng, n_rows, 2, 6, 5, [2, 2, 3])
    W0, b = rng.normal(size=(5, 6)), rng.normal(size=5)
    g = rng.integers(-1, 3, size=n_rows)
    groups = G.group_batch(g, 3)
    h, _ = G.grouped_lora_linear_forward(x, W0, b, groups, As, Bs, s)
    want = x @ W0.T + b + _each_row(x, g, As, Bs, s, 5)
    np.testing.assert_allclose(h, want, rtol=1e-12, atol=1e-12)


def test_a_layer_holding_some_of_the_batch_adapters_selects_their_segments():
    rng = np.random.default_rng(3)
    x, As, Bs, s = _problem(rng, 7, 1, 4, 3, [2, 1, 3])
    g = np.array([2, 0, 1, -1, 2, 1, 0])
    groups = G.group_batch(g, 3)
    y, _ = G.grouped_lora_forward(
        x, groups.select([2, 0]), [As[2], As[0]], [Bs[2], Bs[0]], s[::2][::-1]
    )
    g_layer = np.where(g == 1, -1, g)  # adapter 1's rows: this layer gives them the base alone
    np.testing.assert_allclose(y, _each_row(x, g_layer, As, Bs, s, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_the_functions_on_sorted_rows_pass_gradcheck(fused):
    rng = np.random.default_rng(4)
    ranks, d_in, d_out = [2, 3, 1], 4, 3
    x = Tensor(rng.normal(size=(6, 2, d_in)), requires_grad=True)  # (batch, tokens, in)
    W0 = Tensor(rng.normal(size=(d_out, d_in)), requires_grad=True)
    b = Tensor(rng.normal(size=(d_out,)), requires_grad=True)
    As = [Tensor(rng.normal(size=(r, d_in)), requires_grad=True) for r in ranks]
    Bs = [Tensor(rng.normal(size=(d_out, r)), requires_grad=True) for r in ranks]
    groups = G.group_batch(np.array([2, 0, -1, 2, 1, 0]), 3)
    scalings = [0.5, 2.0, 1.5]

    def fn(x, W0, b, *AB):
        if fused:
            return GroupedLoRALinearFn.apply(x, W0, b, *AB, index=groups, scalings=scalings)
        return GroupedLoRAFn.apply(x, *AB, index=groups, scalings=scalings)

    assert gradcheck(fn, x, W0, b, *As, *Bs)


def test_sorting_once_equals_sorting_in_every_layer():
    """The Functions give the same output and gradients from the batch's RowGroups as from a
    per-token index array (sorted again inside each call)."""
    rng = np.random.default_rng(5)
    x, As, Bs, s = _problem(rng, 8, 3, 5, 4, [2, 2])
    W0, b = rng.normal(size=(4, 5)), rng.normal(size=4)
    g = np.array([1, 0, -1, 1, 1, 0, -1, 0])
    per_token = np.broadcast_to(g[:, None], (8, 3))
    dy = rng.normal(size=(8, 3, 4))
    outs = []
    for index in (G.group_batch(g, 2), per_token):
        xt = Tensor(x.copy(), requires_grad=True)
        AB = [Tensor(a.copy(), requires_grad=True) for a in As + Bs]
        y = GroupedLoRALinearFn.apply(xt, W0, b, *AB, index=index, scalings=s)
        (y * Tensor(dy)).sum().backward()
        outs.append([y.data, xt.grad, *(t.grad for t in AB)])
    for got, want in zip(*outs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _model():
    """An MLP with adapters of ranks 1, 2, 3 and 5 (their own alphas), B nonzero."""
    model = nn.MLP([6, 12, 10, 7], seed=0, dtype=np.float64)
    for i, r in enumerate([1, 2, 3, 5]):
        inject_lora(model, ["0", "2", "4"], r=r, alpha=3 * r, seed=i, adapter_name=f"r{r}")
    return nonzero_B(model, seed=9).eval()


NAMES = ["r3", "r1", "__base__", "r5", "r3", "r2", "r1", "r5", "r2"]


def test_the_model_routes_by_one_sort_shared_by_every_layer():
    model = _model()
    x = np.random.default_rng(6).normal(size=(len(NAMES), 2, 6))
    with mixed_batch(model, NAMES):
        routings = {id(layer.mixed_routing) for _, layer in lora_layers(model)}
        y = model(x).data
        for _, layer in lora_layers(model):  # without the shared routing: each layer sorts
            layer.mixed_routing = None
        y_per_layer = model(x).data
    assert len(routings) == 1
    np.testing.assert_allclose(y, y_per_layer, rtol=1e-12, atol=1e-12)
    assert all(layer.mixed_routing is None for _, layer in lora_layers(model))


def test_adapter_order_groups_the_batch_before_the_model():
    model = _model()
    x = np.random.default_rng(7).normal(size=(len(NAMES), 6))
    order, inverse = adapter_order(NAMES)
    grouped = [NAMES[i] for i in order]
    assert grouped == sorted(grouped, key=lambda n: "" if n == "__base__" else n)
    assert route_rows(grouped).groups.identity
    with mixed_batch(model, NAMES):
        y = model(x).data
    with mixed_batch(model, grouped):
        y_grouped = model(x[order]).data[inverse]
    np.testing.assert_allclose(y_grouped, y, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="adapter_order: adapter_names must be a list of str"):
        adapter_order("r1")


def test_the_torch_twin_on_sorted_rows_equals_autograd():
    torch = pytest.importorskip("torch")
    from loralab.torch.grouped import GroupedLoRAFunction, grouped_lora_autograd

    rng = np.random.default_rng(8)
    g = np.array([1, -1, 0, 1, 2, 0])
    groups = G.group_batch(g, 3)
    x = torch.tensor(rng.normal(size=(6, 2, 4)), requires_grad=True)
    As = [torch.tensor(rng.normal(size=(r, 4)), requires_grad=True) for r in (2, 3, 2)]
    Bs = [torch.tensor(rng.normal(size=(5, r)), requires_grad=True) for r in (2, 3, 2)]
    s = [0.5, 2.0, 1.5]
    c = torch.tensor(rng.normal(size=(6, 2, 5)))
    y = GroupedLoRAFunction.apply(x, groups, s, *As, *Bs)
    grads = torch.autograd.grad((y * c).sum(), [x, *As, *Bs])
    index = torch.tensor(np.broadcast_to(g[:, None], (6, 2)).copy())
    y_ref = grouped_lora_autograd(x, index, As, Bs, s)
    grads_ref = torch.autograd.grad((y_ref * c).sum(), [x, *As, *Bs])
    np.testing.assert_allclose(y.detach().numpy(), y_ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
