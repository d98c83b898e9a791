"""Mixed batches and adapter blocks under misuse: nesting, changes inside a block, base-only rows;
and `add_weighted_adapter`'s weights (overflow, NumPy numbers) and embeddings. NumPy and torch."""

import os

import numpy as np
import pytest
from builders import copy_adapters_into_peft, nonzero_B

from loralab import nn
from loralab.lora import (
    active_adapters,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    inject_lora,
    list_adapters,
    lora_layers,
    merge_lora,
    mixed_batch,
    set_adapter,
    unmerge_lora,
)
from loralab.models import GPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def numpy_model():
    """ "default" (r=2) on 0, 2; "task" (r=3) on 0, 4; every B nonzero; float64."""
    model = nn.MLP([6, 10, 8, 5], seed=0, dtype=np.float64)
    inject_lora(model, ["0", "2"], r=2, alpha=4, seed=1)
    inject_lora(model, ["0", "4"], r=3, alpha=3, seed=2, adapter_name="task")
    return nonzero_B(model, seed=4).eval()


def torch_model():
    pytest.importorskip("torch")
    import loralab.torch as tl

    model = tl.to_torch(nn.MLP([6, 10, 8, 5], seed=0, dtype=np.float64))
    tl.inject_lora(model, ["0", "2"], r=2, alpha=4, seed=1)
    tl.inject_lora(model, ["0", "4"], r=3, alpha=3, seed=2, adapter_name="task")
    return nonzero_B(model, seed=4).eval()


def run(model, x):
    """The model's output on x (a NumPy array) as a NumPy array, either backend."""
    if isinstance(model, nn.Module):
        return model(x).data
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


MODELS = {"numpy": numpy_model, "torch": torch_model}
BACKENDS = ["numpy", pytest.param("torch", marks=pytest.mark.torch)]
X = np.random.default_rng(5).normal(size=(4, 6))


def routing(model):
    return [(layer.mixed_rows, layer.disabled) for _, layer in lora_layers(model)]


# ----- blocks nest ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nested_mixed_batch_gives_back_the_outer_rows_when_it_ends(backend):
    model = MODELS[backend]()
    outer, inner = ["task", "default", "__base__", "task"], ["default"] * 4
    with mixed_batch(model, outer):
        expected = run(model, X)
        with mixed_batch(model, inner):
            run(model, X)
        assert all(rows == outer for rows, _ in routing(model))
        np.testing.assert_array_equal(run(model, X), expected)
    assert all(rows is None for rows, _ in routing(model))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nested_disable_adapters_keeps_the_outer_block_disabled(backend):
    model = MODELS[backend]()
    with disable_adapters(model):
        base = run(model, X)
        with disable_adapters(model):
            pass
        assert all(disabled for _, disabled in routing(model))
        np.testing.assert_array_equal(run(model, X), base)
        with mixed_batch(model, ["task"] * 4):
            pass
        np.testing.assert_array_equal(run(model, X), base)
    assert not any(disabled for _, disabled in routing(model))


# ----- no adapter changes inside a mixed batch -------------------------------------------------------
CHANGES = {
    "merge_lora": lambda m: merge_lora(m),
    "delete_adapter": lambda m: delete_adapter(m, "task"),
    "set_adapter": lambda m: set_adapter(m, "task"),
    "add_weighted_adapter": lambda m: add_weighted_adapter(m, ["default"], [0.5], "blend"),
    "inject_lora": lambda m: inject_lora(m, ["2"], r=1, adapter_name="late"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_adapters_inside_a_mixed_batch_is_refused_by_name(backend, change):
    model = MODELS[backend]()
    rows = ["task", "default", "__base__", "task"]
    with mixed_batch(model, rows):
        before = run(model, X)
        with pytest.raises(ValueError, match=f"{change}: called inside a mixed_batch block"):
            CHANGES[change](model)
        np.testing.assert_array_equal(run(model, X), before)
    assert list_adapters(model) == ["default", "task"] and active_adapters(model) == ["default"]
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_unmerge_inside_a_mixed_batch_is_refused_too():
    model = numpy_model()
    with mixed_batch(model, ["default"] * 4):
        with pytest.raises(ValueError, match="unmerge_lora: called inside a mixed_batch"):
            unmerge_lora(model)


# ----- rows without an adapter run the base ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [["__base__"] * 4, ["task", "__base__", "task", "task"]])
def test_rows_a_layer_has_no_adapter_for_run_its_base(backend, rows):
    """ "__base__" everywhere; "task" rows at layer 2, which holds only "default"."""
    model = MODELS[backend]()
    with mixed_batch(model, rows):
        y = run(model, X)
    for i, name in enumerate(rows):
        if name == "__base__":
            with disable_adapters(model):
                alone = run(model, X[i : i + 1])
        else:
            set_adapter(model, name)
            alone = run(model, X[i : i + 1])
            set_adapter(model, "default")
        np.testing.assert_allclose(y[i : i + 1], alone, rtol=1e-12, atol=1e-14)


@pytest.mark.torch
@pytest.mark.peft
@pytest.mark.parametrize("rows", [["__base__"] * 4, ["task", "__base__", "task", "task"]])
def test_base_only_rows_match_peft(rows):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import loralab.torch as tl

    model = torch_model()
    pm = peft.get_peft_model(
        tl.to_torch(nn.MLP([6, 10, 8, 5], seed=0, dtype=np.float64)),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]),
    )
    pm.add_adapter("task", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0", "4"]))
    copy_adapters_into_peft(model, pm)
    x = torch.from_numpy(X)
    with torch.no_grad(), tl.mixed_batch(model, rows):
        y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y, pm(x, adapter_names=rows), rtol=1e-12, atol=1e-12)


# ----- add_weighted_adapter: weights and embeddings -----------------------------------------------------
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_weights_whose_products_overflow_are_refused_before_anything_changes(combination_type):
    model = nn.MLP([6, 10, 8, 5], seed=0)  # float32
    inject_lora(model, ["0", "2"], r=2, seed=1)
    inject_lora(model, ["0", "2"], r=2, seed=2, adapter_name="task")
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            layer.adapter(name).lora_B.data[...] = 0.5
    with pytest.raises(ValueError, match=r"add_weighted_adapter: weights \[1e\+200, 1\].*float32"):
        add_weighted_adapter(
            model, ["default", "task"], [1e200, 1], "mix", combination_type=combination_type
        )
    assert list_adapters(model) == ["default", "task"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_float_weights_are_accepted_as_python_floats(backend):
    model, twin = MODELS[backend](), MODELS[backend]()
    add_weighted_adapter(model, ["default", "task"], [np.float32(0.5), np.int64(2)], "mix")
    add_weighted_adapter(twin, ["default", "task"], [0.5, 2.0], "mix")
    set_adapter(model, "mix")
    set_adapter(twin, "mix")
    np.testing.assert_array_equal(run(model, X), run(twin, X))
    with pytest.raises(TypeError, match="weights must be numbers"):
        add_weighted_adapter(model, ["default"], [np.True_], "flag")


def test_an_adapter_on_an_embedding_is_refused_by_name_not_attribute_error():
    gpt = GPT(vocab_size=11, context_length=8, d_model=8, n_layers=1, n_heads=2, seed=0)
    inject_lora(gpt, ["tok_emb", "q", "v"], r=2, seed=1)
    with pytest.raises(
        ValueError, match=r"add_weighted_adapter: layers \['tok_emb'\].*one adapter"
    ):
        add_weighted_adapter(gpt, ["default"], [0.5], "blend")
    assert list_adapters(gpt) == ["default"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_embedding_checks_the_rows_of_a_batch_no_row_of_which_adapts(backend):
    gpt = GPT(vocab_size=11, context_length=8, d_model=8, n_layers=1, n_heads=2, seed=0)
    if backend == "torch":
        pytest.importorskip("torch")
        import loralab.torch as tl

        gpt = tl.to_torch(gpt)
    inject_lora(gpt, ["tok_emb"], r=2, seed=1)
    ids = np.zeros((3, 4), np.int64)
    if backend == "torch":
        import torch

        ids = torch.from_numpy(ids)
    with mixed_batch(gpt, ["__base__"] * 2), pytest.raises(ValueError, match="mixed_batch got 2"):
        gpt(ids)
