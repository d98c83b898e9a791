"""`grouped_lora_linear_serve`: a serving batch's layer without the backward's cache gives
`grouped_lora_linear_forward`'s h bit for bit, on its lean path (one contiguous block of
stacked adapters) and on every batch it hands back (padded segments, a subset of the stack,
long segments, no stack)."""

from types import SimpleNamespace

import numpy as np
import pytest

from loralab.lora import grouped as G
from loralab.lora.stacked import stack_parameters


def _stacked(rng, k, r, d_in, d_out, dtype):
    """K adapters as the engine's parameters hold them, stacked (`stack_parameters`)."""
    As = [SimpleNamespace(data=rng.normal(size=(r, d_in)).astype(dtype)) for _ in range(k)]
    Bs = [SimpleNamespace(data=rng.normal(size=(d_out, r)).astype(dtype)) for _ in range(k)]
    scalings = list(rng.uniform(0.5, 4.0, size=k))
    stack = stack_parameters(As, Bs, scalings)
    assert stack is not None
    return [a.data for a in As], [b.data for b in Bs], scalings, stack


def _both(x, W0, b, groups, As, Bs, scalings, stack):
    want = G.grouped_lora_linear_forward(x, W0, b, groups, As, Bs, scalings, stack)[0]
    got = G.grouped_lora_linear_serve(x, W0, b, groups, As, Bs, scalings, stack)
    return want, got


def _plans(groups):
    return [v for key, v in groups.memo.items() if key[0] == "serve"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("k, rows_each", [(1, 5), (4, 1), (6, 3), (40, 2)])
def test_the_lean_path_gives_the_forward_bit_for_bit(dtype, grouped, tokens, k, rows_each):
    rng = np.random.default_rng([k, rows_each, tokens, int(grouped)])
    d_in, d_out, r = int(rng.integers(3, 9)), int(rng.integers(3, 9)), 2
    As, Bs, scalings, stack = _stacked(rng, k, r, d_in, d_out, dtype)
    g = np.repeat(np.arange(k), rows_each)
    g = np.concatenate([np.full(2, -1), g])  # base-only rows too: outside the block
    if not grouped:
        g = rng.permutation(g)
    x = rng.normal(size=(g.size, tokens, d_in)).astype(dtype)
    W0 = rng.normal(size=(d_out, d_in)).astype(dtype)
    b = rng.normal(size=d_out).astype(dtype)
    groups = G.group_batch(g, k)
    want, got = _both(x, W0, b, groups, As, Bs, scalings, (stack, range(k)))
    assert got.shape == want.shape == (g.size, tokens, d_out)
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)
    assert [p is not None for p in _plans(groups)] == [True]  # it took the lean path
    want, got = _both(x, W0, None, groups, As, Bs, scalings, (stack, range(k)))
    assert np.array_equal(got, want)  # no bias, the plan reused
    assert len(_plans(groups)) == 1


def test_the_plan_chunks_cover_the_block_as_the_stacked_expand_does():
    g = np.repeat(np.arange(70), 1)
    groups = G.group_batch(g, 70)
    plan = G._serve_plan(groups, 1, range(70), 70)
    assert plan is not None and plan.c == 1 and (plan.lo, plan.hi) == (0, 70)
    assert [c[:2] for c in plan.chunks] == [(0, 64), (64, 70)]  # 64 adapters of 1 row each
    assert [c[2:] for c in plan.chunks] == [(0, 64), (64, 70)]


def _case(rng, g, k, dtype=np.float64):
    d_in, d_out = 5, 4
    As, Bs, scalings, stack = _stacked(rng, k, 2, d_in, d_out, dtype)
    x = rng.normal(size=(g.size, d_in)).astype(dtype)
    W0, b = rng.normal(size=(d_out, d_in)), rng.normal(size=d_out)
    return x, W0, b, As, Bs, scalings, stack


def test_batches_off_the_lean_path_are_served_by_the_forward():
    rng = np.random.default_rng(0)
    # uneven segments: the block is padded (the forward's padded path)
    g = np.array([0, 0, 0, 1, 2, 2])
    x, W0, b, As, Bs, scalings, stack = _case(rng, g, 3)
    groups = G.group_batch(g, 3)
    want, got = _both(x, W0, b, groups, As, Bs, scalings, (stack, range(3)))
    assert np.array_equal(got, want)
    assert _plans(groups) == [None]
    # the batch uses slots 0 and 2 of a stack of 3: the block is gathered by index
    g = np.array([0, 0, 1, 1])
    groups = G.group_batch(g, 2)
    sub = ([As[0], As[2]], [Bs[0], Bs[2]], [scalings[0], scalings[2]], (stack, [0, 2]))
    want, got = _both(x[:4], W0, b, groups, *sub)
    assert np.array_equal(got, want)
    assert _plans(groups) == [None]
    # long segments (more rows than MAX_ROWS_PER_SLOT): one product pair per adapter
    g = np.repeat([0, 1, 2], 70)
    x, W0, b, As, Bs, scalings, stack = _case(rng, g, 3)
    groups = G.group_batch(g, 3)
    want, got = _both(x, W0, b, groups, As, Bs, scalings, (stack, range(3)))
    assert np.array_equal(got, want)
    # no stack, or the rows as an index array: the forward itself
    groups = G.group_batch(g, 3)
    want, got = _both(x, W0, b, groups, As, Bs, scalings, None)
    assert np.array_equal(got, want)
    want, got = _both(x, W0, b, g, As, Bs, scalings, (stack, range(3)))
    assert np.array_equal(got, want)


def test_a_served_mixed_batch_equals_the_one_with_a_graph():
    """The engine's no-grad mixed batch runs the lean path; with gradients on, the Function's
    forward: the same rows, bit for bit."""
    import loralab
    from loralab import nn
    from loralab.lora import inject_lora, mixed_batch

    rng = np.random.default_rng(3)
    model = nn.MLP([6, 7, 5], seed=1, dtype=np.float64).eval()
    for i in range(4):
        inject_lora(model, ["0", "2"], r=2, alpha=4, seed=i, adapter_name=f"t{i}")
    for p in model.parameters():
        if p.requires_grad:
            p.data = rng.normal(size=p.shape)
    names = [f"t{i % 4}" for i in range(8)]
    x = rng.normal(size=(8, 6))
    with mixed_batch(model, names):
        trained = model(loralab.Tensor(x)).data
        with loralab.no_grad():
            model(x)
            served = model(x).data
    assert np.array_equal(served, trained)
