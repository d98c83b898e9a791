"""Tests for loralab.torch.inject: the torch twins of inject_lora, merge_lora and friends."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import loralab.lora as np_lora  # noqa: E402
from loralab import nn  # noqa: E402
from loralab.torch import (  # noqa: E402
    LoRALinear,
    count_parameters,
    inject_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    to_torch,
    unmerge_lora,
)

pytestmark = pytest.mark.torch


def mlp(sizes=(6, 12, 8, 4)):
    return nn.MLP(list(sizes), seed=0, dtype=np.float64)


@pytest.mark.parametrize("targets", [["0", "4"], r"[02]", ["2"], "all-linear"])
def test_same_layers_same_init_same_counts_as_numpy(targets):
    np_model = np_lora.inject_lora(mlp(), targets, r=2, alpha=4, seed=7)
    t_model = inject_lora(to_torch(mlp()), targets, r=2, alpha=4, seed=7)
    assert [n for n, _ in lora_layers(t_model)] == [n for n, _ in np_lora.lora_layers(np_model)]
    assert all(isinstance(m, LoRALinear) for _, m in lora_layers(t_model))
    assert count_parameters(t_model) == np_lora.count_parameters(np_model)
    np_state, t_state = np_lora.lora_state_dict(np_model), lora_state_dict(t_model)
    assert list(np_state) == list(t_state)
    for k in np_state:
        np.testing.assert_array_equal(t_state[k].numpy(), np_state[k])
    assert [n for n, p in t_model.named_parameters() if p.requires_grad] == list(t_state)


def test_output_unchanged_right_after_injection_and_merge_round_trip():
    model = to_torch(mlp())
    x = torch.randn(5, 6, dtype=torch.float64)
    before = model(x)
    inject_lora(model, ["0", "2", "4"], r=2, seed=0)
    torch.testing.assert_close(model(x), before, rtol=1e-14, atol=1e-15)  # B = 0
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, generator=torch.Generator().manual_seed(0))
    trained = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), trained, rtol=1e-12, atol=1e-12)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), trained, rtol=1e-12, atol=1e-12)


def _both_raise(np_call, t_call, error):
    with pytest.raises(error) as np_err:
        np_call()
    with pytest.raises(error) as t_err:
        t_call()
    assert str(t_err.value) == str(np_err.value)
    return str(t_err.value)


def test_same_errors_as_numpy():
    msg = _both_raise(
        lambda: np_lora.inject_lora(mlp(), ["q"]),
        lambda: inject_lora(to_torch(mlp()), ["q"]),
        ValueError,
    )
    assert "['0', '2', '4']" in msg
    _both_raise(
        lambda: np_lora.inject_lora(mlp(), ["1"]),
        lambda: inject_lora(to_torch(mlp()), ["1"]),
        TypeError,
    )
    _both_raise(
        lambda: np_lora.inject_lora(mlp(), "[("),
        lambda: inject_lora(to_torch(mlp()), "[("),
        ValueError,
    )
    _both_raise(
        lambda: np_lora.inject_lora(mlp(), []), lambda: inject_lora(to_torch(mlp()), []), TypeError
    )
    _both_raise(
        lambda: np_lora.inject_lora(mlp(), ["0"], r=9),
        lambda: inject_lora(to_torch(mlp()), ["0"], r=9),
        ValueError,
    )
    np_model, t_model = (
        np_lora.inject_lora(mlp(), ["0"], r=2),
        inject_lora(to_torch(mlp()), ["0"], r=2),
    )
    _both_raise(
        lambda: np_lora.inject_lora(np_model, ["0"], r=2),
        lambda: inject_lora(t_model, ["0"], r=2),
        ValueError,
    )
    _both_raise(lambda: np_lora.unmerge_lora(np_model), lambda: unmerge_lora(t_model), ValueError)
    np_lora.merge_lora(np_model)
    merge_lora(t_model)
    _both_raise(lambda: np_lora.merge_lora(np_model), lambda: merge_lora(t_model), ValueError)
    _both_raise(lambda: np_lora.merge_lora(mlp()), lambda: merge_lora(to_torch(mlp())), ValueError)


def test_bad_option_leaves_model_untouched():
    model = to_torch(mlp())
    with pytest.raises(ValueError, match="exceeds min"):
        inject_lora(model, ["0", "4"], r=5)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_plain_autograd_option_reaches_every_layer():
    model = inject_lora(to_torch(mlp()), ["0", "2"], r=2, use_custom_backward=False)
    assert all(not layer.use_custom_backward for _, layer in lora_layers(model))
