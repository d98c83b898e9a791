"""The torch grouped op on stacked adapters (`loralab.torch.stacked`, `StackedLoRAFunction`): the
twin of tests/test_lora_stacked.py. Forward and hand gradients against plain torch autograd and
against the NumPy op (float64, B nonzero), for equal and unequal segments, rows as they arrive or
grouped, tokens per row, adapters a batch does not use; and the stack kept honest when the
parameters change (reassigned, copied into in place, by an optimizer, saved and converted)."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from builders import copy_adapters_into_peft, nonzero_B  # noqa: E402

import loralab.torch as tl  # noqa: E402
from loralab import nn  # noqa: E402
from loralab.lora import grouped as G  # noqa: E402
from loralab.lora import stacked as ST  # noqa: E402
from loralab.torch import grouped as TG  # noqa: E402
from loralab.torch.stacked import stack_parameters  # noqa: E402

pytestmark = pytest.mark.torch


def _params(rng, k, r, d_in, d_out):
    As = [torch.nn.Parameter(torch.tensor(rng.normal(size=(r, d_in)))) for _ in range(k)]
    Bs = [torch.nn.Parameter(torch.tensor(rng.normal(size=(d_out, r)))) for _ in range(k)]
    return As, Bs, [float(s) for s in rng.uniform(0.5, 3.0, size=k)]


# ----- the stack ----------------------------------------------------------------------------------
def test_the_parameters_hold_views_of_the_stack_with_their_values():
    rng = np.random.default_rng(0)
    As, Bs, s = _params(rng, 3, 2, 5, 4)
    before = [p.detach().clone() for p in As + Bs]
    st = stack_parameters(As, Bs, s)
    assert st.A.shape == (3, 2, 5) and st.Bt.shape == (3, 2, 4)
    for p, want in zip(As + Bs, before, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)  # same values, in the stack
    assert all(p.untyped_storage().data_ptr() == st.A.untyped_storage().data_ptr() for p in As)
    assert all(p.untyped_storage().data_ptr() == st.Bt.untyped_storage().data_ptr() for p in Bs)
    assert Bs[1].shape == (4, 2) and Bs[1].stride() == (1, 4)  # B_k (out, r), column-major
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in As + Bs)
    assert stack_parameters(As, Bs, s, st) is st  # nothing changed: nothing copied


def test_an_edit_in_place_is_seen_and_a_new_tensor_rebuilds_the_stack():
    rng = np.random.default_rng(1)
    As, Bs, s = _params(rng, 4, 3, 6, 5)
    st = stack_parameters(As, Bs, s)
    with torch.no_grad():
        Bs[2][1, 0] = 7.0  # an optimizer's step: in place
        As[0].copy_(torch.ones(3, 6))
    assert stack_parameters(As, Bs, s, st) is st
    assert st.Bt[2, 0, 1] == 7.0 and bool((st.A[0] == 1).all())
    new = torch.tensor(rng.normal(size=(3, 6)))
    As[1].data = new  # a new tensor: the stack no longer holds A_1
    st2 = stack_parameters(As, Bs, s, st)
    assert st2 is not st
    torch.testing.assert_close(st2.A[1], new, rtol=0, atol=0)
    assert As[1].data_ptr() == st2.A[1].data_ptr()  # pointed at the new stack
    assert stack_parameters(As, Bs, [1.0] * 4, st2) is not st2  # a new scaling: rebuilt


def test_adapters_that_cannot_be_stacked_give_none():
    rng = np.random.default_rng(2)
    As = [torch.nn.Parameter(torch.tensor(rng.normal(size=(r, 5)))) for r in (2, 3)]
    Bs = [torch.nn.Parameter(torch.tensor(rng.normal(size=(4, r)))) for r in (2, 3)]
    assert stack_parameters(As, Bs, [1.0, 1.0]) is None  # ranks differ
    As = [torch.nn.Parameter(torch.ones(2, 3, dtype=t)) for t in (torch.float64, torch.float32)]
    Bs = [torch.nn.Parameter(torch.ones(4, 2, dtype=torch.float64)) for _ in range(2)]
    assert stack_parameters(As, Bs, [1.0, 1.0]) is None  # dtypes differ


# ----- the op against plain autograd and against NumPy ---------------------------------------------
def _case(seed, n_rows, tokens, k, d_in=6, d_out=5, r=3, sort=False):
    rng = np.random.default_rng(seed)
    As, Bs, s = _params(rng, k, r, d_in, d_out)
    # every adapter (and the base) about equally often, shuffled: unequal segments within the
    # padding the stacked path accepts
    g = rng.permutation(np.resize(np.arange(-1, k), n_rows))
    if sort:  # rows grouped before the op
        g = np.sort(g)
    x = torch.tensor(rng.normal(size=(n_rows, tokens, d_in)), requires_grad=True)
    c = torch.tensor(rng.normal(size=(n_rows, tokens, d_out)))
    return rng, x, As, Bs, s, g, c


def _grads(y, c, x, As, Bs):
    return torch.autograd.grad((y * c).sum(), [x, *As, *Bs])


def _check(y, grads, y_ref, grads_ref):
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "n_rows, tokens, k, sort",
    [(12, 1, 4, True), (12, 1, 4, False), (9, 2, 3, False), (40, 1, 8, False), (6, 3, 2, True)],
)
def test_stacked_function_equals_autograd(n_rows, tokens, k, sort):
    _, x, As, Bs, s, g, c = _case(n_rows + k, n_rows, tokens, k, sort=sort)
    st = stack_parameters(As, Bs, s)
    groups = G.group_batch(g, k)
    plan = TG.stack_plan(x, groups, st, range(k))
    assert plan is not None  # the stacked path runs, not the per-adapter one
    y = TG.grouped_lora(
        x, groups, [_Holder(A, B, sk) for A, B, sk in zip(As, Bs, s)], (st, range(k))
    )
    assert type(y.grad_fn).__name__ == "StackedLoRAFunctionBackward"
    index = torch.tensor(np.broadcast_to(g[:, None], x.shape[:-1]).copy())
    y_ref = TG.grouped_lora_autograd(x, index, As, Bs, s)
    _check(y, _grads(y, c, x, As, Bs), y_ref, _grads(y_ref, c, x, As, Bs))


class _Holder:
    def __init__(self, A, B, s):
        self.lora_A, self.lora_B, self.scaling = A, B, s


def test_equal_segments_grouped_are_a_view_of_the_batch():
    _, x, As, Bs, s, _, _ = _case(3, 12, 1, 4)
    g = np.repeat(np.arange(4), 3)  # 3 rows each, already grouped
    st = stack_parameters(As, Bs, s)
    plan = TG.stack_plan(x, G.group_batch(g, 4), st, range(4))
    assert plan.rows is None and (plan.lo, plan.hi, plan.c) == (0, 12, 3)


def test_added_into_the_base_output_in_place_with_its_gradient():
    """``out``: the low-rank part added into a tensor of the caller's (the base's output), whose
    gradient passes through; the same as out + the part."""
    _, x, As, Bs, s, g, c = _case(4, 10, 2, 3)
    W = torch.tensor(np.random.default_rng(5).normal(size=(5, 6)), requires_grad=True)
    st = stack_parameters(As, Bs, s)
    holders = [_Holder(A, B, sk) for A, B, sk in zip(As, Bs, s)]
    y = TG.grouped_lora(x, G.group_batch(g, 3), holders, (st, range(3)), out=x @ W.T)
    index = torch.tensor(np.broadcast_to(g[:, None], x.shape[:-1]).copy())
    y_ref = x @ W.T + TG.grouped_lora_autograd(x, index, As, Bs, s)
    grads = torch.autograd.grad((y * c).sum(), [x, W, *As, *Bs])
    _check(y, grads, y_ref, torch.autograd.grad((y_ref * c).sum(), [x, W, *As, *Bs]))


def test_a_stack_with_adapters_the_batch_does_not_use():
    """Slots 1 and 3 get no rows: their blocks are zeros, their rows nothing."""
    _, x, As, Bs, s, _, c = _case(4, 10, 1, 4)
    g = np.array([0, 2, 2, -1, 0, 2, 0, 0, 2, -1])
    st = stack_parameters(As, Bs, s)
    used = [0, 2]
    holders = [_Holder(As[k], Bs[k], s[k]) for k in used]
    y = TG.grouped_lora(x, G.group_batch(np.where(g == 2, 1, g), 2), holders, (st, used))
    assert type(y.grad_fn).__name__ == "StackedLoRAFunctionBackward"
    index = torch.tensor(g[:, None].copy())
    y_ref = TG.grouped_lora_autograd(x, index, As, Bs, s)
    params = [As[0], As[2], Bs[0], Bs[2]]
    _check(
        y,
        _grads(y, c, x, params[:2], params[2:]),
        y_ref,
        _grads(y_ref, c, x, params[:2], params[2:]),
    )


@pytest.mark.parametrize("n_rows, tokens, k", [(24, 1, 6), (10, 3, 4)])
def test_stacked_function_equals_the_numpy_op(n_rows, tokens, k):
    rng, x, As, Bs, s, g, c = _case(7 + k, n_rows, tokens, k)
    np_A = [p.detach().numpy().copy() for p in As]
    np_B = [p.detach().numpy().copy() for p in Bs]
    st = stack_parameters(As, Bs, s)
    groups = G.group_batch(g, k)
    y = TG.grouped_lora(
        x, groups, [_Holder(A, B, sk) for A, B, sk in zip(As, Bs, s)], (st, range(k))
    )
    grads = _grads(y, c, x, As, Bs)
    y_np, cache = G.grouped_lora_forward(x.detach().numpy(), groups, np_A, np_B, s)
    dx, dAs, dBs = G.grouped_lora_backward(c.numpy(), cache)
    np.testing.assert_allclose(y.detach().numpy(), y_np, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, [dx, *dAs, *dBs], strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_long_segments_or_different_ranks_keep_the_per_adapter_products():
    rng = np.random.default_rng(8)
    As, Bs, s = _params(rng, 2, 2, 4, 3)
    st = stack_parameters(As, Bs, s)
    many = ST.MAX_ROWS_PER_SLOT + 1
    x = torch.tensor(rng.normal(size=(2 * many, 4)))
    assert TG.stack_plan(x, G.group_batch(np.repeat([0, 1], many), 2), st, range(2)) is None
    holders = [_Holder(A, B, sk) for A, B, sk in zip(As, Bs, s)]
    y = TG.grouped_lora(x, G.group_batch(np.repeat([0, 1], many), 2), holders, (st, range(2)))
    assert type(y.grad_fn).__name__ == "GroupedLoRAFunctionBackward"


# ----- in a model ---------------------------------------------------------------------------------
def _model(k=6, r=2):
    model = tl.to_torch(nn.MLP([8, 10, 6], seed=0, dtype=np.float64))
    for i in range(k):
        tl.inject_lora(model, ["0", "2"], r=r, alpha=2 * r, seed=i, adapter_name=f"t{i}")
    return nonzero_B(model, seed=3).eval()


def _rows_alone(model, x, names):
    """Each row through its adapter alone (active, no mixed batch)."""
    out = []
    with torch.no_grad():
        for i, n in enumerate(names):
            tl.set_adapter(model, n)
            out.append(model(x[i : i + 1])[0])
    return torch.stack(out)


NAMES = ["t3", "t0", "t5", "t1", "t0", "t2", "t4", "t3", "t5", "t1", "t2", "t4"]


def _x(n=12, seed=8):
    return torch.tensor(np.random.default_rng(seed).normal(size=(n, 8)))


def test_a_mixed_batch_stacks_each_layer_once_and_follows_new_weights():
    model, x = _model(), _x()
    with torch.no_grad(), tl.mixed_batch(model, NAMES):
        y = model(x)
        stacks = [layer._adapter_stack for _, layer in tl.lora_layers(model)]
        model(x)
        assert all(
            a is b for a, b in zip(stacks, [la._adapter_stack for _, la in tl.lora_layers(model)])
        )
    assert all(s is not None for s in stacks)
    torch.testing.assert_close(y, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)
    layer = tl.lora_layers(model)[0][1]
    layer.adapter("t2").lora_B.data = torch.full((10, 2), 0.3, dtype=torch.float64)  # by hand
    with torch.no_grad():
        layer.adapter("t4").lora_A.copy_(layer.adapter("t4").lora_A + 1.0)  # in place
    with torch.no_grad(), tl.mixed_batch(model, NAMES):
        y2 = model(x)
    assert layer._adapter_stack is not stacks[0]
    torch.testing.assert_close(y2, _rows_alone(model, x, NAMES), rtol=1e-12, atol=1e-12)


def test_a_layer_with_adapters_the_batch_does_not_use():
    model, x = _model(), _x(6)
    names = ["t4", "t1", "__base__", "t4", "t1", "t1"]
    tl.set_adapter(model, [f"t{i}" for i in range(6)])  # all trainable
    with tl.mixed_batch(model, names):
        y = model(x)
        (y**2).sum().backward()
    layer = tl.lora_layers(model)[0][1]
    assert layer._adapter_stack.A.shape[0] == 6  # all six stacked, two used
    graded = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert graded and all(("t1" in n or "t4" in n) for n in graded)
    model.zero_grad(set_to_none=True)
    alone = _rows_alone(model, x, [n if n != "__base__" else "t0" for n in names])
    with torch.no_grad(), tl.disable_adapters(model):
        alone[2] = model(x[2:3])[0]
    torch.testing.assert_close(y.detach(), alone, rtol=1e-12, atol=1e-12)


def _train(stacked, steps=3):
    model = _model().train()
    tl.set_adapter(model, [f"t{i}" for i in range(6)])
    if not stacked:  # the per-adapter products, as before stacking
        for _, layer in tl.lora_layers(model):
            layer._stacked = lambda holders: None
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(params, lr=0.05)
    x, target = _x(), torch.tensor(np.random.default_rng(10).normal(size=(len(NAMES), 6)))
    for _ in range(steps):
        with tl.mixed_batch(model, NAMES):
            loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, [p.detach().clone() for p in params]


def test_training_several_adapters_with_sgd_equals_the_per_adapter_path():
    """SGD steps on a mixed batch (the stacked path, its parameters views of the stack) move
    every adapter as the per-adapter products do, step after step, and the stack follows."""
    model, got = _train(True)
    _, want = _train(False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    layer = tl.lora_layers(model)[0][1]
    torch.testing.assert_close(
        layer._adapter_stack.Bt[3].T, layer.adapter("t3").lora_B, rtol=0, atol=0
    )


@pytest.mark.peft
def test_a_stacked_mixed_batch_matches_peft():
    peft = pytest.importorskip("peft")
    model, x = _model(k=4), _x(7)
    names = ["t2", "__base__", "t0", "t3", "t2", "t1", "t0"]
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
    pm = peft.get_peft_model(tl.to_torch(nn.MLP([8, 10, 6], seed=0, dtype=np.float64)), cfg, "t0")
    for i in range(1, 4):
        pm.add_adapter(f"t{i}", cfg)
    pm = copy_adapters_into_peft(model, pm)
    with torch.no_grad(), tl.mixed_batch(model, names):
        y = model(x)
    assert tl.lora_layers(model)[0][1]._adapter_stack is not None
    with torch.no_grad():
        torch.testing.assert_close(y, pm(x, adapter_names=names), rtol=1e-12, atol=1e-12)


def test_stacked_adapters_save_load_and_convert_as_before(tmp_path):
    model, x = _model(k=3), _x(6)
    names = ["t0", "t1", "t2", "t2", "t1", "t0"]
    with torch.no_grad(), tl.mixed_batch(model, names):
        y = model(x)
    layer = tl.lora_layers(model)[0][1]
    assert not layer.adapter("t1").lora_B.is_contiguous()  # a view of B^T's stack
    tl.save_adapter(model, tmp_path)  # every adapter in its own folder, PEFT's format
    fresh = _model(k=1)
    tl.load_adapter(fresh, tmp_path / "t1", adapter_name="t1")
    got, want = tl.lora_layers(fresh)[0][1].adapter("t1"), layer.adapter("t1")
    torch.testing.assert_close(got.lora_B, want.lora_B, rtol=0, atol=0)
    torch.testing.assert_close(got.lora_A, want.lora_A, rtol=0, atol=0)
    back = tl.to_numpy(model)  # to NumPy and back again: the same mixed batch
    from loralab.lora import mixed_batch as np_mixed_batch

    with np_mixed_batch(back, names):
        y_np = back(x.numpy()).data
    np.testing.assert_allclose(y_np, y.numpy(), rtol=1e-12, atol=1e-12)
    again = tl.to_torch(back)
    with torch.no_grad(), tl.mixed_batch(again, names):
        torch.testing.assert_close(again(x), y, rtol=1e-12, atol=1e-12)
