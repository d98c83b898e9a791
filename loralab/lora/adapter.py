"""The adapter file format of HF PEFT, written once for NumPy and torch models alike.

A saved adapter is a directory with two files:

``adapter_config.json``
    ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` (the full
    module paths), ``bias: "none"``, ``fan_in_fan_out: false``, ``use_rslora``, ``use_dora``,
    ``init_lora_weights``, ``rank_pattern``/``alpha_pattern`` (layers whose r or alpha differ) ...
``adapter_model.safetensors``
    ``base_model.model.<module path>.lora_A.weight`` of shape (r, in) and
    ``base_model.model.<module path>.lora_B.weight`` of shape (out, r); with DoRA
    (``use_dora: true``) also ``base_model.model.<module path>.lora_magnitude_vector`` of shape (out,).

Files are written to a temporary name and renamed into place (never half-written) and read with
safetensors (never pickle). The model-specific part (which layers exist, how to read and write
their arrays) is a small "backend": this module's NumPy one, or the torch one that
`loralab.torch` supplies, so both kinds of model share this single implementation.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from loralab.nn import Linear, LoRALinear, Module
from loralab.nn.lora import lora_scaling

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "write_adapter",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
_MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, shape (out,); PEFT's key has no ".weight"
_PEFT_TO_INIT = {"pissa": "pissa", "olora": "olora"}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


class NumpyBackend:
    """How the adapter format reads and writes a `loralab.nn.Module`."""

    def lora_layers(self, model: Module) -> list[tuple[str, Any]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

    def linear_shape(self, model: Module, path: str) -> tuple[int, int] | None:
        """(out, in) of the Linear or LoRALinear at ``path``; None if there is none."""
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(module, (Linear, LoRALinear)):
            return module.out_features, module.in_features
        return None

    def linear_names(self, model: Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, (Linear, LoRALinear))]

    def get(self, layer: Any, name: str) -> np.ndarray:
        return getattr(layer, name).data

    def set(self, layer: Any, name: str, value: np.ndarray) -> None:
        param = getattr(layer, name)
        param.data = np.ascontiguousarray(value, dtype=param.dtype)

    def attach(self, model: Module, path: str, options: dict[str, Any]) -> Any:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        layer = LoRALinear(getattr(owner, child), **options)
        setattr(owner, child, layer)
        return layer

    def freeze_base(self, model: Module) -> None:
        for name, p in model.named_parameters():
            p.requires_grad = ".lora_" in f".{name}"


def _backend(model: Any) -> Any:
    if isinstance(model, Module):
        return NumpyBackend()
    if type(model).__module__.startswith("torch") or hasattr(model, "state_dict"):
        from loralab.torch.adapter_backend import (
            TorchBackend,  # torch only when given a torch model
        )

        return TorchBackend()
    raise TypeError(
        f"expected a loralab.nn.Module or a torch.nn.Module, got {type(model).__name__}"
    )


# ----- writing ------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> Path:
    """Write ``config`` and ``tensors`` (already keyed in PEFT's format) into ``directory``, atomically."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _atomic_write(
        directory / WEIGHTS_NAME, lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"})
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def adapter_config(layers: list[tuple[str, Any]]) -> dict[str, Any]:
    """The ``adapter_config.json`` contents describing ``layers`` [(path, LoRA layer)]."""
    r = _most_common([layer.r for _, layer in layers])
    alpha = _most_common([layer.alpha for _, layer in layers])
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    init = _most_common([getattr(layer, "init", "kaiming") for _, layer in layers])
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([float(layer.dropout) for _, layer in layers]),
        "target_modules": sorted(name for name, _ in layers),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": bool(_most_common([bool(layer.use_rslora) for _, layer in layers])),
        "use_dora": bool(
            _most_common([bool(getattr(layer, "use_dora", False)) for _, layer in layers])
        ),
        "init_lora_weights": _INIT_TO_PEFT.get(init, init),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {name: layer.r for name, layer in layers if layer.r != r},
        "alpha_pattern": {name: layer.alpha for name, layer in layers if layer.alpha != alpha},
        "lora_bias": False,
    }


def save_adapter(model: Any, directory: str | os.PathLike) -> Path:
    """Save the LoRA adapter of ``model`` (NumPy or torch) in HF PEFT's format.

    Parameters
    ----------
    model : loralab.nn.Module or torch.nn.Module
        With LoRA layers (see `loralab.lora.inject_lora`); merged layers are saved as well
        (A and B do not change on merging).
    directory : path
        Created if missing; ``adapter_config.json`` and ``adapter_model.safetensors`` are written
        into it atomically.

    Returns
    -------
    Path of the directory.
    """
    backend = _backend(model)
    layers = backend.lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers; call inject_lora first")
    tensors = {}
    for path, layer in layers:
        for suffix, attr in _SUFFIXES.items():
            tensors[f"{PREFIX}{path}{suffix}"] = np.asarray(backend.get(layer, attr))
        if getattr(layer, "use_dora", False):
            tensors[f"{PREFIX}{path}{_MAGNITUDE}"] = np.asarray(backend.get(layer, _MAGNITUDE[1:]))
    return write_adapter(directory, adapter_config(layers), tensors)


# ----- reading -----------------------------------------------------------------------------------
_UNSUPPORTED = {  # field: (value that is fine, why)
    "bias": ("none", "trained biases"),
    "modules_to_save": (None, "fully trained extra modules"),
    "fan_in_fan_out": (False, "transposed (Conv1D) weights"),
    "lora_bias": (False, "a bias on lora_B"),
    "layers_to_transform": (None, "layer selection by index"),
    "layers_pattern": (None, "layer selection by pattern"),
    "layer_replication": (None, "replicated layers"),
    "trainable_token_indices": (None, "trainable token embeddings"),
    "target_parameters": (None, "LoRA on raw parameters"),
    "use_qalora": (False, "quantisation-aware LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "exclude_modules": (None, "excluded modules"),
}


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check an adapter directory: (config, tensors keyed as in the file). No pickle."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(
            f"load_adapter: adapter directory {str(directory)!r} does not exist"
        )
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_adapter: {str(p)!r} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapter: {str(config_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {str(config_path)!r} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"load_adapter: peft_type must be 'LORA', got {config.get('peft_type')!r} in {str(config_path)!r}"
        )
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(f"load_adapter: {str(config_path)!r} has no field {field!r}")
    for field, (fine, what) in _UNSUPPORTED.items():
        value = config.get(field)
        if value not in (fine, None) and value != [] and value != {}:
            raise ValueError(
                f"load_adapter: unsupported {field}={value!r} in {str(config_path)!r}: loralab does not "
                f"support {what} (expected {field}={fine!r})"
            )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"load_adapter: cannot read {str(weights_path)!r}: {exc}") from exc
    return config, tensors


def _split_key(key: str) -> tuple[str, str]:
    for suffix, attr in {**_SUFFIXES, _MAGNITUDE: _MAGNITUDE[1:]}.items():
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX) : -len(suffix)], attr
    raise ValueError(
        f"load_adapter: unexpected tensor {key!r}; expected '{PREFIX}<module path>.lora_A.weight', "
        "'.lora_B.weight' or '.lora_magnitude_vector'"
    )


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the path or a dotted suffix of it."""
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def load_adapter(model: Any, directory: str | os.PathLike) -> Any:
    """Load a PEFT-format LoRA adapter into ``model`` (NumPy or torch), all or nothing.

    If ``model`` has no LoRA layers yet, adapters are attached to the modules the file names, with
    the file's r, alpha, dropout and rsLoRA setting. If it has them, the file must cover exactly
    those layers with the same ranks; alpha and rsLoRA scaling are taken from the file.

    Parameters
    ----------
    model : loralab.nn.Module or torch.nn.Module
    directory : path
        Holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns
    -------
    The same ``model``.

    Raises
    ------
    FileNotFoundError
        A missing directory or file.
    ValueError
        A corrupt file, an unsupported feature (naming the config field), a tensor for a module the
        model lacks, or a shape that does not fit (naming the key and both shapes). The model is
        left unchanged.
    """
    backend = _backend(model)
    config, tensors = read_adapter(directory)
    by_path: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        path, attr = _split_key(key)
        by_path.setdefault(path, {})[attr] = value
    existing = dict(backend.lora_layers(model))
    if existing and set(existing) != set(by_path):
        raise ValueError(
            f"load_adapter: the file has adapters for {sorted(by_path)} but the model has LoRA layers "
            f"{sorted(existing)}"
        )
    use_dora = bool(config.get("use_dora", False))
    plan = []
    for path, pair in sorted(by_path.items()):
        for attr in _SUFFIXES.values():
            if attr not in pair:
                raise ValueError(
                    f"load_adapter: {PREFIX}{path}.{attr}.weight is missing from the file"
                )
        shape = backend.linear_shape(model, path)
        if shape is None:
            raise ValueError(
                f"load_adapter: the file has {PREFIX}{path}.lora_A.weight but the model has no Linear "
                f"module {path!r}; its Linear modules are {backend.linear_names(model)}"
            )
        out_f, in_f = shape
        r = pair["lora_A"].shape[0] if pair["lora_A"].ndim == 2 else -1
        if path in existing:
            r = existing[path].r
        expected = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        magnitude = _MAGNITUDE[1:]
        if use_dora != (magnitude in pair):
            raise ValueError(
                f"load_adapter: config has use_dora={use_dora} but {PREFIX}{path}{_MAGNITUDE} is "
                f"{'present in' if magnitude in pair else 'missing from'} the file"
            )
        if path in existing and bool(getattr(existing[path], "use_dora", False)) != use_dora:
            raise ValueError(
                f"load_adapter: config has use_dora={use_dora} but the model's layer {path!r} has "
                f"use_dora={not use_dora}"
            )
        if use_dora:
            expected[magnitude] = (out_f,)
        for attr, want in expected.items():
            got = tuple(pair[attr].shape)
            if got != want:
                key = f"{PREFIX}{path}.{attr}" + ("" if attr == magnitude else ".weight")
                raise ValueError(
                    f"load_adapter: tensor {key} has shape {got} but the model expects {want}"
                )
        file_r = _pattern_value(config.get("rank_pattern") or {}, path, config["r"])
        if file_r != r:
            raise ValueError(
                f"load_adapter: config gives r={file_r} for {path!r} but its tensors have rank {r}"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
        plan.append((path, pair, r, float(alpha)))

    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    for path, pair, r, alpha in plan:
        layer = existing.get(path)
        if layer is None:
            options = {
                "r": r,
                "alpha": alpha,
                "dropout": dropout,
                "use_rslora": use_rslora,
                "use_dora": use_dora,
                # PiSSA/OLoRA adapters were trained on the residual W0 - s B0 A0: split W0 again,
                # as PEFT does on loading, before the file's A and B replace B0 and A0.
                "init": _PEFT_TO_INIT.get(str(config.get("init_lora_weights")), "kaiming"),
                "seed": 0,
            }
            layer = backend.attach(model, path, options)
        layer.alpha, layer.use_rslora = alpha, use_rslora
        layer.scaling = lora_scaling(alpha, r, use_rslora)
        for attr in pair:
            backend.set(layer, attr, pair[attr])
    if not existing:
        backend.freeze_base(model)
    return model
