"""A seeded fuzzer over saved adapters: every mutant is refused cleanly or loaded exactly right.

Mutations: truncations, byte flips, edits of the safetensors header (dtype, shape, offsets, keys,
length) and of ``adapter_config.json`` (field values of every type, deleted and unknown fields,
rank/alpha patterns). For each mutant, loaded into a fresh model and into a model that already
has adapters, the test asserts one of:

- a ValueError, TypeError or FileNotFoundError, and the model bit-for-bit unchanged;
- a successful load whose outputs equal an independent reference built from the file with
  PEFT's rules (pattern keys matched by ``re.match(rf"(.*\\.)?({key})$", path)``, s = alpha / r or
  alpha / sqrt(r), PiSSA/OLoRA splitting W0 again).

Each mutant is also loaded beside existing adapters under a random ``adapter_name`` (valid, taken,
reserved, a path, too long, not a str); once activated, a loaded one must compute the reference.

The same assertion covers two newer surfaces:

- mixed batches: random row names (known, ``"__base__"``, unknown, not a str), batch sizes, nested
  blocks and adapter changes inside a block; refused cleanly with the model and its routing
  unchanged, or each row equal to its base plus its own adapter on the layers that hold it
  (PEFT's ``adapter_names`` rule, computed here from the arrays);
- quantized tensors: a bitsandbytes NF4/FP4 tensor (with and without double quantization) with
  one field mutated (codes, constants, dtype, block size, shape); refused with a named error, or
  dequantized (NumPy and torch twin) equal to bitsandbytes' own dequantization of the same parts
  and to an independent NumPy reference.
"""

import json
import math
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from loralab import nn
from loralab.lora import (
    delete_adapter,
    disable_adapters,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_layers,
    merge_lora,
    mixed_batch,
    save_adapter,
    set_adapter,
)
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


NAMES = ["task", "default", "", "a/b", "/abs", "x" * 300, "keys", "training", "__base__", "a.b"]
NAMES += ["_hidden", "..", "ünï", 3, None]


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
    names = np.random.default_rng(2027)  # apart, so the mutants stay those of the first fuzzer
    outcomes = {"refused": 0, "loaded": 0, "named": 0}
    for case in range(CASES):
        text, raw = mutate(rng, config_text, weights)
        directory = tmp_path / f"case{case}"
        directory.mkdir()
        (directory / CONFIG_NAME).write_text(text)
        (directory / WEIGHTS_NAME).write_bytes(raw)
        name = NAMES[names.integers(len(NAMES))]
        for target, options in (
            (base(), {}),
            (with_adapters(), {}),
            (with_adapters(), {"adapter_name": name}),
        ):
            snap = snapshot(target)
            try:
                load_adapter(target, directory, **options)
            except (ValueError, TypeError, FileNotFoundError):
                assert unchanged(target, snap), f"case {case}: a refused load changed the model"
                assert list_adapters(target) in (["default"], []), f"case {case}"
                outcomes["refused"] += 1
                continue
            if options:  # loaded under "default", the existing adapter's weights are replaced
                assert list_adapters(target) == list(dict.fromkeys(["default", name])), case
                set_adapter(target, name)
                outcomes["named"] += 1
            expected = expected_output(json.loads(text), load_file(str(directory / WEIGHTS_NAME)))
            np.testing.assert_allclose(
                target.eval()(X).data, expected, rtol=1e-10, atol=1e-12, err_msg=f"case {case}"
            )
            outcomes["loaded"] += 1
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > CASES // 10, outcomes
    assert outcomes["named"] > CASES // 50, outcomes


# ----- mixed batches ---------------------------------------------------------------------------------
ROW_NAMES = ["default", "task", "other", "__base__", "nope", "", 7]


def with_three_adapters():
    """ "default" on 0 and 2, "task" on 0 only, "other" on 2 only; every B nonzero."""
    model = with_adapters()
    inject_lora(model, ["0"], r=3, alpha=3, seed=8, adapter_name="task")
    inject_lora(model, ["2"], r=1, alpha=2, seed=9, adapter_name="other")
    g = np.random.default_rng(3)
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            holder = layer.adapter(name)
            holder.lora_B.data = g.standard_normal(holder.lora_B.shape)
    return model.eval()


def rows_reference(model, x, rows):
    """Row i: every layer's W0 x + b, plus s B A x of adapter rows[i] where the layer holds it."""
    parts = {}
    for path, layer in lora_layers(model):
        W0, b = layer.base.weight.data.copy(), layer.base.bias.data.copy()
        held = {
            n: layer.adapter(n).scaling
            * layer.adapter(n).lora_B.data
            @ layer.adapter(n).lora_A.data
            for n in layer.adapter_names
        }
        parts[path] = (W0, b, held)
    out = []
    for xi, name in zip(x, rows, strict=True):
        h = xi
        for path in ("0", "2"):
            W0, b, held = parts[path]
            W = W0 + held[name] if name in held else W0
            h = h @ W.T + b
            if path == "0":
                h = np.maximum(h, 0)
        out.append(h)
    return np.stack(out)


def routing(model):
    return [(layer.mixed_rows, layer.disabled) for _, layer in lora_layers(model)]


def test_every_mixed_batch_is_refused_cleanly_or_routed_exactly():
    rng = np.random.default_rng(2028)
    outcomes = {"refused": 0, "routed": 0}
    changes = [
        lambda m: merge_lora(m),
        lambda m: delete_adapter(m, "other"),
        lambda m: set_adapter(m, "task"),
        lambda m: inject_lora(m, ["2"], r=1, adapter_name="late"),
    ]
    for case in range(CASES // 2):
        model = with_three_adapters()
        snap = snapshot(model)
        n_rows = int(rng.integers(1, 6))
        rows = [  # mostly known names: one unknown name refuses the whole batch
            ROW_NAMES[int(rng.integers(len(ROW_NAMES) if rng.random() < 0.1 else 4))]
            for _ in range(n_rows)
        ]
        if rng.integers(4) == 0:  # a batch of another size
            n_rows = max(1, n_rows + int(rng.choice([-1, 1])))
        x = rng.standard_normal((n_rows, 8))
        nest, change = rng.integers(4), rng.integers(3 * len(changes))
        try:
            with mixed_batch(model, rows):
                if nest == 1:
                    with mixed_batch(model, ["__base__"] * len(rows)):
                        pass
                elif nest == 2:
                    with disable_adapters(model):
                        pass
                if change < len(changes):
                    changes[change](model)
                got = model(x).data
        except (ValueError, TypeError):
            assert unchanged(model, snap), f"case {case}: a refused batch changed the model"
            assert all(r == (None, False) for r in routing(model)), f"case {case}"
            outcomes["refused"] += 1
            continue
        assert unchanged(model, snap) and all(r == (None, False) for r in routing(model)), case
        np.testing.assert_allclose(
            got, rows_reference(model, x, rows), rtol=1e-12, atol=1e-12, err_msg=f"case {case}"
        )
        outcomes["routed"] += 1
    assert outcomes["refused"] > CASES // 10 and outcomes["routed"] > CASES // 20, outcomes


# ----- quantized tensors ----------------------------------------------------------------------------
def bnb_parts(quant_type, double_quant):
    """A bitsandbytes 4-bit tensor's parts, as QuantizedTensor's fields, and its QuantState."""
    import torch
    from bitsandbytes import functional as bnb

    W = np.random.default_rng(4).standard_normal((16, 64)).astype(np.float32)
    packed, state = bnb.quantize_4bit(
        torch.from_numpy(W), blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    fields = {
        "codes": packed.numpy().reshape(-1).copy(),
        "shape": (16, 64),
        "dtype": quant_type,
        "block_size": 64,
        "absmax_stored": state.absmax.numpy().copy(),
        "absmax_scale": state.state2.absmax.numpy().copy() if double_quant else None,
        "absmax_offset": np.float32(state.offset.item()) if double_quant else None,
    }
    return fields, state


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def mutate_quantized(rng, fields):
    """One random change of one field of a QuantizedTensor's parts (a copy)."""
    f = dict(fields)
    kind = int(rng.integers(9))
    if kind == 0:  # flip bits in the codes (every 4-bit code of NF4/FP4 is a level)
        codes = f["codes"].copy()
        codes[rng.integers(codes.size, size=3)] ^= np.uint8(1 << int(rng.integers(8)))
        f["codes"] = codes
    elif kind == 1:  # codes of another length or dtype
        codes = f["codes"]
        f["codes"] = pick(rng, [codes[:-1], np.append(codes, np.uint8(0)), codes.astype(np.int16)])
    elif kind in (2, 3):  # one constant replaced
        key = "absmax_scale" if f["absmax_scale"] is not None and kind == 3 else "absmax_stored"
        values = f[key].copy()
        if values.dtype == np.uint8:
            values[rng.integers(values.size)] = rng.integers(256)
        else:
            values[rng.integers(values.size)] = pick(rng, [np.nan, np.inf, -1.0, 0.0, 1e30, 3.0])
        f[key] = values
    elif kind == 4:  # the offset
        f["absmax_offset"] = pick(
            rng, [np.float32(np.nan), np.float32(-np.inf), np.float32(0.5), 0.5]
        )
    elif kind == 5:  # constants of another length
        f["absmax_stored"] = np.concatenate([f["absmax_stored"], f["absmax_stored"][:1]])
    elif kind == 6:
        f["dtype"] = pick(rng, ["nf4", "fp4", "int4", "int8", "nf5", "", 4])
    elif kind == 7:
        f["block_size"] = pick(rng, [0, 32, 128, 63, -64, "64", 64.0])
    else:
        f["shape"] = pick(rng, [(64, 16), (15, 64), (16, 64, 1), (1024,), (16, -64), (16.0, 64)])
    return f


def reference_dequantize(f):
    """LEVELS[code] * absmax of the code's block, written out plainly (no shared code)."""
    from loralab.quant import DOUBLE_QUANT_BLOCK_SIZE, DYNAMIC8_VALUES, LEVELS

    n = int(np.prod(f["shape"]))
    codes = np.stack([f["codes"] >> 4, f["codes"] & 15], axis=1).reshape(-1)[:n]
    absmax = f["absmax_stored"]
    if f["absmax_scale"] is not None:
        scale = np.repeat(f["absmax_scale"], DOUBLE_QUANT_BLOCK_SIZE)[: absmax.size]
        absmax = DYNAMIC8_VALUES[absmax] * scale + f["absmax_offset"]
    blocks = np.repeat(absmax, f["block_size"])[:n]
    return (LEVELS[f["dtype"]][codes] * blocks).reshape(f["shape"])


def bnb_dequantize(f, state):
    """bitsandbytes' dequantize_4bit of the same parts (its CPU kernel: rows of whole blocks)."""
    import copy

    import torch
    from bitsandbytes import functional as bnb

    state = copy.deepcopy(state)
    state.absmax = torch.from_numpy(f["absmax_stored"])
    state.shape, state.quant_type = torch.Size(f["shape"]), f["dtype"]
    state.code = bnb.get_4bit_type(f["dtype"], device="cpu")
    if f["absmax_scale"] is not None:
        state.state2.absmax = torch.from_numpy(f["absmax_scale"])
        state.offset = torch.tensor(f["absmax_offset"])
    packed = torch.from_numpy(f["codes"]).reshape(-1, 1)
    return bnb.dequantize_4bit(packed, state).numpy().reshape(f["shape"])


@pytest.mark.torch
@pytest.mark.quant
def test_every_mutated_quantized_tensor_is_refused_cleanly_or_equals_bitsandbytes():
    pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes (loralab[quant])")
    import loralab.torch as tl
    from loralab.quant import Linear4bit, QuantizedTensor

    rng = np.random.default_rng(2029)
    outcomes = {"refused": 0, "accepted": 0, "bitsandbytes": 0}
    originals = [bnb_parts(t, dq) for t in ("nf4", "fp4") for dq in (False, True)]
    for case in range(CASES):
        original, state = originals[case % len(originals)]
        f = mutate_quantized(rng, original)
        try:
            layer = Linear4bit.from_quantized(QuantizedTensor(**f))
        except (ValueError, TypeError):
            outcomes["refused"] += 1
            continue
        got = layer.dequantized_weight()
        np.testing.assert_array_equal(got, reference_dequantize(f), err_msg=f"case {case}")
        twin = tl.Linear4bit.from_numpy(layer).dequantized_weight().numpy()
        np.testing.assert_array_equal(twin, got, err_msg=f"case {case}")
        outcomes["accepted"] += 1
        if f["dtype"] in ("nf4", "fp4") and f["shape"][-1] % f["block_size"] == 0:
            np.testing.assert_array_equal(got, bnb_dequantize(f, state), err_msg=f"case {case}")
            outcomes["bitsandbytes"] += 1
    assert outcomes["refused"] > CASES // 4 and outcomes["bitsandbytes"] > CASES // 10, outcomes
