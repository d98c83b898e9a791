"""The PEFT adapter format: round trips, the file layout, atomic writes and refusals."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loralab.lora import inject_lora, load_adapter, lora_layers, save_adapter
from loralab.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loralab.nn import MLP


def trained(seed=0, r=2, dtype=np.float64, **kw):
    model = inject_lora(
        MLP([8, 16, 4], seed=0, dtype=dtype), ["0", "2"], r=r, alpha=4, seed=seed, **kw
    )
    g = np.random.default_rng(seed + 100)
    for _, layer in lora_layers(model):
        layer.lora_B.data[:] = g.standard_normal(layer.lora_B.shape)
    return model


X = np.random.default_rng(0).standard_normal((3, 8))


def test_round_trip_into_a_fresh_base_model(tmp_path):
    model = trained()
    save_adapter(model, tmp_path / "ad")
    fresh = MLP([8, 16, 4], seed=0, dtype=np.float64)
    load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_array_equal(fresh(X).data, model(X).data)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        "0.lora_A",
        "0.lora_B",
        "2.lora_A",
        "2.lora_B",
    ]


def test_round_trip_into_a_model_with_adapters(tmp_path):
    model = trained(seed=1)
    save_adapter(model, tmp_path)
    other = trained(seed=2)
    load_adapter(other, tmp_path)
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(other), strict=True):
        np.testing.assert_array_equal(a.lora_A.data, b.lora_A.data)
        np.testing.assert_array_equal(a.lora_B.data, b.lora_B.data)


def test_file_layout_is_peft_format(tmp_path):
    save_adapter(trained(use_rslora=True), tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["0", "2"] and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is True
    assert config["use_dora"] is False and config["init_lora_weights"] is True
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.0.lora_A.weight": (2, 8),
        "base_model.model.0.lora_B.weight": (16, 2),
        "base_model.model.2.lora_A.weight": (2, 16),
        "base_model.model.2.lora_B.weight": (4, 2),
    }


def test_rslora_scaling_survives_the_round_trip(tmp_path):
    model = trained(use_rslora=True, r=4)
    save_adapter(model, tmp_path)
    fresh = MLP([8, 16, 4], seed=0, dtype=np.float64)
    load_adapter(fresh, tmp_path)
    assert all(layer.scaling == pytest.approx(4 / 2) for _, layer in lora_layers(fresh))
    np.testing.assert_allclose(fresh(X).data, model(X).data, rtol=1e-14)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = trained()
    save_adapter(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(seed=5), tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left


def snapshot(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}, [
        n for n, _ in lora_layers(model)
    ]


def assert_unchanged(model, snap):
    params, layers = snap
    assert [n for n, _ in lora_layers(model)] == layers
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, v in params.items():
        np.testing.assert_array_equal(now[n].data, v)


def test_refusals_name_the_problem_and_leave_the_model_unchanged(tmp_path):
    save_adapter(trained(), tmp_path / "good")
    model = MLP([8, 16, 4], seed=0, dtype=np.float64)
    snap = snapshot(model)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json' is missing"):
        load_adapter(model, tmp_path / "empty")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CONFIG_NAME).write_text("{not json")
    (corrupt / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(model, corrupt)
    (corrupt / CONFIG_NAME).write_text((tmp_path / "good" / CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match="cannot read"):
        load_adapter(model, corrupt)

    other = MLP([8, 12, 4], seed=0, dtype=np.float64)
    other_snap = snapshot(other)
    with pytest.raises(
        ValueError,
        match=r"base_model.model.0.lora_B.weight has shape \(16, 2\) but the model expects \(12, 2\)",
    ):
        load_adapter(other, tmp_path / "good")
    assert_unchanged(other, other_snap)

    deeper = MLP([8, 16, 16, 4], seed=0, dtype=np.float64)
    deeper_snap = snapshot(deeper)
    with pytest.raises(ValueError, match="model has no Linear module '2'|shape"):
        load_adapter(deeper, tmp_path / "good")
    assert_unchanged(deeper, deeper_snap)

    for field, value in [
        ("use_dora", True),
        ("bias", "all"),
        ("modules_to_save", ["head"]),
        ("peft_type", "IA3"),
    ]:
        bad = tmp_path / f"bad_{field}"
        bad.mkdir()
        config = json.loads((tmp_path / "good" / CONFIG_NAME).read_text())
        config[field] = value
        (bad / CONFIG_NAME).write_text(json.dumps(config))
        (bad / WEIGHTS_NAME).write_bytes((tmp_path / "good" / WEIGHTS_NAME).read_bytes())
        with pytest.raises(ValueError, match=field):
            load_adapter(model, bad)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / CONFIG_NAME).write_text((tmp_path / "good" / CONFIG_NAME).read_text())
    tensors = load_file(str(tmp_path / "good" / WEIGHTS_NAME))
    tensors["base_model.model.0.lora_C.weight"] = tensors.pop("base_model.model.0.lora_A.weight")
    save_file(tensors, str(renamed / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="unexpected tensor 'base_model.model.0.lora_C.weight'"):
        load_adapter(model, renamed)
    assert_unchanged(model, snap)

    with pytest.raises(ValueError, match="has no LoRA layers"):
        save_adapter(model, tmp_path / "none")

    ranked = trained(r=3)
    with pytest.raises(
        ValueError, match=r"lora_A.weight has shape \(2, 8\) but the model expects \(3, 8\)"
    ):
        load_adapter(ranked, tmp_path / "good")


def test_float32_models_load_float64_files(tmp_path):
    save_adapter(trained(), tmp_path)
    model = MLP([8, 16, 4], seed=0, dtype=np.float32)
    load_adapter(model, tmp_path)
    assert all(layer.lora_A.dtype == np.float32 for _, layer in lora_layers(model))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_reload_onto_the_original_base(tmp_path, init):
    """A PiSSA/OLoRA adapter was trained on the residual of W0: loading it onto a fresh base must
    split W0 again (as PEFT does), not add B A onto the full W0."""
    model = inject_lora(
        MLP([8, 16, 4], seed=0, dtype=np.float64), ["0", "2"], r=2, alpha=4, init=init, seed=0
    )
    g = np.random.default_rng(1)
    for _, layer in lora_layers(model):
        layer.lora_B.data += 0.1 * g.standard_normal(layer.lora_B.shape)
    save_adapter(model, tmp_path)
    fresh = MLP([8, 16, 4], seed=0, dtype=np.float64)
    load_adapter(fresh, tmp_path)
    np.testing.assert_allclose(fresh(X).data, model(X).data, rtol=1e-12, atol=1e-12)
