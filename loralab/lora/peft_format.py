"""The adapter file format of HF PEFT, written once for NumPy and torch models alike.

A saved adapter is a directory with two files:

``adapter_config.json``
    `loralab.lora.LoraConfig.to_dict`: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules`` (the full module paths), ``bias: "none"``,
    ``use_rslora``, ``use_dora``, ``init_lora_weights``, ``rank_pattern``/``alpha_pattern``
    (layers whose r or alpha differ, keys matched as PEFT's regular expressions) ...
``adapter_model.safetensors``
    ``base_model.model.<module path>.lora_A.weight`` of shape (r, in) and
    ``base_model.model.<module path>.lora_B.weight`` of shape (out, r); with DoRA
    (``use_dora: true``) also ``base_model.model.<module path>.lora_magnitude_vector`` of shape (out,).
    An embedding (`loralab.lora.LoRAEmbedding`) has ``base_model.model.<module path>.lora_embedding_A``
    of shape (r, num_embeddings) and ``.lora_embedding_B`` of shape (embedding_dim, r), no ``.weight``.

Saving writes both files into a temporary folder that then replaces the destination in one
step (`loralab.fileio.atomic_directory`); loading opens both files from one version of the
folder (`loralab.fileio.open_together`). So a reader never sees new weights beside an old
config, even while another process saves; a save killed at any moment leaves the old adapter
or the new one; two saves to one folder at once run one after the other. A symbolic link to an
adapter folder is followed: the folder it points to is replaced, the link kept.

Loading is all or nothing, in three steps: (1) read the config and only the *header* of the
safetensors file (8-byte little-endian length, then JSON) and check every key, dtype and shape
against the whole model; (2) read just the declared tensors (their byte ranges, never pickle)
and check that they are finite and stay finite once cast to the model's dtype; (3) only then
change the model. A refused load leaves every array, flag and module of the model as it was.

The model-specific part (which layers exist, how to read and write their arrays) is a small
`loralab.lora.backend.Backend`: the NumPy one, or the torch one that `loralab.torch` registers,
so both kinds of model share this single implementation.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loralab.fileio import atomic_directory
from loralab.lora.backend import backend_for
from loralab.lora.config import INIT_TO_PEFT, LoraConfig, check_rank_fits, lora_scaling
from loralab.lora.embedding_layer import LoRAEmbeddingMixin, validate_embedding_options
from loralab.lora.inject import active_names, adapter_names_of, check_called, stored_transposed
from loralab.lora.linear_shared import DEFAULT_ADAPTER, check_adapter_name
from loralab.lora.peft_read import (
    _EMBEDDING,
    _MAGNITUDE,
    _SUFFIXES,
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    TensorSpec,
    _open_adapter,
    _split_key,
    read_adapter,
    read_config,
    read_header,
    read_tensors,
)
from loralab.lora.variants import INITS

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "write_adapter",
    "write_adapters",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]


_KEEP_ON_SAVE = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}  # what save_adapter may replace


# ----- writing ------------------------------------------------------------------------------------
def write_adapter(
    directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, np.ndarray]
) -> Path:
    """Write ``config`` and ``tensors`` (keyed in PEFT's format) as the folder ``directory``.

    Both files are written into a temporary sibling folder that then replaces ``directory`` in
    one step; files get mode 0644; temporaries of an interrupted earlier save are removed.
    """
    return write_adapters(directory, {DEFAULT_ADAPTER: (config, tensors)})


def write_adapters(
    directory: str | os.PathLike, adapters: dict[str, tuple[LoraConfig, dict[str, np.ndarray]]]
) -> Path:
    """Write several adapters in PEFT's layout, as one folder replaced in one step: "default" in
    ``directory`` itself, every other adapter in the sub-folder ``directory/<name>``."""
    import safetensors.numpy

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        for name, (config, tensors) in adapters.items():
            folder = tmp if name == DEFAULT_ADAPTER else tmp / name
            folder.mkdir(exist_ok=True)
            arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
            weights = str(folder / WEIGHTS_NAME)
            safetensors.numpy.save_file(arrays, weights, metadata={"format": "pt"})
            text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
            (folder / CONFIG_NAME).write_text(text, encoding="utf-8")
    return directory


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def adapter_config(layers: list[tuple[str, Any]]) -> LoraConfig:
    """The `LoraConfig` describing ``layers`` [(path, LoRA layer)]: the most common r and alpha,
    the others in ``rank_pattern``/``alpha_pattern`` (keys: full paths, which PEFT's rule
    matches exactly)."""
    r = _most_common([layer.r for _, layer in layers])
    alpha = _most_common([layer.alpha for _, layer in layers])
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    init = _most_common([getattr(layer, "init", "kaiming") for _, layer in layers])
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=_most_common([float(layer.dropout) for _, layer in layers]),
        target_modules=tuple(sorted(name for name, _ in layers)),
        use_rslora=bool(_most_common([bool(layer.use_rslora) for _, layer in layers])),
        use_dora=bool(_most_common([layer.use_dora for _, layer in layers])),
        init_lora_weights=INIT_TO_PEFT.get(init, init),
        rank_pattern={name: layer.r for name, layer in layers if layer.r != r},
        fan_in_fan_out=all(stored_transposed(layer) for _, layer in layers),
        alpha_pattern={name: layer.alpha for name, layer in layers if layer.alpha != alpha},
    )


def save_adapter(model: Any, directory: str | os.PathLike) -> Path:
    """Save the LoRA adapters of ``model`` (NumPy or torch) in HF PEFT's format and layout.

    Adapter "default" goes into ``directory`` itself, every other named adapter into the
    sub-folder ``directory/<name>`` (as PEFT's ``save_pretrained``), each with its own
    ``adapter_config.json`` and ``adapter_model.safetensors``, so PEFT loads each with
    ``PeftModel.from_pretrained(base, directory)`` / ``load_adapter(directory/<name>, adapter_name=<name>)``.

    Parameters
    ----------
    model : loralab.nn.Module or torch.nn.Module
        With LoRA layers (see `loralab.lora.inject_lora`); merged layers are saved as well
        (A and B do not change on merging).
    directory : path
        The adapters' folder, created if missing. It is replaced as a whole (configs and weights
        together, never a mix of old and new); an existing folder may hold only previous
        adapters (``adapter_config.json``, ``adapter_model.safetensors``, PEFT's ``README.md``,
        and sub-folders holding only those). A symbolic link is followed: the folder it points
        to is replaced and the link stays.

    Returns
    -------
    Path of the directory.

    Notes
    -----
    What a save guarantees (`loralab.fileio.atomic_directory`): a process loading the folder at
    the same moment gets the old adapter or the new one, whole; a save killed at any point
    leaves the old adapter or the new one (a folder set aside by a killed save is put back by
    the next save or load); two saves to one folder at once run one after the other. Every file
    has mode 0644, every folder 0755.

    Raises
    ------
    ValueError
        The model has no LoRA layers.
    FileExistsError
        ``directory`` is a file, or a folder holding other files (they would be lost).
    FileNotFoundError
        ``directory`` is a symbolic link to nothing.
    loralab.fileio.ConcurrentSaveError
        Another process kept saving beside ``directory`` for a minute.
    OSError
        The new adapter is in place but the old folder could not be removed (the message says
        where it was left).
    """
    backend = backend_for(model, "save_adapter")
    layers = backend.lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers; call inject_lora first")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            f"save_adapter: {str(directory)!r} exists and is a file; an adapter is a folder"
        )
    if directory.is_dir():
        others = sorted(
            entry
            for entry in set(os.listdir(directory)) - _KEEP_ON_SAVE
            if not (
                (directory / entry).is_dir() and set(os.listdir(directory / entry)) <= _KEEP_ON_SAVE
            )
        )
        if others:
            raise FileExistsError(
                f"save_adapter: the folder {str(directory)!r} holds other files {others}; saving "
                "replaces the folder as a whole, so choose a new or adapter-only folder"
            )
    adapters = {}
    for name in adapter_names_of(layers):
        holders = list(_holders(dict(layers), name).items())
        tensors = {}
        for path, holder in holders:
            for suffix, attr in _layer_suffixes(holder).items():
                tensors[f"{PREFIX}{path}{suffix}"] = np.asarray(backend.get(holder, attr))
        adapters[name] = (adapter_config(holders), tensors)
    return write_adapters(directory, adapters)


def _layer_suffixes(layer: Any) -> dict[str, str]:
    """Key suffix -> attribute for the tensors of one LoRA layer, as PEFT names them."""
    if isinstance(layer, LoRAEmbeddingMixin):
        return dict(_EMBEDDING)
    # DoRA's lora_magnitude_vector: no ".weight" in PEFT's key either
    return {**_SUFFIXES, **{f".{name}": name for name in layer.kind.extra_names}}


# ----- loading: plan everything, then apply ---------------------------------------------------------
@dataclass
class _LayerPlan:
    path: str
    keys: dict[str, str]  # attribute ("lora_A", ...) -> tensor key
    r: int
    alpha: float


def _holders(layers: dict[str, Any], adapter_name: str) -> dict[str, Any]:
    """{path: the holder of adapter ``adapter_name``} over the LoRA layers that have it (a layer
    kind without named adapters, the embedding's, holds "default" itself)."""
    out = {}
    for path, layer in layers.items():
        if adapter_name in getattr(layer, "adapter_names", [DEFAULT_ADAPTER]):
            out[path] = layer.adapter(adapter_name) if hasattr(layer, "adapter") else layer
    return out


def _plan(
    backend: Any,
    model: Any,
    config: LoraConfig,
    specs: list[TensorSpec],
    adapter_name: str = DEFAULT_ADAPTER,
) -> list[_LayerPlan]:
    """Check the whole file against the whole model; change nothing. Returns what to apply."""
    if not specs:
        raise ValueError("load_adapter: the adapter has no tensors")
    by_path: dict[str, dict[str, TensorSpec]] = {}
    for spec in specs:
        path, attr = _split_key(spec.key)
        by_path.setdefault(path, {})[attr] = spec
    layers = dict(backend.lora_layers(model))
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"load_adapter: the model's LoRA layers {merged} are merged into W0; unmerge first "
            "(unmerge_lora), load, then merge again"
        )
    for path, found in sorted(by_path.items()):
        # A module inside a LoRA layer (its base, another adapter's A): LoRA on it would do
        # nothing until merged and then change the outputs. So would a file nesting its own targets.
        outer = [p for p in (*layers, *by_path) if path.startswith(p + ".")]
        if outer:
            key = next(iter(found.values())).key
            inside = (
                f"the LoRA layer {outer[0]!r}"
                if outer[0] in layers
                else f"{outer[0]!r}, which the file adapts as well"
            )
            raise ValueError(
                f"load_adapter: tensor {key} targets {path!r}, a module inside {inside}; an "
                "adapter's keys name the adapted module itself "
                f"('{PREFIX}{outer[0]}.lora_A.weight')"
            )
    existing = _holders(layers, adapter_name)
    if existing and set(existing) != set(by_path):
        raise ValueError(
            f"load_adapter: the file has adapters for {sorted(by_path)} but the model has LoRA "
            f"layers {sorted(existing)} for adapter {adapter_name!r}"
        )
    adding = bool(layers) and not existing  # a new named adapter beside the model's others
    magnitude = _MAGNITUDE[1:]
    plans = []
    for path, found in sorted(by_path.items()):
        if set(found) & set(_EMBEDDING.values()):
            if adding and path in layers:  # a LoRAEmbedding holds one adapter
                raise ValueError(
                    f"load_adapter: the embedding {path!r} holds the adapter "
                    f"{layers[path].adapter_names} already; a second one is not supported yet"
                )
            plans.append(_plan_embedding(backend, model, config, path, found, existing.get(path)))
            continue
        for attr in _SUFFIXES.values():
            if attr not in found:
                raise ValueError(
                    f"load_adapter: {PREFIX}{path}.{attr}.weight is missing from the file"
                )
        if config.use_dora != (magnitude in found):
            raise ValueError(
                f"load_adapter: config has use_dora={config.use_dora} but {PREFIX}{path}{_MAGNITUDE} is "
                f"{'present in' if magnitude in found else 'missing from'} the file"
            )
        shape = backend.linear_shape(model, path)
        if shape is None:
            raise ValueError(
                f"load_adapter: the file has {PREFIX}{path}.lora_A.weight but the model has no Linear "
                f"module {path!r}; its Linear modules are {backend.linear_names(model)}"
            )
        out_f, in_f = shape
        layer = existing.get(path)
        a_shape = found["lora_A"].shape
        r = layer.r if layer is not None else (a_shape[0] if len(a_shape) == 2 else -1)
        expected: dict[str, tuple[int, ...]] = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        if config.use_dora:
            expected[magnitude] = (out_f,)
        for attr, want in expected.items():
            if found[attr].shape != want:
                raise ValueError(
                    f"load_adapter: tensor {found[attr].key} has shape {found[attr].shape} but the "
                    f"model expects {want}"
                )
        file_r = config.rank_for(path)
        if file_r != r:
            raise ValueError(
                f"load_adapter: config gives r={file_r} for {path!r} but its tensors have rank {r}"
            )
        check_rank_fits(r, in_f, out_f, f"load_adapter: layer {path!r} (out={out_f}, in={in_f})")
        if layer is not None:
            _check_compatible(layer, path, config)
        elif adding and path in layers and INITS[config.init].moves_W0:
            raise ValueError(
                f"load_adapter: init_lora_weights={config.init_lora_weights!r} replaces W0 by a "
                f"residual, which would change the adapters {layers[path].adapter_names} at {path!r}; "
                "load it into a model without LoRA layers instead"
            )
        elif (config.use_dora or INITS[config.init].moves_W0) and not backend.holds_W0(model, path):
            raise ValueError(
                f"load_adapter: use_dora={config.use_dora}, init_lora_weights="
                f"{config.init_lora_weights!r} need W0 itself, which the base at {path!r} "
                f"({type(model.get_submodule(path)).__name__}) does not hold"
            )
        plans.append(
            _LayerPlan(path, {a: s.key for a, s in found.items()}, r, config.alpha_for(path))
        )
    return plans


def _plan_embedding(
    backend: Any,
    model: Any,
    config: LoraConfig,
    path: str,
    found: dict[str, TensorSpec],
    layer: Any,
) -> _LayerPlan:
    """Check an embedding's ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B``
    (embedding_dim, r) against the model's Embedding (or LoRAEmbedding) at ``path``."""
    for attr in _EMBEDDING.values():
        if attr not in found:
            raise ValueError(f"load_adapter: {PREFIX}{path}.{attr} is missing from the file")
    if set(found) != set(_EMBEDDING.values()):
        raise ValueError(
            f"load_adapter: the file mixes an embedding's and a linear layer's tensors for {path!r}: "
            f"{sorted(s.key for s in found.values())}"
        )
    kinds = (*backend.embedding_types(), *backend.lora_types())
    module = dict(model.named_modules()).get(path)
    if not isinstance(module, kinds) or not hasattr(module, "num_embeddings"):
        names = [n for n, m in model.named_modules() if isinstance(m, backend.embedding_types())]
        raise ValueError(
            f"load_adapter: the file has {PREFIX}{path}.lora_embedding_A but the model has no "
            f"Embedding module {path!r}; its Embedding modules are {names}"
        )
    n, d = module.num_embeddings, module.embedding_dim
    a_shape = found["lora_embedding_A"].shape
    r = layer.r if layer is not None else (a_shape[0] if len(a_shape) == 2 else -1)
    expected = {"lora_embedding_A": (r, n), "lora_embedding_B": (d, r)}
    for attr, want in expected.items():
        if found[attr].shape != want:
            raise ValueError(
                f"load_adapter: tensor {found[attr].key} has shape {found[attr].shape} but the "
                f"model expects {want}"
            )
    if config.rank_for(path) != r:
        raise ValueError(
            f"load_adapter: config gives r={config.rank_for(path)} for {path!r} but its tensors "
            f"have rank {r}"
        )
    o = config.layer_options(
        path
    )  # DoRA, PiSSA, OLoRA on an embedding: refused here, before any change
    validate_embedding_options(
        n, d, o["r"], o["alpha"], o["dropout"], o["init"], o["use_rslora"], o["use_dora"]
    )
    return _LayerPlan(path, {a: s.key for a, s in found.items()}, r, config.alpha_for(path))


def _check_compatible(layer: Any, path: str, config: LoraConfig) -> None:
    """An existing layer must be the kind of layer the file was trained on."""
    if config.fan_in_fan_out and not stored_transposed(layer):
        raise ValueError(
            f"load_adapter: the adapter has fan_in_fan_out=True (trained on weights stored "
            f"transposed, GPT-2's Conv1D) but the model's layer {path!r} is not one"
        )
    if bool(getattr(layer, "use_dora", False)) != config.use_dora:
        raise ValueError(
            f"load_adapter: config has use_dora={config.use_dora} but the model's layer {path!r} has "
            f"use_dora={not config.use_dora}"
        )
    init = layer.init
    if (INITS[init].moves_W0 or INITS[config.init].moves_W0) and (
        init != config.init or layer.scaling != config.scaling_for(path)
    ):
        raise ValueError(
            f"load_adapter: layer {path!r} was built with init={init!r} (scaling {layer.scaling:g}) but "
            f"the file has init_lora_weights={config.init_lora_weights!r} (scaling "
            f"{config.scaling_for(path):g}); its frozen W0 holds a different residual. Load into a "
            "model without LoRA layers instead"
        )


def _dtype_of(param: Any) -> np.dtype | None:
    """A NumPy or torch parameter's dtype as a NumPy dtype (None for one NumPy lacks: bfloat16)."""
    dtype = param.dtype
    try:
        return np.dtype(dtype)
    except TypeError:
        try:
            return np.dtype(str(dtype).removeprefix("torch."))
        except TypeError:
            return None


def _check_fit(
    backend: Any, model: Any, plans: list[_LayerPlan], tensors: dict[str, Any], adapter_name: str
) -> None:
    """Every value must stay finite once cast to the dtype it will be stored in: the existing
    adapter's, else the base's W0's (a 4-bit base: its compute dtype). Changes nothing."""
    existing = _holders(dict(backend.lora_layers(model)), adapter_name)
    for plan in plans:
        holder = existing.get(plan.path)
        if holder is not None:
            dtype = _dtype_of(getattr(holder, next(iter(plan.keys))))
        else:
            module = model.get_submodule(plan.path)
            base = getattr(module, "base", module)  # a LoRA layer holding other adapters
            weight = getattr(base, "weight", None)
            dtype = (
                _dtype_of(weight)
                if weight is not None
                else np.dtype(getattr(base, "compute_dtype", np.float32))
            )
        if dtype is None or dtype.kind != "f":
            continue
        largest = float(np.finfo(dtype).max)
        for key in plan.keys.values():
            value = tensors[key]
            peak = float(np.abs(value).max()) if value.size else 0.0
            if peak > largest:
                raise ValueError(
                    f"load_adapter: tensor {key} holds a value of magnitude {peak:.4g}, beyond "
                    f"{dtype.name}'s largest {largest:.4g} (the model's dtype at {plan.path!r}): "
                    f"cast to {dtype.name} it would become inf"
                )


def load_adapter(
    model: Any, directory: str | os.PathLike, *, adapter_name: str = DEFAULT_ADAPTER
) -> Any:
    """Load a PEFT-format LoRA adapter into ``model`` (NumPy or torch) as ``adapter_name``, all or nothing.

    If ``model`` has no LoRA layers yet, adapters are attached to the modules the file names, with
    the file's r, alpha (``rank_pattern``/``alpha_pattern`` matched as PEFT does), dropout,
    rsLoRA, DoRA and init (PiSSA/OLoRA split W0 again, as PEFT does); it is the active adapter.
    If the model has an adapter ``adapter_name``, the file must cover exactly its layers with the
    same ranks and kinds; alpha and the rsLoRA scaling are taken from the file (dropout stays the
    layer's). If the model has other adapters only, the file's adapter is added beside them
    (PEFT's ``load_adapter(path, adapter_name=...)``), inactive and frozen until
    `loralab.lora.set_adapter` selects it; a folder saved with several adapters keeps each one
    but "default" in a sub-folder named after it (`save_adapter`).

    Loading into a merged model is refused ("unmerge first"): the file's ΔW would replace A and B
    while W0 still holds the old ΔW.

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
    TypeError
        A config field of the wrong JSON type (naming the file, the field and the value).
    ValueError
        A corrupt file, a wrong config value, an unsupported feature (naming the config field), a
        tensor for a module the model lacks or for a module inside a LoRA layer, a tensor of the
        wrong shape or dtype, NaN or inf, a value beyond the range of the model's dtype (naming
        the key, the value and the dtype's largest), or an ``adapter_name`` that is not one safe
        path component (`loralab.lora.linear_shared.check_adapter_name`).
        In every case the model is left exactly as it was.
    loralab.fileio.ConcurrentSaveError
        Another process kept replacing ``directory`` for 2 seconds. While a save is swapping the
        folder, a load waits and retries; it never reads the config of one save with the
        weights of another.
    """
    backend = backend_for(model, "load_adapter")
    check_adapter_name(adapter_name, "load_adapter")
    with _open_adapter(directory) as (config_file, weights_file, config_path, weights_path):
        config = read_config(config_file, config_path)
        specs = read_header(weights_file, weights_path)
        plans = _plan(backend, model, config, specs, adapter_name)
        for plan in plans:  # a table the model reads directly would ignore the adapter
            check_called(model, plan.path, "load_adapter")
        tensors = read_tensors(weights_file, weights_path, specs)
    _check_fit(backend, model, plans, tensors, adapter_name)
    layers = dict(backend.lora_layers(model))
    existing = _holders(layers, adapter_name)
    adding = bool(layers) and not existing
    active = active_names(list(layers.items()))
    for plan in plans:  # nothing below can fail on a checked file: the model changes from here on
        layer = existing.get(plan.path)
        if layer is None:
            # With the file's init: PiSSA/OLoRA adapters were trained on the residual
            # W0 - s B0 A0, so W0 is split again (as PEFT does on loading) before the file's A
            # and B replace B0 and A0.
            options = config.layer_options(plan.path)
            owner = layers.get(plan.path)
            if owner is not None:  # a LoRA layer with other adapters: this one goes beside them
                owner.add_adapter(adapter_name, rng=np.random.default_rng(0), **options)
                layer = owner.adapter(adapter_name)
            else:
                named = {**options, "seed": 0, "adapter_name": adapter_name}
                layer = backend.attach(model, plan.path, named)
                if adding:
                    layer.active_adapter_names = list(active)
            if adding:
                for attr in plan.keys:
                    backend.set_trainable(getattr(layer, attr), False)
        layer.alpha, layer.use_rslora = plan.alpha, config.use_rslora
        layer.scaling = lora_scaling(plan.alpha, plan.r, config.use_rslora)
        for attr, key in plan.keys.items():
            backend.set(layer, attr, tensors[key])
    if not layers:
        backend.freeze_base(model)
    return model
