"""The grouped op on stacked adapters (`loralab.lora.stacked`): one batched product for all
adapters. The same rows as one adapter at a time (and as each row alone), for equal and unequal
segments, rows as they arrive or grouped, tokens per row, adapters a batch does not use; hand
gradients against central differences and against the per-adapter path; and the stack kept
honest when the parameters change (in place, reassigned, by an optimizer, saved and loaded)."""

import numpy as np
import pytest
from builders import nonzero_B

from loralab import gradcheck, nn, optim
from loralab.lora import grouped as G
from loralab.lora import inject_lora, load_adapter, lora_layers, mixed_batch, save_adapter
from loralab.lora import stacked as ST
from loralab.lora.engine_functions import GroupedLoRAFn, GroupedLoRALinearFn
from loralab.tensor import Tensor, no_grad


class _P:
    """A parameter-like holder: ``.data`` only (what `stack_parameters` reads and re-points)."""

    def __init__(self, data):
        self.data = data


def _stack(rng, k, r, d_in, d_out, scalings=None):
    As = [_P(rng.normal(size=(r, d_in))) for _ in range(k)]
    Bs = [_P(rng.normal(size=(d_out, r))) for _ in range(k)]
    s = list(rng.uniform(0.5, 3.0, size=k)) if scalings is None else scalings
    return As, Bs, s


def _each_row(x, g, As, Bs, s, d_out):
    """The reference: row i (every token of it) through adapter g[i] alone (-1: nothing)."""
    want = np.zeros(x.shape[:-1] + (d_out,))
    for i, k in enumerate(g):
        if k >= 0:
            want[i] = s[k] * (x[i] @ As[k].T) @ Bs[k].T
    return want


# ----- the stack ----------------------------------------------------------------------------------
def test_the_parameters_hold_views_of_the_stack_with_their_values():
    rng = np.random.default_rng(0)
    As, Bs, s = _stack(rng, 3, 2, 5, 4)
    before = [p.data.copy() for p in As + Bs]
    st = ST.stack_parameters(As, Bs, s)
    assert st.A.shape == (3, 2, 5) and st.Bt.shape == (3, 2, 4)
    for p, want in zip(As + Bs, before, strict=True):
        np.testing.assert_array_equal(p.data, want)  # the same values, now in the stack
    assert all(np.shares_memory(p.data, st.A) for p in As)
    assert all(np.shares_memory(p.data, st.Bt) for p in Bs)
    assert Bs[1].data.shape == (4, 2)  # B_k keeps its (out, r) shape: a transposed view
    assert ST.stack_parameters(As, Bs, s, st) is st  # nothing changed: nothing copied


def test_an_edit_in_place_is_seen_and_a_new_array_rebuilds_the_stack():
    rng = np.random.default_rng(1)
    As, Bs, s = _stack(rng, 4, 3, 6, 5)
    st = ST.stack_parameters(As, Bs, s)
    Bs[2].data[1, 0] = 7.0  # an optimizer's step: in place
    assert ST.stack_parameters(As, Bs, s, st) is st and st.Bt[2, 0, 1] == 7.0
    new = rng.normal(size=(3, 6))
    As[1].data = new  # a new array: the stack no longer holds A_1
    st2 = ST.stack_parameters(As, Bs, s, st)
    assert st2 is not st
    np.testing.assert_array_equal(st2.A[1], new)
    assert ST.stack_parameters(As, Bs, [1.0] * 4, st2) is not st2  # a new scaling: rebuilt


@pytest.mark.parametrize(
    "shapes",
    [[(2, 5), (3, 5)], [(2, 5), (2, 6)]],  # ranks differ; in_features differ
)
def test_adapters_that_cannot_be_stacked_give_none(shapes):
    rng = np.random.default_rng(2)
    As = [_P(rng.normal(size=s)) for s in shapes]
    Bs = [_P(rng.normal(size=(4, s[0]))) for s in shapes]
    assert ST.stack_parameters(As, Bs, [1.0, 1.0]) is None
    assert ST.stack_parameters([_P(np.ones((2, 3))), _P(np.ones((2, 3), np.float32))],
                               [_P(np.ones((4, 2)))] * 2, [1.0, 1.0]) is None  # fmt: skip


def test_the_layout_reshapes_pads_or_declines():
    lay = ST.stack_layout([(2, 5), (5, 8)], [0, 1], 2)
    assert (lay.c, lay.lo, lay.hi, lay.rows) == (3, 2, 8, None)
    lay = ST.stack_layout([(0, 1), (1, 4)], [1, 0], 2)  # slot 1 has 1 row, slot 0 has 3
    assert lay.c == 3 and lay.rows.tolist() == [1, 2, 3, 0] and lay.slots.tolist() == [0, 1, 2, 3]
    # 1, 1 and 10 rows: 30 padded slots for 12 rows
    assert ST.stack_layout([(0, 1), (1, 2), (2, 12)], [0, 1, 2], 3) is None
    many = ST.MAX_ROWS_PER_SLOT + 1
    assert ST.stack_layout([(0, many)], [0], 1) is None  # long segments: one adapter at a time
    assert ST.stack_layout([(0, 2)], [0], 3) is None  # 2 rows padded to 3 slots of 2: too many
    # rows as they arrived: sorted position p is batch row order[p // tokens], token p % tokens
    lay = ST.stack_layout([(0, 2), (2, 4)], [0, 1], 2, order=np.array([1, 0]), tokens=2)
    assert lay.rows.tolist() == [2, 3, 0, 1] and lay.slots is None


# ----- the op -------------------------------------------------------------------------------------
def _case(seed, n_rows, tokens, k, d_in=6, d_out=5, r=3, base_rows=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, tokens, d_in))
    As, Bs, s = _stack(rng, k, r, d_in, d_out)
    # every adapter (and the base) about equally often, shuffled: segments of unequal lengths
    # within the padding the stacked path accepts
    g = rng.permutation(np.resize(np.arange(-1 if base_rows else 0, k), n_rows))
    return rng, x, As, Bs, s, g


@pytest.mark.parametrize(
    "n_rows, tokens, k, sort",
    [(12, 1, 4, True), (12, 1, 4, False), (9, 2, 3, False), (40, 1, 8, False), (6, 3, 2, True)],
)
def test_stacked_rows_equal_each_row_alone(n_rows, tokens, k, sort):
    rng, x, As, Bs, s, g = _case(n_rows + k, n_rows, tokens, k)
    if sort:  # rows grouped before the op: the block is a view of the batch
        order = np.argsort(g, kind="stable")
        x, g = x[order], g[order]
    st = ST.stack_parameters(As, Bs, s)
    A, B = [p.data for p in As], [p.data for p in Bs]
    y, cache = G.grouped_lora_forward(x, G.group_batch(g, k), A, B, s, stack=(st, range(k)))
    np.testing.assert_allclose(y, _each_row(x, g, A, B, s, 5), rtol=1e-12, atol=1e-12)
    assert cache.stacked is not None  # the stacked path ran, not the per-adapter one


def test_equal_segments_grouped_are_a_view_of_the_batch():
    rng = np.random.default_rng(3)
    As, Bs, s = _stack(rng, 4, 2, 6, 5)
    g = np.repeat(np.arange(4), 3)  # 3 rows each, already grouped
    x = rng.normal(size=(12, 6))
    st = ST.stack_parameters(As, Bs, s)
    A, B = [p.data for p in As], [p.data for p in Bs]
    _, cache = G.grouped_lora_forward(x, G.group_batch(g, 4), A, B, s, stack=(st, range(4)))
    assert cache.stacked.layout.rows is None and np.shares_memory(cache.stacked.X, x)


def test_a_layer_with_adapters_the_batch_does_not_use():
    """Adapters 1 and 3 of the stack get no rows: their slots are zeros, their rows nothing."""
    rng, x, As, Bs, s, _ = _case(4, 10, 1, 4)
    g = np.array([0, 2, 2, -1, 0, 2, 0, 0, 2, -1])
    used = [0, 2]
    st = ST.stack_parameters(As, Bs, s)
    A, B = [As[k].data for k in used], [Bs[k].data for k in used]
    groups = G.group_batch(np.where(g == 2, 1, g), 2)
    y, cache = G.grouped_lora_forward(x, groups, A, B, [s[0], s[2]], stack=(st, used))
    want = _each_row(x, g, [p.data for p in As], [p.data for p in Bs], s, 5)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    _, dAs, dBs = G.grouped_lora_backward(rng.normal(size=y.shape), cache)
    assert [a.shape for a in dAs] == [(3, 6), (3, 6)] and [b.shape for b in dBs] == [(5, 3)] * 2


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "g",
    [
        [2, 0, -1, 2, 1, 0, 2],  # unequal segments, base-only row: the padded block
        [-1, 0, 0, 1, 2, 2, 2],  # the same, rows grouped
        [2, 1, 0, 0, 2, 1, -1],  # equal segments as they came: the whole batch sorted
    ],
)
def test_stacked_functions_pass_gradcheck(fused, g):
    """dx, dW0, db, every dA_k and dB_k against central differences (float64, B nonzero,
    rows of 2 tokens)."""
    rng = np.random.default_rng(5 + 2 * fused + g[0])
    k, r, d_in, d_out = 3, 2, 4, 3
    g = np.array(g)
    x = Tensor(rng.normal(size=(7, 2, d_in)), requires_grad=True)
    W0 = Tensor(rng.normal(size=(d_out, d_in)), requires_grad=True)
    b = Tensor(rng.normal(size=(d_out,)), requires_grad=True)
    As = [Tensor(rng.normal(size=(r, d_in)), requires_grad=True) for _ in range(k)]
    Bs = [Tensor(rng.normal(size=(d_out, r)), requires_grad=True) for _ in range(k)]
    scalings = [0.5, 2.0, 1.5]
    groups = G.group_batch(g, k)
    held = {}

    def fn(x, W0, b, *AB):
        held["st"] = ST.stack_parameters(AB[:k], AB[k:], scalings, held.get("st"))
        stack = (held["st"], range(k))
        if fused:
            return GroupedLoRALinearFn.apply(
                x, W0, b, *AB, index=groups, scalings=scalings, stack=stack
            )
        return GroupedLoRAFn.apply(x, *AB, index=groups, scalings=scalings, stack=stack)

    assert gradcheck(fn, x, W0, b, *As, *Bs)
    assert held["st"] is not None


@pytest.mark.parametrize(
    "n_rows, tokens, k, equal",
    [(24, 1, 6, False), (10, 3, 4, False), (24, 1, 6, True), (12, 2, 3, True), (6, 1, 6, True)],
)
def test_stacked_gradients_equal_the_per_adapter_ones(n_rows, tokens, k, equal):
    """Unequal segments (the padded block, rows gathered as they came) and equal ones in
    arrival order (the fused op sorts the whole batch, the block is a view of it)."""
    rng, x, As, Bs, s, g = _case(7 + k, n_rows, tokens, k)
    if equal:
        g = rng.permutation(np.repeat(np.arange(k), n_rows // k))
    W0, b = rng.normal(size=(5, 6)), rng.normal(size=5)
    dy = rng.normal(size=(n_rows, tokens, 5))
    A, B = [p.data.copy() for p in As], [p.data.copy() for p in Bs]
    st = ST.stack_parameters(As, Bs, s)
    groups = G.group_batch(g, k)
    outs = []
    for stack in ((st, range(k)), None):
        h, cache = G.grouped_lora_linear_forward(x, W0, b, groups, A, B, s, stack)
        assert (cache.stacked is not None) == (stack is not None)
        if stack is not None and equal:
            assert cache.stacked.sorted  # equal segments: the whole batch sorted, a view
        dx, dAs, dBs = G.grouped_lora_backward(dy, cache, W0=W0)
        outs.append([h, dx, *dAs, *dBs])
    for got, want in zip(*outs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


# ----- in a model ---------------------------------------------------------------------------------
def _model(k=6, r=2):
    model = nn.MLP([8, 10, 6], seed=0, dtype=np.float64)
    for i in range(k):
        inject_lora(model, ["0", "2"], r=r, alpha=2 * r, seed=i, adapter_name=f"t{i}")
    return nonzero_B(model, seed=3).eval()


def _rows_alone(model, x, names):
    """Each row through its adapter alone (active, no mixed batch)."""
    out = []
    for i, n in enumerate(names):
        for _, layer in lora_layers(model):
            layer.active_adapter_names = [n]
        out.append(model(x[i : i + 1]).data[0])
    return np.array(out)


NAMES = ["t3", "t0", "t5", "t1", "t0", "t2", "t4", "t3", "t5", "t1", "t2", "t4"]


def test_a_mixed_batch_stacks_each_layer_once_and_follows_new_weights():
    model = _model()
    x = np.random.default_rng(8).normal(size=(len(NAMES), 8))
    with mixed_batch(model, NAMES):
        y = model(x).data
        stacks = [layer._adapter_stack for _, layer in lora_layers(model)]
        model(x)
        assert [layer._adapter_stack for _, layer in lora_layers(model)] == stacks  # reused
    assert all(s is not None for s in stacks)
    np.testing.assert_allclose(y, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)
    layer = lora_layers(model)[0][1]
    layer.adapter("t2").lora_B.data = np.full((10, 2), 0.3)  # a new array, set by hand
    layer.adapter("t4").lora_A.data[0, 0] += 1.0  # an edit in place
    with mixed_batch(model, NAMES):
        y2 = model(x).data
    assert layer._adapter_stack is not stacks[0]
    np.testing.assert_allclose(y2, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)


def test_serving_reuses_the_stack_and_sees_new_arrays_edits_and_scalings():
    """The no-graph path reads the stack straight from the adapters' views: an untouched model
    rebuilds nothing, and a parameter given a new array, an edit in place or a new scaling each
    shows in the next batch."""
    model = _model()
    x = np.random.default_rng(10).normal(size=(len(NAMES), 8))
    layer = lora_layers(model)[0][1]

    def serve():
        with no_grad(), mixed_batch(model, NAMES):
            return model(x).data

    y = serve()
    stack = layer._adapter_stack
    np.testing.assert_array_equal(serve(), y)
    assert layer._adapter_stack is stack  # nothing rebuilt
    for part in ("lora_A", "lora_B"):  # a new array, set by hand
        p = getattr(layer.adapter("t1"), part)
        p.data = p.data + 0.25
        y1 = serve()
        assert layer._adapter_stack is not stack
        stack = layer._adapter_stack
        np.testing.assert_allclose(y1, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)
    layer.adapter("t5").lora_A.data[1, 3] -= 0.5  # in place: the stack is its storage
    layer.adapter("t0").scaling *= 3.0
    y2 = serve()
    assert not np.allclose(y2, y1)
    np.testing.assert_allclose(y2, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)


def test_the_layers_of_a_batch_share_its_plan_and_one_block_layout():
    """mixed_batch works out each layer's plan (groups, holders) as it checks the layers, and the
    first layer's block layout is kept in the batch's RowGroups for the next: no layer redoes
    either, and the rows are still each row's own."""
    model = _model()
    x = np.random.default_rng(9).normal(size=(len(NAMES), 8))
    layers = [layer for _, layer in lora_layers(model)]
    with mixed_batch(model, NAMES):
        routing = layers[0].mixed_routing
        assert set(routing.plans) == {id(layer) for layer in layers}
        for layer in layers:
            assert layer.forward_plan()[1] is routing.plans[id(layer)]
        with no_grad():
            y = model(x).data
        memo = routing.groups.memo
        layouts = [key for key in memo if key[0] != "serve"]
        assert len(layouts) == 1  # the two layers: one layout
        assert len(memo) == 2  # and one serving plan (`grouped_lora_linear_serve`), shared too
        y_graph = model(x).data
        assert len(memo) == 2
    np.testing.assert_allclose(y, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y_graph, y, rtol=1e-12, atol=1e-12)
    for layer in layers:  # rows set by hand, outside mixed_batch: worked out in the layer
        layer.mixed_rows = list(NAMES)
    try:
        np.testing.assert_allclose(model(x).data, y, rtol=1e-12, atol=1e-12)
    finally:
        for layer in layers:
            layer.mixed_rows = None


def test_training_several_adapters_in_one_mixed_batch_with_an_optimizer():
    """SGD steps on a mixed batch (the stacked path, its parameters views of the stack) move
    every adapter as the per-adapter path does, step after step."""
    x = np.random.default_rng(9).normal(size=(len(NAMES), 8))
    target = np.random.default_rng(10).normal(size=(len(NAMES), 6))
    results = []
    for stacked in (True, False):
        model = _model().train()
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = optim.SGD(params, lr=0.05)
        for _ in range(3):
            with mixed_batch(model, NAMES):
                if not stacked:  # ranks differ in name only: keep the layers off the stack
                    for _, layer in lora_layers(model):
                        layer._stacked = lambda *a: None
                loss = ((model(Tensor(x)) - Tensor(target)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append([p.data.copy() for p in params])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_stacked_adapters_save_load_and_convert_as_before(tmp_path):
    model = _model(k=3)
    x = np.random.default_rng(11).normal(size=(6, 8))
    names = ["t0", "t1", "t2", "t2", "t1", "t0"]
    with mixed_batch(model, names):
        y = model(x).data
    layer = lora_layers(model)[0][1]
    assert not layer.adapter("t1").lora_B.data.flags.c_contiguous  # a view of B^T's stack
    save_adapter(model, tmp_path)  # every adapter in its own folder, PEFT's format
    fresh = _model(k=1)
    load_adapter(fresh, tmp_path / "t1", adapter_name="t1")
    want = layer.adapter("t1")
    got = lora_layers(fresh)[0][1].adapter("t1")
    np.testing.assert_array_equal(got.lora_B.data, want.lora_B.data)
    np.testing.assert_array_equal(got.lora_A.data, want.lora_A.data)
    np.testing.assert_allclose(y, _rows_alone(model, x, names), rtol=1e-12, atol=1e-12)
    torch = pytest.importorskip("torch")
    from loralab.torch import to_torch

    twin = to_torch(model)  # the twin copies B (out, r) from its column-major view
    with torch.no_grad(), mixed_batch(twin, names):
        y_twin = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_twin, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 6])  # one product pair (long segment); the stacked products
def test_serving_without_a_graph_gives_the_rows_of_the_graph(k):
    """Under no_grad the layer calls the op directly (no Function): the same rows, no graph."""
    model = _model(k=k)
    names = [f"t{i % k}" for i in range(12)]
    x = np.random.default_rng(12).normal(size=(12, 8))
    with mixed_batch(model, names):
        y = model(Tensor(x, requires_grad=True))
        with no_grad():
            y_serving = model(x)
    assert y.requires_grad and not y_serving.requires_grad
    np.testing.assert_array_equal(y_serving.data, y.data)
    np.testing.assert_allclose(y_serving.data, _rows_alone(model, x, names), rtol=1e-12, atol=1e-12)


def test_shrink_and_expand_on_the_whole_batch_sorted():
    """`grouped_lora_shrink(sort_whole_batch=True)` then `grouped_lora_expand`: the products in
    sorted order, put back in arrival order, returned or added into ``out``."""
    rng, x, As, Bs, s, _ = _case(13, 12, 1, 4)
    g = rng.permutation(np.repeat(np.arange(4), 3))  # equal segments, rows as they came
    st = ST.stack_parameters(As, Bs, s)
    A, B = [p.data for p in As], [p.data for p in Bs]
    cache = G.grouped_lora_shrink(x, G.group_batch(g, 4), A, s, (st, range(4)), True)
    assert cache.stacked.sorted and not cache.groups.identity
    want = _each_row(x, g, A, B, s, 5)
    y, _ = G.grouped_lora_expand(cache, B)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    out = np.ones(x.shape[:-1] + (5,))
    y_out, _ = G.grouped_lora_expand(cache, B, out=out)
    np.testing.assert_allclose(y_out, want + 1, rtol=1e-12, atol=1e-12)
