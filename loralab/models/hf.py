"""Hugging Face model folders in and out: `from_pretrained` and `save_pretrained`.

A model folder on the hub (or saved by ``transformers``) holds

``config.json``
    the architecture: ``model_type`` ("gpt2", "llama", ...) and its sizes;
``model.safetensors``
    every weight: an 8-byte little-endian header length n, n bytes of JSON naming each tensor's
    dtype, shape and byte range, then the raw bytes (no pickle, nothing to execute); a large
    model is split into shards listed by ``model.safetensors.index.json``
    (``{"weight_map": {tensor name: shard file}}``);
``tokenizer.json``
    the tokenizer (`loralab.tokenizer.BPETokenizer`), when there is one.

`from_pretrained` reads them and builds the model of its family on loralab's engine, with the
checkpoint's own module names (`loralab.models.gpt2`, `loralab.models.llama`): a PEFT
``LoraConfig`` or adapter written for the model works unchanged. Weights stored as bfloat16
(most LLaMA checkpoints) are widened to float32 exactly (a bfloat16 is the top half of a
float32), then cast to ``dtype``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loralab.fileio import atomic_directory

__all__ = ["from_pretrained", "save_pretrained", "read_safetensors", "safetensors_header"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MAX_HEADER = 100 * 2**20


#: model_type -> the module that builds that family (``from_hf``) and writes it back (``to_hf``).
FAMILIES = {
    "gpt2": "loralab.models.gpt2",
    "llama": "loralab.models.llama",
    "mistral": "loralab.models.llama",
}


def safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}} (no data read).

    ``__metadata__`` (strings, such as {"format": "pt"}) is left out.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(path)!r} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{str(path)!r}: the header claims {n} bytes, the file has {size - 8}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as a NumPy array (bfloat16 widened to float32).

    The file is memory-mapped: arrays are read from disk as they are used, and a bfloat16 tensor
    becomes float32 by putting its 16 bits in the top half of a 32-bit word.
    """
    path = Path(path)
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    tensors = {}
    for name, entry in header.items():
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(
                f"{str(path)!r}: tensor {name} has dtype {dtype!r}; supported: {list(_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != math.prod(shape) * itemsize or end > data.size:
            raise ValueError(
                f"{str(path)!r}: tensor {name}'s byte range does not fit its shape {shape}"
            )
        raw = data[begin:end].view(np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        if dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.reshape(shape)
    return tensors


def _resolve(path_or_id: str | os.PathLike) -> Path:
    """A local folder as it is; a hub id ("gpt2", "org/name") downloaded with huggingface_hub."""
    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        return folder
    name = str(path_or_id)
    looks_local = folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local or "\\" in name:
        raise FileNotFoundError(f"from_pretrained: {name!r} is not a model folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"from_pretrained: {name!r} is not a folder here, and huggingface_hub (which downloads "
            "hub models) is not installed: pip install huggingface_hub, or download the folder "
            "yourself and pass its path"
        ) from None
    patterns = [CONFIG, WEIGHTS, INDEX, "model-*.safetensors", TOKENIZER]
    try:  # huggingface_hub shows its own progress bar per file
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown id, no access: say what to do
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            how = "HF_HUB_OFFLINE=1 is set: unset it on a machine that is online"
        else:
            how = "Check the id and your connection"
        raise FileNotFoundError(
            f"from_pretrained: could not get {name!r} from the Hugging Face hub "
            f"({type(exc).__name__}). {how}, or download the folder elsewhere "
            f"(huggingface-cli download {name} --include '*.json' '*.safetensors') and pass its "
            "path."
        ) from None


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    if (folder / WEIGHTS).is_file():
        return read_safetensors(folder / WEIGHTS)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            part = read_safetensors(folder / shard)
            wrong = [k for k in part if index["weight_map"].get(k) != shard]
            if wrong:
                raise ValueError(
                    f"{INDEX}: tensor {wrong[0]!r} is in {shard} but the index says otherwise"
                )
            tensors.update(part)
        missing = sorted(set(index["weight_map"]) - set(tensors))
        if missing:
            raise ValueError(f"{INDEX} lists {missing[0]!r}, which no shard holds")
        return tensors
    raise FileNotFoundError(
        f"from_pretrained: {str(folder)!r} has neither {WEIGHTS} nor {INDEX} "
        "(only safetensors checkpoints are read: no pickle)"
    )


def from_pretrained(path_or_id: str | os.PathLike, *, dtype: Any = np.float32) -> Any:
    """The model of a Hugging Face folder (or hub id) on loralab's engine.

    Parameters
    ----------
    path_or_id : str or path
        A folder with config.json and model.safetensors (or a sharded index), or a hub id such
        as "gpt2", downloaded with ``huggingface_hub`` when it is installed and online.
    dtype : numpy dtype, default float32
        The parameters' dtype (float64 for equivalence tests).

    Returns
    -------
    `loralab.models.gpt2.GPT2` for ``model_type`` "gpt2"; `loralab.models.llama.Llama` for
    "llama" (and "mistral" without sliding window). ``model.tokenizer`` is a
    `loralab.tokenizer.BPETokenizer` when the folder has tokenizer.json, else None.
    """
    folder = _resolve(path_or_id)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"from_pretrained: {str(folder)!r} has no {CONFIG}")
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(
            f"from_pretrained: model_type {kind!r} is not supported (supported: {sorted(FAMILIES)})"
        )
    family = importlib.import_module(FAMILIES[kind])
    model = family.from_hf(config, _read_weights(folder), dtype=dtype)
    if (folder / TOKENIZER).is_file():
        from loralab.tokenizer import BPETokenizer

        model.tokenizer = BPETokenizer.from_file(folder / TOKENIZER)
    return model


def save_pretrained(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` as an HF folder (config.json, model.safetensors) that ``transformers`` opens.

    A model with LoRA must be merged first (`loralab.lora.merge_lora`); ``model.tokenizer``'s
    file is not written (copy tokenizer.json beside it). The folder appears whole or not at all.
    """
    from safetensors.numpy import save_file

    if type(model).__module__ not in FAMILIES.values():
        raise TypeError(
            f"save_pretrained: expected a model from from_pretrained (GPT2 or Llama), "
            f"got {type(model).__name__}"
        )
    config, tensors = sys.modules[type(model).__module__].to_hf(model)
    with atomic_directory(path) as tmp:
        (Path(tmp) / CONFIG).write_text(
            json.dumps(config, indent=2, sort_keys=True), encoding="utf-8"
        )
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(Path(tmp) / WEIGHTS),
            metadata={"format": "pt"},
        )
    return Path(path)
