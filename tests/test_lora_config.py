"""loralab.lora.config: LoraConfig (PEFT's field names, strict types, the adapter_config.json round
trip), PEFT's pattern rule, and the docstring examples of the lora package."""

import doctest
import importlib
import math

import pytest

from loralab.lora import LoraConfig
from loralab.lora.config import pattern_key


def test_to_dict_is_adapter_config_json_and_from_dict_its_inverse():
    config = LoraConfig(
        r=4,
        lora_alpha=8.5,
        lora_dropout=0.1,
        target_modules=("a", "b"),
        use_rslora=True,
        init_lora_weights="pissa",
        rank_pattern={"^a$": 2},
        alpha_pattern={"b": 3},
    )
    data = config.to_dict()
    assert data["target_modules"] == ["a", "b"] and data["peft_type"] == "LORA"
    assert data["bias"] == "none" and data["fan_in_fan_out"] is False
    assert LoraConfig.from_dict(data) == config
    assert config.init == "pissa" and LoraConfig().init == "kaiming"
    assert (config.rank_for("a"), config.rank_for("x.a"), config.alpha_for("x.b")) == (2, 4, 3)
    assert config.scaling_for("a") == pytest.approx(8.5 / math.sqrt(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"use_dora": "false"},
            TypeError,
            "LoraConfig: use_dora must be True or False, got 'false'",
        ),
        ({"use_rslora": 1}, TypeError, "use_rslora must be True or False, got 1"),
        ({"r": 2.0}, TypeError, "r must be a positive integer, got 2.0"),
        ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
        (
            {"lora_alpha": float("inf")},
            ValueError,
            "lora_alpha must be a positive number, got lora_alpha=inf",
        ),
        (
            {"lora_alpha": True},
            TypeError,
            "lora_alpha must be a positive number, got lora_alpha=True",
        ),
        ({"lora_dropout": 1.0}, ValueError, r"expected lora_dropout in \[0, 1\)"),
        (
            {"target_modules": []},
            TypeError,
            "target_modules must be a regular expression string or",
        ),
        ({"target_modules": "(q"}, ValueError, "invalid regular expression"),
        ({"rank_pattern": {"q": 0}}, ValueError, r"rank_pattern\['q'\] must be a positive integer"),
        ({"alpha_pattern": [1]}, TypeError, "alpha_pattern must be a dict"),
        ({"init_lora_weights": "loftq"}, ValueError, "unsupported init_lora_weights='loftq'"),
        ({"init_lora_weights": 1}, ValueError, "unsupported init_lora_weights=1"),
        (
            {"bias": "all"},
            ValueError,
            "unsupported bias='all': loralab does not support trained biases",
        ),
        ({"peft_type": "IA3"}, ValueError, "peft_type must be 'LORA'"),
        ({"task_type": 3}, TypeError, "task_type must be a string or null"),
    ],
)
def test_every_field_is_checked_once_with_a_named_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_from_dict_names_the_source_and_refuses_unknown_features():
    good = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    with pytest.raises(TypeError, match="^x.json: use_dora must be True or False"):
        LoraConfig.from_dict({**good, "use_dora": "true"}, source="x.json")
    with pytest.raises(ValueError, match="x.json: the field 'lora_alpha' is missing"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 2}, source="x.json")
    with pytest.raises(ValueError, match="x.json: unsupported loftq_config="):
        LoraConfig.from_dict({**good, "loftq_config": {"loftq_bits": 4}}, source="x.json")
    with pytest.raises(TypeError, match="x.json: expected a JSON object"):
        LoraConfig.from_dict([good], source="x.json")
    # PEFT's provenance fields and its "off" values of features loralab lacks are fine
    off = {
        "peft_version": "0.21.2",
        "auto_mapping": {"a": 1},
        "loftq_config": {},
        "eva_config": None,
    }
    assert LoraConfig.from_dict({**good, **off}) == LoraConfig(r=2, lora_alpha=4)


@pytest.mark.parametrize(
    ("keys", "name", "expected"),
    [
        (["q"], "blocks.0.q", "q"),
        (["^q$"], "blocks.0.q", None),
        (["^q$"], "q", "^q$"),
        (["xq"], "q", None),
        ([r"blocks\.[01]\.q"], "blocks.1.q", r"blocks\.[01]\.q"),
        (["2", "0"], "net.0", "0"),
        ([".*", "0"], "net.0", ".*"),
    ],
)
def test_pattern_key_is_peft_get_pattern_key(keys, name, expected):
    """``re.match(rf"(.*\\.)?({key})$", name)``, first key wins (cross-checked against PEFT itself in
    test_peft_interop.py)."""
    assert pattern_key(keys, name) == expected


@pytest.mark.parametrize(
    "module", ["config", "ops", "variants", "linear_layer", "backend", "inject", "peft_format"]
)
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"loralab.lora.{module}")
    failures, _ = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert failures == 0


@pytest.mark.parametrize(
    ("init", "error"), [(1, TypeError), (None, TypeError), ("pisa", ValueError)]
)
def test_inject_init_wrong_type_or_value(init, error):
    """init of the wrong type is a TypeError naming it; an unknown name a ValueError listing them."""
    from loralab.lora import inject_lora
    from loralab.nn import MLP

    with pytest.raises(error, match="init"):
        inject_lora(MLP([4, 6, 2], seed=0), ["0"], r=2, init=init)
