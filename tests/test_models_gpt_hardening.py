"""The GPT and the torch twin under misuse: LoRA on a table the GPT does not call, T = 0, dtypes
`to_torch` cannot give, and NaN in an equivalence check."""

from __future__ import annotations

import numpy as np
import pytest

from loralab.lora import inject_lora, lora_layers
from loralab.models import GPT
from loralab.nn import MLP


def small_gpt():
    return GPT(11, context_length=6, d_model=8, n_layers=1, n_heads=2, seed=0, dtype=np.float64)


# ----- item 13: pos_emb is read, not called ------------------------------------------------------------
@pytest.mark.parametrize("targets", [["pos_emb"], ["tok_emb", "pos_emb", "q"], r".*_emb"])
def test_lora_on_the_position_table_is_refused_by_name(targets):
    gpt = small_gpt()
    with pytest.raises(
        ValueError, match=r"'pos_emb' cannot take a LoRA adapter: GPT.forward reads"
    ):
        inject_lora(gpt, targets, r=2, seed=0)
    assert lora_layers(gpt) == []


def test_an_adapter_file_for_the_position_table_is_refused_by_load_adapter(tmp_path):
    from safetensors.numpy import save_file

    from loralab.lora import load_adapter

    folder = tmp_path / "pos"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["pos_emb"]}'
    )
    save_file(
        {
            "base_model.model.pos_emb.lora_embedding_A": np.zeros((2, 6)),
            "base_model.model.pos_emb.lora_embedding_B": np.ones((8, 2)),
        },
        str(folder / "adapter_model.safetensors"),
    )
    gpt = small_gpt()
    with pytest.raises(ValueError, match=r"load_adapter: module 'pos_emb' cannot take a LoRA"):
        load_adapter(gpt, folder)
    assert lora_layers(gpt) == []


def test_lora_on_the_token_table_is_still_accepted():
    gpt = inject_lora(small_gpt(), ["tok_emb"], r=2, seed=0)
    assert [n for n, _ in lora_layers(gpt)] == ["tok_emb"]


@pytest.mark.torch
def test_lora_on_the_torch_twins_position_table_is_refused_by_name():
    pytest.importorskip("torch")
    import loralab.torch as tl

    twin = tl.to_torch(small_gpt())
    with pytest.raises(ValueError, match="'pos_emb' cannot take a LoRA adapter"):
        tl.inject_lora(twin, ["pos_emb"], r=2, seed=0)
    assert tl.lora_layers(twin) == []


# ----- item 14: T = 0 --------------------------------------------------------------------------------------
def test_a_gpt_forward_with_no_tokens_is_a_named_error():
    with pytest.raises(ValueError, match=r"GPT: expected at least one token per row \(T >= 1\)"):
        small_gpt()(np.zeros((2, 0), np.int64))


@pytest.mark.torch
def test_the_torch_twin_refuses_no_tokens_the_same_way():
    torch = pytest.importorskip("torch")
    import loralab.torch as tl

    with pytest.raises(ValueError, match=r"GPT: expected at least one token per row \(T >= 1\)"):
        tl.to_torch(small_gpt())(torch.zeros((2, 0), dtype=torch.int64))


# ----- item 14: to_torch's dtypes --------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("name", ["complex64", "int32", "bfloat16", "bool"])
def test_to_torch_refuses_dtypes_it_cannot_give_by_name(name):
    torch = pytest.importorskip("torch")
    import loralab.torch as tl

    dtype = getattr(torch, name)
    model = inject_lora(MLP([4, 8, 2], seed=0), ["0"], r=2, seed=0)
    with pytest.raises(TypeError, match=f"to_torch: dtype .*{name}"):
        tl.to_torch(model, dtype=dtype)


@pytest.mark.torch
def test_to_torch_still_gives_float16():
    torch = pytest.importorskip("torch")
    import loralab.torch as tl

    model = inject_lora(MLP([4, 8, 2], seed=0), ["0"], r=2, seed=0)
    assert {p.dtype for p in tl.to_torch(model, dtype=torch.float16).parameters()} == {
        torch.float16
    }


# ----- item 14: check_equivalence and NaN --------------------------------------------------------------------
def equivalence_setup():
    pytest.importorskip("torch")
    import loralab.torch as tl

    model = inject_lora(MLP([4, 8, 3], seed=0, dtype=np.float64), ["0"], r=2, seed=0)
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(5, 4)), rng.integers(0, 3, 5))]
    return model, tl, batches


@pytest.mark.torch
def test_check_equivalence_refuses_a_nan_parameter_by_name():
    model, tl, batches = equivalence_setup()
    twin = tl.to_torch(model)
    model.get_submodule("0").lora_B.data[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"parameter '0.lora_B' of the NumPy model holds 1 NaN"):
        tl.check_equivalence(model, twin, batches, steps=1, lr=0.01)


@pytest.mark.torch
def test_check_equivalence_refuses_a_nan_batch_by_name():
    model, tl, batches = equivalence_setup()
    x, y = batches[0]
    x = x.copy()
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"batches\[0\] x holds 1 NaN"):
        tl.check_equivalence(model, tl.to_torch(model), [(x, y)], steps=1, lr=0.01)


@pytest.mark.torch
def test_relative_difference_of_nan_is_infinite_so_checks_fail():
    pytest.importorskip("torch")
    from loralab.torch.equivalence import relative_difference

    a = np.array([1.0, np.nan])
    assert relative_difference(a, a) == np.inf
    assert relative_difference(np.array([np.inf]), np.array([1.0])) == np.inf
    assert relative_difference(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
