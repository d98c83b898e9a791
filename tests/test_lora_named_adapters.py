"""Named adapters (PEFT's semantics) on NumPy models: several adapters on one base."""

import numpy as np
import pytest
from builders import nonzero_B

from loralab import nn, optim
from loralab.lora import (
    active_adapters,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject_lora,
    list_adapters,
    lora_layers,
    lora_state_dict,
    merge_lora,
    set_adapter,
    unmerge_lora,
)


def two_adapters(dtype=np.float64, seed=0):
    """An MLP with "default" on layers 0, 2 and "task" on 0, 4 (layer 4 wrapped for "task" only);
    every B nonzero."""
    model = nn.MLP([6, 10, 8, 6], seed=seed, dtype=dtype)
    inject_lora(model, ["0", "2"], r=2, alpha=4, seed=1)
    inject_lora(model, ["0", "4"], r=3, alpha=3, seed=2, adapter_name="task")
    return nonzero_B(model, seed=3)


def by_hand(model, x, names):
    """The forward written out: each Linear W0 x + b plus the sum of the named adapters' s B A x."""
    h = x
    for module in model:
        if isinstance(module, nn.Linear):
            h = h @ module.weight.data.T + module.bias.data
        elif hasattr(module, "adapter_names"):
            base = module.base
            out = h @ base.weight.data.T + base.bias.data
            for n in names:
                if n in module.adapter_names:
                    a = module.adapter(n)
                    out = out + a.scaling * (h @ a.lora_A.data.T) @ a.lora_B.data.T
            h = out
        else:
            h = module(h).data
    return h


def test_one_default_adapter_keeps_todays_names():
    model = inject_lora(nn.MLP([6, 10, 4], seed=0), ["0"], r=2, seed=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]
    assert active_adapters(model) == ["default"] and list_adapters(model) == ["default"]


def test_a_second_adapter_sits_beside_the_first_inactive_and_frozen():
    model = two_adapters()
    assert list_adapters(model) == ["default", "task"]
    assert active_adapters(model) == ["default"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    names = [n for n, _ in model.named_parameters()]
    assert "0.lora_adapters.task.lora_A" in names and "4.lora_A" in names  # 4's first is "task"
    x = np.random.default_rng(0).normal(size=(5, 6))
    np.testing.assert_allclose(model(x).data, by_hand(model, x, ["default"]), rtol=1e-12)


@pytest.mark.parametrize("names", [["task"], ["default", "task"], ["task", "default"]])
def test_set_adapter_sums_the_active_updates(names):
    model = two_adapters()
    set_adapter(model, names)
    assert active_adapters(model) == names
    x = np.random.default_rng(1).normal(size=(5, 6))
    np.testing.assert_allclose(model(x).data, by_hand(model, x, names), rtol=1e-12)
    layer0 = model.get_submodule("0")
    sizes = {
        n: sum(p.size for p in layer0.adapter_parameters(n).values()) for n in ["default", "task"]
    }
    trainable, total = count_parameters(model)
    want = sum(
        p.data.size
        for _, layer in lora_layers(model)
        for n in layer.adapter_names
        if n in names
        for p in layer.adapter_parameters(n).values()
    )
    assert trainable == want and sizes["task"] == 3 * (6 + 10)


def test_disable_adapters_runs_the_base_alone():
    model = two_adapters()
    set_adapter(model, ["default", "task"])
    x = np.random.default_rng(2).normal(size=(4, 6))
    with disable_adapters(model):
        np.testing.assert_allclose(model(x).data, by_hand(model, x, []), rtol=1e-12)
    np.testing.assert_allclose(model(x).data, by_hand(model, x, ["default", "task"]), rtol=1e-12)


def test_training_one_adapter_leaves_the_other_bit_for_bit():
    model = two_adapters()
    set_adapter(model, "task")
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.AdamW(params, lr=1e-2)
    rng = np.random.default_rng(4)
    for _ in range(3):
        x, y = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    changed = sorted(
        n for n, p in model.named_parameters() if not np.array_equal(p.data, before[n])
    )
    assert changed == [
        "0.lora_adapters.task.lora_A",
        "0.lora_adapters.task.lora_B",
        "4.lora_A",
        "4.lora_B",
    ]


def test_merge_tracks_adapters_and_unmerge_restores_W0():
    model = two_adapters()
    W0 = {n: layer.base.weight.data.copy() for n, layer in lora_layers(model)}
    x = np.random.default_rng(5).normal(size=(3, 6))
    set_adapter(model, ["default", "task"])
    want = by_hand(model, x, ["default", "task"])
    merge_lora(model)
    assert model.get_submodule("0").merged_adapters == ["default", "task"]
    assert model.get_submodule("2").merged_adapters == ["default"]
    np.testing.assert_allclose(model(x).data, want, rtol=1e-12)
    unmerge_lora(model)
    for n, layer in lora_layers(model):
        np.testing.assert_allclose(layer.base.weight.data, W0[n], rtol=0, atol=1e-14)
        assert not layer.merged
    merge_lora(model, adapter_names=["task"])
    assert model.get_submodule("0").merged_adapters == ["task"]
    assert model.get_submodule("2").merged_adapters == []


def test_delete_adapter_moves_the_next_one_up_and_unwraps_empty_layers():
    model = two_adapters()
    set_adapter(model, "task")
    A_task = model.get_submodule("0").adapter("task").lora_A
    delete_adapter(model, "default")
    assert list_adapters(model) == ["task"]
    layer0 = model.get_submodule("0")
    assert layer0.adapter_names == ["task"] and layer0.lora_A is A_task and layer0.r == 3
    assert isinstance(model.get_submodule("2"), nn.Linear)  # its only adapter was "default"
    x = np.random.default_rng(6).normal(size=(3, 6))
    np.testing.assert_allclose(model(x).data, by_hand(model, x, ["task"]), rtol=1e-12)


def test_bad_requests_are_refused_and_change_nothing():
    model = two_adapters()
    state = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\].*\['default', 'task'\]"):
        set_adapter(model, ["task", "nope"])
    with pytest.raises(ValueError, match="more than once"):
        set_adapter(model, ["task", "task"])
    with pytest.raises(ValueError, match="'default' is active"):
        delete_adapter(model, "default")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'task'"):
        inject_lora(model, ["2"], r=2, adapter_name="task")
    with pytest.raises(ValueError, match="replaces W0"):
        inject_lora(model, ["0"], r=2, init="pissa", adapter_name="third")
    with pytest.raises(ValueError, match="not a valid adapter name"):
        inject_lora(model, ["0"], r=2, adapter_name="a.b")
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        set_adapter(model, "task")
    unmerge_lora(model)
    assert list_adapters(model) == ["default", "task"] and active_adapters(model) == ["default"]
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.data, state[n], rtol=0, atol=1e-14)


def test_weighted_adapter_cat_is_the_exact_weighted_sum():
    model = two_adapters()
    add_weighted_adapter(model, ["default", "task"], [0.5, -2.0], "mix", combination_type="cat")
    layer = model.get_submodule("0")
    mix, d, t = layer.adapter("mix"), layer.adapter("default"), layer.adapter("task")
    assert mix.r == 5 and mix.scaling == 1.0
    np.testing.assert_allclose(
        mix.delta_weight(), 0.5 * d.delta_weight() - 2.0 * t.delta_weight(), rtol=1e-12
    )
    assert active_adapters(model) == ["default"]
    assert not any(p.requires_grad for p in layer.adapter_parameters("mix").values())


def test_weighted_adapter_svd_is_the_best_low_rank_approximation():
    model = two_adapters()
    add_weighted_adapter(model, ["default", "task"], [1.0, 1.0], "svd2", svd_rank=2)
    layer = model.get_submodule("0")
    full = layer.adapter("default").delta_weight() + layer.adapter("task").delta_weight()
    U, S, Vh = np.linalg.svd(full)
    np.testing.assert_allclose(
        layer.adapter("svd2").delta_weight(), (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-10, atol=1e-12
    )


def test_weighted_adapter_bad_input_is_named_and_nothing_is_added():
    model = two_adapters()
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(model, ["default", "task"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        add_weighted_adapter(model, ["task"], [1, 1], "m")
    with pytest.raises(ValueError, match=r"unknown adapters \['x'\]"):
        add_weighted_adapter(model, ["x"], [1], "m")
    with pytest.raises(ValueError, match="more than once"):
        add_weighted_adapter(model, ["task", "task"], [1, 1], "m")
    with pytest.raises(ValueError, match="exists already"):
        add_weighted_adapter(model, ["task"], [1], "default")
    with pytest.raises(ValueError, match="combination_type"):
        add_weighted_adapter(model, ["task"], [1], "m", combination_type="ties")
    assert list_adapters(model) == ["default", "task"]


def test_lora_state_dict_names_every_adapter_as_the_model_does():
    model = two_adapters()
    state = lora_state_dict(model)
    named = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert set(state) == named and "0.lora_adapters.task.lora_B" in state


def test_an_embedding_takes_a_named_adapter_beside_linear_ones(tmp_path):
    from loralab.lora import load_adapter, save_adapter

    def tiny():
        f64 = np.float64
        return nn.Sequential(
            nn.Embedding(12, 6, seed=0, dtype=f64), nn.Linear(6, 5, seed=1, dtype=f64)
        )

    model = inject_lora(tiny(), ["1"], r=2, seed=0)
    inject_lora(model, ["0", "1"], r=2, seed=1, adapter_name="emb")
    assert model.get_submodule("0").adapter_names == ["emb"]
    with pytest.raises(ValueError, match="second adapter on the embedding '0'"):
        inject_lora(model, ["0"], r=2, adapter_name="third")
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(model):  # every update nonzero (B = 0 or A = 0 at init)
        for name in layer.adapter_names:
            for p in layer.adapter_parameters(name).values():
                p.data = rng.normal(size=p.shape)
    ids = np.array([[1, 4, 4], [0, 11, 3]])
    set_adapter(model, "emb")
    want = model(ids).data
    with disable_adapters(model):
        assert np.abs(model(ids).data - want).max() > 1e-3  # the adapter changes the output
    save_adapter(model, tmp_path)
    fresh = inject_lora(tiny(), ["1"], r=2, seed=5)
    load_adapter(fresh, tmp_path / "emb", adapter_name="emb")
    set_adapter(fresh, "emb")
    np.testing.assert_allclose(fresh(ids).data, want, rtol=1e-12)


@pytest.mark.parametrize(
    ("weights", "error"),
    [(["1", 1.0], TypeError), ([True, 1.0], TypeError), ([np.nan, 1.0], ValueError)],
)
def test_weighted_adapter_wrong_weight_type_or_value(weights, error):
    """A weight of the wrong type is a TypeError, a non-finite one a ValueError; nothing added."""
    model = two_adapters()
    with pytest.raises(error, match="add_weighted_adapter: weights"):
        add_weighted_adapter(model, ["default", "task"], weights, "mix", combination_type="cat")
    assert list_adapters(model) == ["default", "task"]
