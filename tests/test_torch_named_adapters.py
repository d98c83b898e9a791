"""Named adapters on the torch twin, checked against HF PEFT on the same weights: several active
adapters, PEFT's mixed-batch forward, add_weighted_adapter; the grouped Function against autograd."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from builders import copy_adapters_into_peft, nonzero_B  # noqa: E402

import loralab.torch as tl  # noqa: E402
from loralab import nn  # noqa: E402
from loralab.torch.grouped import GroupedLoRAFunction, grouped_lora_autograd  # noqa: E402

pytestmark = pytest.mark.torch


def base():
    return tl.to_torch(nn.MLP([6, 10, 8, 6], seed=0, dtype=np.float64))


def twin_with_adapters():
    """ "default" (r=2) on 0, 2; "task" (r=3) on 0, 4; "other" (r=3) on 0, 2; every B nonzero."""
    model = tl.inject_lora(base(), ["0", "2"], r=2, alpha=4, seed=1)
    tl.inject_lora(model, ["0", "4"], r=3, alpha=3, seed=2, adapter_name="task")
    tl.inject_lora(model, ["0", "2"], r=3, alpha=6, seed=3, adapter_name="other")
    return nonzero_B(model, seed=4).eval()


def peft_twin(model):
    """The same adapters in a PeftModel (configs as loralab's, weights copied)."""
    peft = pytest.importorskip("peft")
    configs = {
        "default": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]),
        "task": peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0", "4"]),
        "other": peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]),
    }
    pm = peft.get_peft_model(base(), configs["default"])
    pm.add_adapter("task", configs["task"])
    pm.add_adapter("other", configs["other"])
    return copy_adapters_into_peft(model, pm)


def x_rows(n=7):
    return torch.from_numpy(np.random.default_rng(5).normal(size=(n, 6)))


def test_first_adapter_keeps_its_names_and_the_others_are_frozen():
    model = twin_with_adapters()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    assert tl.list_adapters(model) == ["default", "task", "other"]


@pytest.mark.peft
@pytest.mark.parametrize("names", [["default"], ["task"], ["default", "task", "other"]])
def test_active_adapters_match_peft(names):
    model, x = twin_with_adapters(), x_rows()
    pm = peft_twin(model)
    tl.set_adapter(model, names)
    pm.base_model.set_adapter(names)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), rtol=1e-12, atol=1e-12)
        with tl.disable_adapters(model), pm.disable_adapter():
            torch.testing.assert_close(model(x), pm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.peft
def test_mixed_batch_matches_each_row_alone_and_peft():
    model, x = twin_with_adapters(), x_rows(7)
    pm = peft_twin(model)
    rows = ["task", "__base__", "default", "other", "task", "default", "__base__"]
    with torch.no_grad(), tl.mixed_batch(model, rows):
        y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y, pm(x, adapter_names=rows), rtol=1e-12, atol=1e-12)
        for i, name in enumerate(rows):
            if name == "__base__":
                with tl.disable_adapters(model):
                    alone = model(x[i : i + 1])
            else:
                tl.set_adapter(model, name)
                alone = model(x[i : i + 1])
            torch.testing.assert_close(y[i : i + 1], alone, rtol=1e-12, atol=1e-12)


def test_a_mixed_batch_trains_several_adapters_as_row_by_row_would():
    model, x = twin_with_adapters(), x_rows(6)
    rows = ["task", "default", "task", "__base__", "default", "task"]
    tl.set_adapter(model, ["default", "task", "other"])  # all three trainable
    with tl.mixed_batch(model, rows):
        (model(x) ** 2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for i, name in enumerate(rows):  # the same loss, one row at a time with its adapter active
        if name != "__base__":
            tl.set_adapter(model, name)
            (model(x[i : i + 1]) ** 2).sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want) and not any("other" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12)


def test_grouped_function_matches_autograd():
    rng = np.random.default_rng(6)
    ranks, d_in, d_out = [2, 4, 3], 5, 7
    x = torch.tensor(rng.normal(size=(3, 4, d_in)), requires_grad=True)
    As = [torch.tensor(rng.normal(size=(r, d_in)), requires_grad=True) for r in ranks]
    Bs = [torch.tensor(rng.normal(size=(d_out, r)), requires_grad=True) for r in ranks]
    s = [0.5, 2.0, 1.5]
    index = torch.tensor(rng.integers(-1, 3, size=(3, 4)))
    c = torch.tensor(rng.normal(size=(3, 4, d_out)))
    y = GroupedLoRAFunction.apply(x, index, s, *As, *Bs)
    grads = torch.autograd.grad((y * c).sum(), [x, *As, *Bs])
    y_ref = grouped_lora_autograd(x, index, As, Bs, s)
    grads_ref = torch.autograd.grad((y_ref * c).sum(), [x, *As, *Bs])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.peft
@pytest.mark.parametrize(
    ("adapters", "weights", "combination_type", "svd_rank"),
    [
        (["default", "task"], [0.5, -2.0], "cat", None),
        (["default", "task", "other"], [1.0, 0.75, -0.25], "svd", 2),
        (["task", "other"], [0.625, 1.5], "linear", None),
        (["task", "other"], [-0.625, 1.5], "linear", None),
    ],
)
def test_add_weighted_adapter_matches_peft(adapters, weights, combination_type, svd_rank):
    model, x = twin_with_adapters(), x_rows()
    pm = peft_twin(model)
    tl.add_weighted_adapter(
        model, adapters, weights, "mix", combination_type=combination_type, svd_rank=svd_rank
    )
    pm.add_weighted_adapter(
        adapters, weights, "mix", combination_type=combination_type, svd_rank=svd_rank
    )
    tl.set_adapter(model, "mix")
    pm.base_model.set_adapter("mix")
    # PEFT holds the weights in a float32 tensor (torch.tensor(list)): the weights here are exact
    # in float32, but "linear"'s sqrt(|w s|) is rounded to float32 there, float64 here.
    rtol = 1e-6 if combination_type == "linear" else 1e-10
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), rtol=rtol, atol=rtol * 1e-2)
    for path, layer in tl.lora_layers(model):
        if "mix" in layer.adapter_names:
            target = pm.base_model.model.get_submodule(path)
            assert layer.adapter("mix").r == target.r["mix"]
            assert layer.adapter("mix").scaling == target.scaling["mix"]


@pytest.mark.parametrize("merged", [False, True])
def test_to_numpy_and_back_keeps_every_adapter(merged):
    model, x = twin_with_adapters(), x_rows()
    tl.set_adapter(model, ["default", "other"])
    if merged:
        tl.merge_lora(model)
    np_model = tl.to_numpy(model)
    back = tl.to_torch(np_model)
    for m in (np_model, back):
        assert tl.list_adapters(m) == ["default", "task", "other"]
        assert tl.active_adapters(m) == ["default", "other"]
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np_model(x.numpy()).data, model(x).detach().numpy(), rtol=1e-12)
    if merged:
        tl.unmerge_lora(back)
        tl.set_adapter(back, "task")
        tl.unmerge_lora(model)
        tl.set_adapter(model, "task")
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.peft
def test_numpy_mixed_batch_matches_peft():
    model, x = twin_with_adapters(), x_rows(7)
    pm = peft_twin(model)
    np_model = tl.to_numpy(model)
    rows = ["other", "task", "__base__", "default", "task", "task", "other"]
    with tl.mixed_batch(np_model, rows):
        got = np_model(x.numpy()).data
    with torch.no_grad():
        want = pm(x, adapter_names=rows).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_training_one_adapter_leaves_the_others_bit_for_bit():
    model, x = twin_with_adapters().train(), x_rows(8)
    tl.set_adapter(model, "task")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        opt.step()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == [
        "0.lora_adapters.task.lora_A",
        "0.lora_adapters.task.lora_B",
        "4.lora_A",
        "4.lora_B",
    ]


def test_a_torch_model_routes_every_batch_anew(monkeypatch):
    """`loralab.nn.edit_count` does not see a torch model's edits, so its mixed batches keep
    nothing between blocks: an adapter deleted between two equal batches is refused."""
    from loralab.lora import named_adapters as NA

    calls = []
    real = NA.route_rows
    monkeypatch.setattr(NA, "route_rows", lambda rows: calls.append(1) or real(rows))
    model, x = twin_with_adapters(), x_rows(3)
    rows = ["task", "other", "__base__"]
    for _ in range(2):
        with torch.no_grad(), tl.mixed_batch(model, rows):
            model(x)
    assert len(calls) == 2
    tl.delete_adapter(model, "other")
    with pytest.raises(ValueError, match=r"unknown adapters \['other'\]"):
        with tl.mixed_batch(model, rows):
            pass
