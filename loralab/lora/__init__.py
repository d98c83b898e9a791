"""LoRA on whole models: injection by name, merging, counting and the PEFT adapter format.

The pure-NumPy fused op lives in `loralab.lora.functional` (engine layer); the model-level
functions below are loaded on first use, so the engine can import the fused op without pulling
in the module layer (which itself builds on the engine).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LoraConfig": "loralab.lora.config",
    "inject_lora": "loralab.lora.inject",
    "merge_lora": "loralab.lora.inject",
    "unmerge_lora": "loralab.lora.inject",
    "lora_state_dict": "loralab.lora.inject",
    "lora_layers": "loralab.lora.inject",
    "count_parameters": "loralab.lora.inject",
    "save_adapter": "loralab.lora.adapter",
    "load_adapter": "loralab.lora.adapter",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loralab.lora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
