"""Adapter loading on torch models: the same refusals, all or nothing, as on NumPy models."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")

from loralab import nn  # noqa: E402
from loralab.lora import LoraConfig  # noqa: E402
from loralab.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from loralab.torch import (  # noqa: E402
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    to_torch,
)

pytestmark = pytest.mark.torch
KEY = "base_model.model.{}.lora_{}.weight"


def base():
    return to_torch(nn.MLP([8, 16, 4], seed=0, dtype=np.float64))


def write(directory, config, ranks=None):
    ranks = ranks or {"0": 2, "2": 2}
    shapes = {"0": (16, 8), "2": (4, 16)}
    g = np.random.default_rng(0)
    tensors = {}
    for path, r in ranks.items():
        tensors[KEY.format(path, "A")] = g.standard_normal((r, shapes[path][1]))
        tensors[KEY.format(path, "B")] = g.standard_normal((shapes[path][0], r))
    directory.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "2"], **config}
    (directory / CONFIG_NAME).write_text(json.dumps(full))
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


def snapshot(model):
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    modules, params = snapshot(model)
    assert modules == snap[0] and params.keys() == snap[1].keys()
    for name, (value, grad) in snap[1].items():
        assert params[name][1] == grad
        assert torch.equal(params[name][0], value), name


@pytest.mark.parametrize(
    ("config", "ranks", "match"),
    [
        ({"alpha_pattern": {"2": -1}}, None, "alpha_pattern"),
        ({"rank_pattern": {"2": 0}}, None, "rank_pattern"),
        ({"rank_pattern": {"2": 5}}, {"0": 2, "2": 5}, "exceeds min"),
        ({"use_rslora": "false"}, None, "use_rslora"),
        ({"init_lora_weights": "pissa_niter_4"}, None, "pissa_niter_4"),
    ],
)
@pytest.mark.parametrize("init", [True, "pissa"])
def test_a_refused_load_leaves_a_torch_model_unchanged(tmp_path, config, ranks, match, init):
    directory = write(tmp_path, {"init_lora_weights": init, **config}, ranks)
    model = base()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        load_adapter(model, directory)
    assert_unchanged(model, snap)


def test_merged_torch_models_refuse_loads_and_injections(tmp_path):
    save_adapter(inject_lora(base(), ["0", "2"], r=2, seed=1), tmp_path / "ad")
    model = merge_lora(inject_lora(base(), ["0"], r=2, seed=2))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unmerge first"):
        load_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="unmerge first"):
        inject_lora(model, ["2"], r=2)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"use_dora": "false"}, TypeError),
        ({"use_rslora": 1}, TypeError),
        ({"alpha": float("inf")}, ValueError),
        ({"alpha": float("nan")}, ValueError),
    ],
)
def test_torch_inject_options_are_strict(kwargs, error):
    model = base()
    snap = snapshot(model)
    with pytest.raises(error, match=next(iter(kwargs))):
        inject_lora(model, ["0", "2"], r=2, **kwargs)
    assert_unchanged(model, snap)
    with pytest.raises(error, match=next(iter(kwargs))):
        LoRALinear(torch.nn.Linear(8, 4), r=2, **kwargs)


def test_regex_patterns_load_into_torch_as_into_numpy(tmp_path):
    directory = write(
        tmp_path, {"rank_pattern": {"^2$": 3}, "alpha_pattern": {"^0$": 8}}, {"0": 2, "2": 3}
    )
    layers = dict(lora_layers(load_adapter(base(), directory)))
    assert (layers["0"].r, layers["0"].scaling) == (2, 4.0)
    assert (layers["2"].r, layers["2"].scaling) == (3, 4 / 3)


def test_inject_with_a_config_equals_the_keyword_form():
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"], rank_pattern={"^2$": 1})
    a = inject_lora(base(), config, seed=3)
    b = inject_lora(base(), ["0", "2"], r=2, alpha=6, seed=3)
    assert [layer.r for _, layer in lora_layers(a)] == [2, 1]
    assert torch.equal(a[0].lora_A, b[0].lora_A)
    with pytest.raises(TypeError, match="LoraConfig and the keyword options"):
        inject_lora(base(), config, r=4)
