"""Where LoRA lives: the math, the options, the layer, injection, merging and PEFT's file format.

One package, in layers (each module imports only those above it in this list):

- `loralab.lora.ops`: the pure-NumPy forwards and hand-derived backwards (LoRA, the LoRA branch
  alone, DoRA); imports nothing of loralab. Beside it, as pure: `loralab.lora.embedding_ops` (LoRA
  on an embedding table) and `loralab.lora.grouped` (one batch, many adapters);
- `loralab.lora.variants`: scaling rules, initialisations (PiSSA, OLoRA), DoRA as small objects; LoRA+;
- `loralab.lora.config`: `LoraConfig` (PEFT's field names, validated once) and the validators;
- `loralab.lora.linear_shared`: what the NumPy and torch `LoRALinear` share (options, ΔW, merging,
  named adapters) and `register_linear_type` (the base-layer interface);
- `loralab.lora.engine_functions`: the engine Functions LoRA runs (`LoRALinearFn`, `DoRALinearFn`,
  `LoRABranchFn`, the grouped ones) and `lora_linear`, thin wrappers over `ops`;
- `loralab.lora.linear_layer`: `LoRALinear`, the NumPy layer, and the holders of its named adapters;
- `loralab.lora.embedding_layer`: `LoRAEmbedding` and its Function (LoRA on a token table);
- `loralab.lora.backend`: how one implementation reaches NumPy and (registered) torch models;
- `loralab.lora.inject`: `inject_lora`, `merge_lora`, `unmerge_lora`, `lora_layers`, counting;
- `loralab.lora.named_adapters`: named adapters (`set_adapter`, `delete_adapter`, `disable_adapters`),
  mixed batches (`mixed_batch`) and `add_weighted_adapter`;
- `loralab.lora.peft_read`: reading an adapter folder (config, safetensors header, tensors), checked;
- `loralab.lora.peft_format`: `save_adapter` / `load_adapter` in HF PEFT's format.
"""

from loralab.lora.backend import Backend, register_backend
from loralab.lora.config import LoraConfig
from loralab.lora.embedding_layer import LoRAEmbedding
from loralab.lora.engine_functions import lora_linear
from loralab.lora.inject import (
    count_parameters,
    inject_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from loralab.lora.linear_layer import LoRALinear
from loralab.lora.linear_shared import register_linear_type
from loralab.lora.named_adapters import (
    active_adapters,
    adapter_order,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    mixed_batch,
    set_adapter,
)
from loralab.lora.peft_format import load_adapter, save_adapter
from loralab.lora.variants import loraplus_param_groups

__all__ = [
    "LoraConfig",
    "LoRALinear",
    "LoRAEmbedding",
    "lora_linear",
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "lora_state_dict",
    "lora_layers",
    "count_parameters",
    "save_adapter",
    "load_adapter",
    "loraplus_param_groups",
    "set_adapter",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "disable_adapters",
    "mixed_batch",
    "adapter_order",
    "add_weighted_adapter",
    "register_linear_type",
    "register_backend",
    "Backend",
]
