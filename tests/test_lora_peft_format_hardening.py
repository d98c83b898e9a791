"""Adapter loading and saving refuse every bad input by name and never half-apply (NumPy side).

Each test here reproduces one finding of a fuzzing pass over corrupted and hand-edited adapters
(merged models, half-applied refusals, PEFT's regex patterns, unknown inits, truthy strings,
non-finite numbers, empty or hostile safetensors files, non-atomic saves).
"""

import json
import math
import os
import re
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loralab import lora, nn
from loralab.lora import inject_lora, load_adapter, lora_layers, merge_lora, save_adapter
from loralab.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME

X = np.random.default_rng(0).standard_normal((3, 8))
KEY = "base_model.model.{}.lora_{}.weight"


def base(seed=0):
    return nn.MLP([8, 16, 4], seed=seed, dtype=np.float64)


def trained(seed=0, r=2, **kw):
    model = inject_lora(base(), ["0", "2"], r=r, alpha=4, seed=seed, **kw)
    g = np.random.default_rng(seed + 100)
    for _, layer in lora_layers(model):
        layer.lora_B.data[:] = g.standard_normal(layer.lora_B.shape)
    return model


def good_config(**changes):
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "target_modules": ["0", "2"],
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    config.update(changes)
    return config


def good_tensors(ranks=None, seed=0):
    """A and B for layers "0" (16, 8) and "2" (4, 16) with the given ranks."""
    ranks = ranks or {"0": 2, "2": 2}
    shapes = {"0": (16, 8), "2": (4, 16)}
    g = np.random.default_rng(seed)
    tensors = {}
    for path, r in ranks.items():
        out_f, in_f = shapes[path]
        tensors[KEY.format(path, "A")] = g.standard_normal((r, in_f))
        tensors[KEY.format(path, "B")] = g.standard_normal((out_f, r))
    return tensors


def write(directory, config, tensors=None, raw_weights=None):
    directory.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / CONFIG_NAME).write_text(text)
    if raw_weights is not None:
        (directory / WEIGHTS_NAME).write_bytes(raw_weights)
    else:
        save_file(good_tensors() if tensors is None else tensors, str(directory / WEIGHTS_NAME))
    return directory


def snapshot(model):
    """Every array (copied), every requires_grad flag, every module's type and LoRA state."""
    params = {n: (p.data.copy(), p.requires_grad) for n, p in model.named_parameters()}
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    states = [
        (n, layer.r, layer.alpha, layer.scaling, layer.merged, layer.use_rslora)
        for n, layer in lora_layers(model)
    ]
    return params, modules, states


def assert_unchanged(model, snap):
    params, modules, states = snapshot(model)
    assert modules == snap[1] and states == snap[2]
    assert params.keys() == snap[0].keys()
    for name, (value, grad) in snap[0].items():
        assert params[name][1] == grad, name
        np.testing.assert_array_equal(params[name][0], value, err_msg=name)


def refused(model, directory, error, match):
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, directory)
    assert_unchanged(model, snap)


# ----- 1. merged models ---------------------------------------------------------------------------
def test_loading_into_a_merged_model_is_refused(tmp_path):
    save_adapter(trained(seed=1), tmp_path / "other")
    model = merge_lora(trained(seed=2))
    refused(model, tmp_path / "other", ValueError, "merged.*unmerge first")


def test_injecting_into_a_merged_model_is_refused():
    model = merge_lora(inject_lora(nn.MLP([8, 16, 16, 4], seed=0), ["0"], r=2, seed=0))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="merged.*unmerge first"):
        inject_lora(model, ["2"], r=2, seed=0)
    assert_unchanged(model, snap)


# ----- 2. all or nothing --------------------------------------------------------------------------
BAD_PATTERNS = [
    ({"alpha_pattern": {"2": -1}}, {"0": 2, "2": 2}, "alpha_pattern"),
    ({"rank_pattern": {"2": 0}}, {"0": 2, "2": 2}, "rank_pattern"),
    (
        {"rank_pattern": {"2": 5}},
        {"0": 2, "2": 5},
        r"r=5 exceeds min\(in_features, out_features\)=4",
    ),
]


@pytest.mark.parametrize(("changes", "ranks", "match"), BAD_PATTERNS)
@pytest.mark.parametrize("init", [True, "pissa", "olora"])
def test_a_refused_load_leaves_a_fresh_model_bit_for_bit_unchanged(
    tmp_path, changes, ranks, match, init
):
    """Layer "0" is fine and comes first; the problem is in layer "2". Nothing may change.

    loralab refuses r > min(in_features, out_features) (PEFT accepts it): the update
    s B A cannot have a rank above min(in, out), so such an r only wastes parameters, and a
    PiSSA/OLoRA split of W0 has no r-th singular direction to take.
    """
    directory = write(tmp_path, good_config(init_lora_weights=init, **changes), good_tensors(ranks))
    refused(base(), directory, ValueError, match)


@pytest.mark.parametrize(("changes", "ranks", "match"), BAD_PATTERNS[:2])
def test_a_refused_load_leaves_a_model_with_adapters_unchanged(tmp_path, changes, ranks, match):
    directory = write(tmp_path, good_config(**changes), good_tensors(ranks))
    refused(trained(), directory, ValueError, match)


# ----- 3. PEFT's regular-expression patterns --------------------------------------------------------
def test_rank_and_alpha_patterns_are_regular_expressions_as_in_peft(tmp_path):
    config = good_config(rank_pattern={"^2$": 3}, alpha_pattern={"^0$": 8})
    directory = write(tmp_path, config, good_tensors({"0": 2, "2": 3}))
    model = load_adapter(base(), directory)
    layers = dict(lora_layers(model))
    assert (layers["0"].r, layers["0"].alpha, layers["0"].scaling) == (2, 8, 4.0)
    assert (layers["2"].r, layers["2"].alpha, layers["2"].scaling) == (3, 4, 4 / 3)


def test_pattern_keys_match_a_dotted_suffix_and_the_first_key_wins(tmp_path):
    model = nn.Sequential(nn.MLP([8, 16, 4], seed=0, dtype=np.float64))
    tensors = {
        k.replace("base_model.model.", "base_model.model.0."): v for k, v in good_tensors().items()
    }
    config = good_config(alpha_pattern={"[02]": 6, "2": 10}, target_modules=["0.0", "0.2"])
    load_adapter(model, write(tmp_path, config, tensors))
    assert [layer.alpha for _, layer in lora_layers(model)] == [6, 6]


def test_an_invalid_pattern_regex_is_refused_by_name(tmp_path):
    directory = write(tmp_path, good_config(rank_pattern={"(": 3}))
    refused(base(), directory, ValueError, r"adapter_config.json.*rank_pattern.*'\('")


# ----- 4. inits loralab does not implement ---------------------------------------------------------
@pytest.mark.parametrize(
    "init", ["pissa_niter_4", "corda", "loftq", "eva", "lora_ga", "orthogonal", "mica", "svd"]
)
def test_unimplemented_inits_are_refused_by_name(tmp_path, init):
    directory = write(tmp_path, good_config(init_lora_weights=init))
    refused(base(), directory, ValueError, f"init_lora_weights={init!r}")


# ----- 5. strict types ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("use_rslora", "false", TypeError),
        ("use_dora", "false", TypeError),
        ("use_rslora", 0, TypeError),
        ("r", "2", TypeError),
        ("r", 2.0, TypeError),
        ("r", True, TypeError),
        ("lora_alpha", "4", TypeError),
        ("lora_alpha", True, TypeError),
        ("lora_alpha", float("nan"), ValueError),
        ("lora_alpha", float("inf"), ValueError),
        ("lora_dropout", "0.1", TypeError),
        ("lora_dropout", 1.5, ValueError),
        ("rank_pattern", [3], TypeError),
        ("rank_pattern", "2", TypeError),
        ("rank_pattern", {"2": "3"}, TypeError),
        ("alpha_pattern", {"2": None}, TypeError),
        ("target_modules", 5, TypeError),
        ("init_lora_weights", "true", ValueError),
        ("peft_type", "lora", ValueError),
    ],
)
def test_config_types_are_strict(tmp_path, field, value, error):
    directory = write(tmp_path, good_config(**{field: value}))
    shown = next(iter(value.values())) if isinstance(value, dict) else value  # the bad entry
    refused(base(), directory, error, rf"adapter_config.json.*{field}.*{re.escape(repr(shown))}")


def test_a_deeply_nested_config_gives_a_clean_error(tmp_path):
    text = json.dumps(good_config())[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refused(base(), write(tmp_path, text), ValueError, "adapter_config.json")


def test_unknown_non_empty_fields_and_duplicated_fields_are_refused(tmp_path):
    refused(
        base(), write(tmp_path / "a", good_config(shiny_feature=3)), ValueError, "shiny_feature"
    )
    text = json.dumps(good_config())[:-1] + ', "r": 3}'
    refused(base(), write(tmp_path / "b", text), ValueError, "duplicate.*'r'")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"use_dora": "false"}, TypeError, "use_dora"),
        ({"use_rslora": 1}, TypeError, "use_rslora"),
        ({"alpha": math.inf}, ValueError, "alpha"),
        ({"alpha": math.nan}, ValueError, "alpha"),
        ({"alpha": 0}, ValueError, "alpha"),
        ({"alpha": -16}, ValueError, "alpha"),
        ({"dropout": math.nan}, ValueError, "dropout"),
        ({"r": np.float64(2)}, TypeError, "r must be a positive integer"),
    ],
)
def test_inject_lora_options_are_as_strict(kwargs, error, match):
    model = base()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        inject_lora(model, ["0", "2"], **{"r": 2, **kwargs})
    assert_unchanged(model, snap)
    with pytest.raises(error, match=match):
        lora.LoRALinear(nn.Linear(8, 4, seed=0), **{"r": 2, **kwargs})


# ----- 6. the same validation whatever the target model -------------------------------------------
@pytest.mark.parametrize("alpha", [0, -16, float("nan"), float("inf")])
def test_bad_alpha_is_refused_when_the_model_already_has_lora(tmp_path, alpha):
    directory = write(tmp_path, good_config(lora_alpha=alpha))
    refused(trained(), directory, ValueError, "lora_alpha")


# ----- 7. the tensors -------------------------------------------------------------------------------
def test_an_adapter_without_tensors_is_refused(tmp_path):
    refused(base(), write(tmp_path, good_config(), {}), ValueError, "no tensors")


def test_non_finite_values_are_refused_by_key(tmp_path):
    tensors = good_tensors()
    tensors[KEY.format("2", "B")][1, 1] = np.inf
    refused(base(), write(tmp_path, good_config(), tensors), ValueError, KEY.format("2", "B"))


@pytest.mark.parametrize("dtype", [np.complex64, np.int64, np.bool_])
def test_non_float_dtypes_are_refused_by_key(tmp_path, dtype):
    tensors = good_tensors()
    tensors[KEY.format("0", "A")] = tensors[KEY.format("0", "A")].astype(dtype)
    refused(base(), write(tmp_path, good_config(), tensors), ValueError, "dtype")


def safetensors_bytes(header, data=b""):
    text = json.dumps(header, separators=(",", ":")) if isinstance(header, dict) else header
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def entries(tensors):
    """A safetensors header (as a list of JSON members) and data for float64 ``tensors``."""
    members, data = [], b""
    for key, value in tensors.items():
        blob = np.ascontiguousarray(value, "<f8").tobytes()
        spec = {
            "dtype": "F64",
            "shape": list(value.shape),
            "data_offsets": [len(data), len(data) + len(blob)],
        }
        members.append(f"{json.dumps(key)}:{json.dumps(spec)}")
        data += blob
    return members, data


def test_duplicated_tensor_keys_are_refused(tmp_path):
    members, data = entries(good_tensors())
    header = "{" + ",".join(members + [members[0]]) + "}"
    raw = safetensors_bytes(header, data)
    refused(base(), write(tmp_path, good_config(), raw_weights=raw), ValueError, "duplicate")


def test_a_header_declaring_a_gigabyte_under_an_unknown_key_is_refused_without_reading_it(tmp_path):
    members, data = entries(good_tensors())
    gib = 2**30
    spec = {"dtype": "F32", "shape": [gib // 4], "data_offsets": [len(data), len(data) + gib]}
    header = "{" + ",".join(members + [f'"base_model.model.junk":{json.dumps(spec)}']) + "}"
    directory = write(tmp_path, good_config(), raw_weights=safetensors_bytes(header, data))
    with open(directory / WEIGHTS_NAME, "r+b") as f:  # a sparse file: no real disk used
        f.truncate(os.path.getsize(directory / WEIGHTS_NAME) + gib)
    tracemalloc.start()
    try:
        refused(base(), directory, ValueError, "base_model.model.junk")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_a_truncated_file_is_refused(tmp_path):
    save_adapter(trained(), tmp_path / "good")
    raw = (tmp_path / "good" / WEIGHTS_NAME).read_bytes()
    for cut in (0, 4, 8, 20, len(raw) - 8):
        directory = write(tmp_path / f"cut{cut}", good_config(), raw_weights=raw[:cut])
        refused(base(), directory, ValueError, WEIGHTS_NAME)


# ----- 8. saving ------------------------------------------------------------------------------------
def test_a_failure_between_weights_and_config_leaves_the_old_pair(tmp_path, monkeypatch):
    save_adapter(trained(seed=1), tmp_path / "ad")
    before = {p: (tmp_path / "ad" / p).read_bytes() for p in (CONFIG_NAME, WEIGHTS_NAME)}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(seed=2, r=3), tmp_path / "ad")
    monkeypatch.undo()
    after = {p: (tmp_path / "ad" / p).read_bytes() for p in (CONFIG_NAME, WEIGHTS_NAME)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary folder left behind


def test_saved_files_have_mode_0644_and_stale_temporaries_are_cleared(tmp_path):
    stale = tmp_path / ".ad.abc123.tmp"
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"half")
    save_adapter(trained(), tmp_path / "ad")
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert os.stat(tmp_path / "ad" / name).st_mode & 0o777 == 0o644


def test_saving_onto_a_file_or_a_folder_with_other_files_is_refused(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match=f"save_adapter.*{target}"):
        save_adapter(trained(), target)
    assert target.read_text() == "keep me"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="save_adapter.*notes.txt"):
        save_adapter(trained(), folder)
    assert os.listdir(folder) == ["notes.txt"]


def test_saving_again_replaces_the_pair(tmp_path):
    save_adapter(trained(seed=1), tmp_path / "ad")
    model = trained(seed=2, r=3)
    save_adapter(model, tmp_path / "ad")
    assert load_file(str(tmp_path / "ad" / WEIGHTS_NAME))[KEY.format("0", "A")].shape == (3, 8)
    np.testing.assert_array_equal(load_adapter(base(), tmp_path / "ad")(X).data, model(X).data)


# ----- 9. issue 23: removal failures, symbolic links, modes, names, nested keys, overflow ---------
def test_a_save_whose_old_contents_cannot_be_removed_says_so(tmp_path, monkeypatch):
    import shutil

    save_adapter(trained(seed=1), tmp_path / "ad")
    real = shutil.rmtree

    def stuck(path, ignore_errors=False, **kwargs):  # as if a file inside were undeletable
        if os.path.basename(path).startswith(".ad."):
            if ignore_errors:
                return None
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stuck)
    new = trained(seed=2)
    with pytest.raises(OSError, match=r"new folder is in place at .*ad'.*could not be removed"):
        save_adapter(new, tmp_path / "ad")
    monkeypatch.undo()
    np.testing.assert_array_equal(load_adapter(base(), tmp_path / "ad")(X).data, new(X).data)


def test_saving_through_a_symbolic_link_replaces_the_linked_folder_and_keeps_the_link(tmp_path):
    save_adapter(trained(seed=1), tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    new = trained(seed=2)
    save_adapter(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    for where in ("link", "real"):
        np.testing.assert_array_equal(load_adapter(base(), tmp_path / where)(X).data, new(X).data)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dangling.*symbolic link.*nowhere"):
        save_adapter(new, tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists()


def test_every_file_of_a_save_is_0644_named_adapters_included(tmp_path):
    model = trained()
    inject_lora(model, ["0"], r=2, adapter_name="task")
    old = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "ad")
    finally:
        os.umask(old)
    modes = {
        os.path.relpath(os.path.join(folder, name), tmp_path): os.stat(
            os.path.join(folder, name)
        ).st_mode
        & 0o777
        for folder, dirs, files in os.walk(tmp_path / "ad")
        for name in files + dirs
    }
    assert f"ad/task/{WEIGHTS_NAME}" in modes
    assert modes == {p: 0o755 if p == "ad/task" else 0o644 for p in modes}


BAD_NAMES = ["/abs/path", "a/b", "a\\b", "..", ".", "", "a\x00b", "x" * 300, "a.b", "_x", "__base__",
             "has space", "CON", "keys", "training", "forward", "items", "to"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_that_are_not_one_safe_path_component_are_refused_first(tmp_path, name):
    model = trained()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not a valid adapter name"):
        inject_lora(model, ["0"], r=2, adapter_name=name)
    save_adapter(trained(seed=1), tmp_path / "ad")
    with pytest.raises(ValueError, match="not a valid adapter name"):
        load_adapter(model, tmp_path / "ad", adapter_name=name)
    with pytest.raises(ValueError, match="not a valid adapter name"):
        lora.add_weighted_adapter(model, ["default"], [1.0], name, combination_type="linear")
    assert_unchanged(model, snap)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_reserved_names_cover_the_numpy_adapter_dict():
    from loralab.lora.linear_layer import AdapterDict
    from loralab.lora.linear_shared import RESERVED_ADAPTER_NAMES

    public = {n for n in dir(AdapterDict()) if not n.startswith("_")}
    assert public <= set(RESERVED_ADAPTER_NAMES), public - set(RESERVED_ADAPTER_NAMES)


def test_reserved_names_cover_what_breaks_the_torch_twin():
    torch = pytest.importorskip("torch")
    from loralab.lora.linear_shared import RESERVED_ADAPTER_NAMES, check_adapter_name

    # torch's own names, read in a fresh interpreter: other libraries imported by earlier tests in
    # this process (transformers adds nn.Module.smart_apply) must not change what is checked
    code = "import torch; print(' '.join(n for n in dir(torch.nn.ModuleDict()) if n[0] != '_'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    public = set(out.stdout.split())
    assert public <= set(RESERVED_ADAPTER_NAMES), public - set(RESERVED_ADAPTER_NAMES)
    for name in public:  # each would break to_torch: ModuleDict refuses it as a key
        with pytest.raises(KeyError):
            torch.nn.ModuleDict()[name] = torch.nn.Linear(1, 1)
        with pytest.raises(ValueError, match="reserved"):
            check_adapter_name(name, "test")


def test_keys_naming_a_module_inside_a_lora_layer_are_refused(tmp_path):
    model = inject_lora(base(), ["0"], r=2, alpha=4, seed=0)
    g = np.random.default_rng(1)
    nested = {
        "base_model.model.0.base.lora_A.weight": g.standard_normal((2, 8)),
        "base_model.model.0.base.lora_B.weight": g.standard_normal((16, 2)),
    }
    directory = write(tmp_path / "nested", good_config(target_modules=["0.base"]), nested)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"0\.base.*inside the LoRA layer '0'"):
        load_adapter(model, directory, adapter_name="other")
    assert_unchanged(model, snap)
    assert [n for n, _ in lora_layers(model)] == ["0"]
    both = write(tmp_path / "both", good_config(target_modules=["0", "0.base"]),
                 {**good_tensors({"0": 2}), **nested})  # fmt: skip
    refused(base(), both, ValueError, r"0\.base.*inside '0', which the file adapts as well")


@pytest.mark.parametrize(
    ("dtype", "value", "limit"),
    [(np.float32, 1e300, "3.403e\\+38"), (np.float16, 7e4, "6.55e\\+04")],
)
def test_values_that_overflow_the_models_dtype_are_refused_by_key(tmp_path, dtype, value, limit):
    tensors = good_tensors()
    tensors[KEY.format("2", "B")][1, 0] = -value
    directory = write(tmp_path / "big", good_config(), tensors)
    name = np.dtype(dtype).name
    match = rf"{re.escape(KEY.format('2', 'B'))}.*{re.escape(f'{value:.4g}')}.*{name}.*{limit}"
    for model in (
        nn.MLP([8, 16, 4], seed=0, dtype=dtype),
        inject_lora(nn.MLP([8, 16, 4], seed=0, dtype=dtype), ["0", "2"], r=2, alpha=4),
    ):
        refused(model, directory, ValueError, match)
    tensors[KEY.format("2", "B")][1, 0] = float(np.finfo(dtype).max) / 2  # fits: loads
    load_adapter(
        nn.MLP([8, 16, 4], seed=0, dtype=dtype), write(tmp_path / "ok", good_config(), tensors)
    )


def test_overflow_is_refused_for_a_float16_torch_model(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("loralab.torch")  # registers the torch backend
    tensors = good_tensors()
    tensors[KEY.format("0", "A")][0, 0] = 1e6
    directory = write(tmp_path / "big", good_config(), tensors)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = model.half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"0\.lora_A\.weight.*1e\+06.*float16"):
        load_adapter(model, directory)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
