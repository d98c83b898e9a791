"""A seeded fuzzer over saved adapters: every mutant is refused cleanly or loaded exactly right.

Mutations: truncations, byte flips, edits of the safetensors header (dtype, shape, offsets, keys,
length) and of ``adapter_config.json`` (field values of every type, deleted and unknown fields,
rank/alpha patterns). For each mutant, loaded into a fresh model and into a model that already
has adapters, the test asserts one of:

- a ValueError, TypeError or FileNotFoundError, and the model bit-for-bit unchanged;
- a successful load whose outputs equal an independent reference built from the file with
  PEFT's rules (pattern keys matched by ``re.match(rf"(.*\\.)?({key})$", path)``, s = alpha / r or
  alpha / sqrt(r), PiSSA/OLoRA splitting W0 again).
"""

import json
import math
import re
import struct

import numpy as np
from safetensors.numpy import load_file

from loralab import nn
from loralab.lora import inject_lora, load_adapter, lora_layers, save_adapter
from loralab.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME

CASES = 240
X = np.random.default_rng(0).standard_normal((3, 8))
VALUES = [
    None,
    True,
    False,
    0,
    1,
    2,
    3,
    -1,
    0.5,
    1e300,
    float("nan"),
    float("inf"),
    "false",
    "true",
    "2",
    "",
    "pissa",
    "olora",
    "gaussian",
    "loftq",
    "pissa_niter_4",
    [],
    [1],
    ["0"],
    {},
    {"2": 1},
    {"^2$": 3},
    {"0": -1},
    {"(": 2},
    [[[[[]]]]],
    {"a": {"b": {}}},
]
FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "peft_type",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "task_type",
    "modules_to_save",
    "shiny_new_field",
    "peft_version",
]


def base():
    return nn.MLP([8, 16, 4], seed=0, dtype=np.float64)


def with_adapters():
    return inject_lora(base(), ["0", "2"], r=2, alpha=4, seed=7)


def snapshot(model):
    params = {n: (p.data.copy(), p.requires_grad) for n, p in model.named_parameters()}
    return [(n, type(m).__name__) for n, m in model.named_modules()], params


def unchanged(model, snap):
    modules, params = snapshot(model)
    return (
        modules == snap[0]
        and params.keys() == snap[1].keys()
        and all(
            params[n][1] == g and np.array_equal(params[n][0], v) for n, (v, g) in snap[1].items()
        )
    )


# ----- mutations ------------------------------------------------------------------------------------
def split_safetensors(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header, data, text=None):
    text = (text or json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


def mutate(rng, config_text, weights):
    """One random mutation of the (config text, weights bytes) pair."""
    kind = rng.integers(9)
    if kind == 0:  # truncate the weights
        return config_text, weights[: rng.integers(len(weights))]
    if kind == 1:  # flip bytes anywhere in the weights
        raw = bytearray(weights)
        for i in rng.integers(len(raw), size=rng.integers(1, 4)):
            raw[i] ^= 1 << rng.integers(8)
        return config_text, bytes(raw)
    if kind == 2:  # flip bytes in the data section only (often a valid, different adapter)
        header, data = split_safetensors(weights)
        raw = bytearray(data)
        i = rng.integers(len(raw))
        raw[i] ^= 1 << rng.integers(6)
        return config_text, join_safetensors(header, bytes(raw))
    if kind == 3:  # edit one header entry
        header, data = split_safetensors(weights)
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry = header[key]
        what = rng.integers(5)
        if what == 0:
            entry["dtype"] = str(
                rng.choice(["F32", "F16", "BF16", "I64", "C64", "BOOL", "F8_E4M3", "X"])
            )
        elif what == 1:
            entry["shape"] = [int(d) + int(rng.integers(-1, 2)) for d in entry["shape"]]
        elif what == 2:
            entry["data_offsets"] = [
                int(o) + int(rng.integers(-8, 9)) for o in entry["data_offsets"]
            ]
        elif what == 3:
            header[key.replace("lora_A", "lora_Z").replace("lora_B", "lora_A")] = header.pop(key)
        else:
            del header[key]
        return config_text, join_safetensors(header, data)
    if kind == 4:  # a duplicated key, or a header that claims more than the file holds
        header, data = split_safetensors(weights)
        text = json.dumps(header)
        if rng.integers(2):
            first = text.index("}") + 1
            text = text[:first] + "," + text[1:first] + text[first:]
            return config_text, join_safetensors(None, data, text)
        return config_text, struct.pack("<Q", 10**6) + weights[8:]
    config = json.loads(config_text)
    if kind in (5, 6, 7):  # set a field to a value of any type
        config[str(rng.choice(FIELDS))] = VALUES[rng.integers(len(VALUES))]
    else:  # delete a field or truncate the text
        if rng.integers(2):
            config.pop(str(rng.choice(sorted(config))))
        else:
            return config_text[: rng.integers(len(config_text))], weights
    return json.dumps(config), weights


# ----- the reference: PEFT's rules, written independently -------------------------------------------
def peft_value(pattern, path, default):
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key]
    return default


def expected_output(config, tensors):
    model = base()
    init = config.get("init_lora_weights", True)
    for path in ("0", "2"):
        A = tensors[f"base_model.model.{path}.lora_A.weight"].astype(np.float64)
        B = tensors[f"base_model.model.{path}.lora_B.weight"].astype(np.float64)
        r = A.shape[0]
        alpha = peft_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        W = model.get_submodule(path).weight.data
        if init == "pissa":
            U, S, Vh = np.linalg.svd(W, full_matrices=False)
            W -= (U[:, :r] * S[:r]) @ Vh[:r]
        elif init == "olora":
            Q, R = np.linalg.qr(W)
            W -= s * Q[:, :r] @ R[:r]
        W += s * B @ A
    return model.eval()(X).data


def test_every_mutant_is_refused_cleanly_or_loaded_exactly(tmp_path):
    model = with_adapters()
    g = np.random.default_rng(1)
    for _, layer in lora_layers(model):
        layer.lora_B.data = g.standard_normal(layer.lora_B.shape)
    save_adapter(model, tmp_path / "good")
    config_text = (tmp_path / "good" / CONFIG_NAME).read_text()
    weights = (tmp_path / "good" / WEIGHTS_NAME).read_bytes()
    rng = np.random.default_rng(2026)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(CASES):
        text, raw = mutate(rng, config_text, weights)
        directory = tmp_path / f"case{case}"
        directory.mkdir()
        (directory / CONFIG_NAME).write_text(text)
        (directory / WEIGHTS_NAME).write_bytes(raw)
        for target in (base(), with_adapters()):
            snap = snapshot(target)
            try:
                load_adapter(target, directory)
            except (ValueError, TypeError, FileNotFoundError):
                assert unchanged(target, snap), f"case {case}: a refused load changed the model"
                outcomes["refused"] += 1
                continue
            expected = expected_output(json.loads(text), load_file(str(directory / WEIGHTS_NAME)))
            np.testing.assert_allclose(
                target.eval()(X).data, expected, rtol=1e-10, atol=1e-12, err_msg=f"case {case}"
            )
            outcomes["loaded"] += 1
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > CASES // 10, outcomes
