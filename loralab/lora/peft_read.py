"""Reading an adapter folder in HF PEFT's format, checked before anything is used: the config, the
safetensors *header* (8-byte little-endian length, then JSON naming each tensor's dtype, shape and
byte range), then the tensors themselves, read from their byte ranges (never pickle).

`loralab.lora.peft_format` plans and applies a load on top of these; here are the file names, PEFT's
key layout (``base_model.model.<module path>.lora_A.weight`` ...) and the readers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np

from loralab.fileio import open_together
from loralab.lora.config import LoraConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PREFIX",
    "TensorSpec",
    "read_config",
    "read_header",
    "read_tensors",
    "read_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
_MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m, shape (out,); PEFT's key has no ".weight"
# An embedding's A (r, num_embeddings) and B (embedding_dim, r): plain Parameters in PEFT, no ".weight".
_EMBEDDING = {".lora_embedding_A": "lora_embedding_A", ".lora_embedding_B": "lora_embedding_B"}
_FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size


# ----- reading: config and header first, tensors second ---------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One entry of a safetensors header: its key, dtype name ("F32", ...), shape and bytes."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # the tensor's bytes in the file: [begin, end)
    end: int = 0


def _no_duplicates(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{where}: duplicate key {key!r}")
            seen[key] = value
        return seen

    return hook


def _parse_json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"{where}: the JSON is nested too deeply to be a config") from None


def read_config(f: BufferedReader, path: Path) -> LoraConfig:
    """``adapter_config.json`` (open as ``f``) as a validated `LoraConfig`; every error names
    the file ``path``."""
    where = f"load_adapter: {str(path)!r}"
    try:
        text = f.read()
    except OSError as exc:
        raise FileNotFoundError(f"{where}: cannot read: {exc}") from exc
    data = _parse_json(text, where)
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    return LoraConfig.from_dict(data, source=where)


def read_header(f: BufferedReader, path: Path) -> list[TensorSpec]:
    """The tensors a safetensors file (open as ``f``) declares, checked without reading their data.

    The format: 8 bytes (little-endian u64) giving the header's length n, n bytes of JSON
    ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
    data. Each entry must be a float (F16, F32, F64), its offsets must lie inside the file and
    span exactly prod(shape) * itemsize bytes, no two may overlap; keys must be unique.
    """
    where = f"load_adapter: {str(path)!r}"
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{where}: cannot read: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, _MAX_HEADER):
        raise ValueError(
            f"{where}: cannot read: the header claims {n} bytes but {size - 8} follow its length"
        )
    raw = f.read(n)
    header = _parse_json(raw, f"{where}: cannot read: the header")
    if not isinstance(header, dict):
        raise ValueError(f"{where}: cannot read: the header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{where}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    specs = [_check_entry(key, entry, data_size, 8 + n, where) for key, entry in header.items()]
    spans = sorted((s.begin, s.end, s.key) for s in specs if s.end > s.begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{where}: cannot read: tensors {first} and {second} overlap")
    return specs


def _check_entry(key: str, entry: Any, data_size: int, start: int, where: str) -> TensorSpec:
    _split_key(key)  # an unexpected key is refused before its size or dtype matter
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where}: tensor {key}: expected dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _FLOAT_DTYPES:
        hint = " (bfloat16: convert the adapter to float32 first)" if dtype == "BF16" else ""
        raise ValueError(
            f"{where}: tensor {key} has dtype {dtype!r}; expected one of {list(_FLOAT_DTYPES)}{hint}"
        )

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise ValueError(f"{where}: tensor {key} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise ValueError(f"{where}: tensor {key} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(_FLOAT_DTYPES[dtype]).itemsize
    if end - begin != nbytes or end > data_size:
        raise ValueError(
            f"{where}: tensor {key} declares bytes [{begin}, {end}) for shape {tuple(shape)} "
            f"({nbytes} bytes) but the data section has {data_size} bytes"
        )
    return TensorSpec(key, dtype, tuple(shape), start + begin, start + end)


def read_tensors(f: BufferedReader, path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The tensors ``specs`` (checked by `read_header`) of the safetensors file open as ``f``:
    each read as little-endian floats straight from its byte range (no pickle); each must be
    finite."""
    where = f"load_adapter: {str(path)!r}"
    tensors = {}
    for spec in specs:
        buffer = bytearray(spec.end - spec.begin)
        f.seek(spec.begin)
        if f.readinto(buffer) != len(buffer):
            raise ValueError(f"{where}: cannot read the tensors: {spec.key} is cut short")
        dtype = np.dtype(_FLOAT_DTYPES[spec.dtype]).newbyteorder("<")
        value = np.frombuffer(buffer, dtype=dtype).reshape(spec.shape)
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: tensor {spec.key} holds NaN or infinite values")
        tensors[spec.key] = value.astype(value.dtype.newbyteorder("="), copy=False)
    return tensors


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read and check an adapter directory: (config, tensors keyed as in the file). No pickle.

    Both files come from one save, even while another process saves to ``directory``
    (`loralab.fileio.open_together`)."""
    with _open_adapter(directory) as (config, weights, config_path, weights_path):
        specs = read_header(weights, weights_path)
        return read_config(config, config_path), read_tensors(weights, weights_path, specs)


@contextmanager
def _open_adapter(
    directory: str | os.PathLike,
) -> Iterator[tuple[BufferedReader, BufferedReader, Path, Path]]:
    """The config and weights files of ``directory``, open, from one save of it."""
    directory = Path(directory)
    with open_together(directory, [CONFIG_NAME, WEIGHTS_NAME], where="load_adapter") as files:
        yield (
            files[CONFIG_NAME],
            files[WEIGHTS_NAME],
            directory / CONFIG_NAME,
            directory / WEIGHTS_NAME,
        )


def _split_key(key: str) -> tuple[str, str]:
    for suffix, attr in {**_SUFFIXES, _MAGNITUDE: _MAGNITUDE[1:], **_EMBEDDING}.items():
        if key.startswith(PREFIX) and key.endswith(suffix) and len(key) > len(PREFIX + suffix):
            return key[len(PREFIX) : -len(suffix)], attr
    raise ValueError(
        f"load_adapter: unexpected tensor {key!r}; expected '{PREFIX}<module path>.lora_A.weight', "
        "'.lora_B.weight', '.lora_magnitude_vector', '.lora_embedding_A' or '.lora_embedding_B'"
    )
