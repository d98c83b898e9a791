"""The PyTorch twin of loralab: the same LoRA, proven equal to the NumPy reference, PEFT-compatible.

The only part of loralab that imports torch (``pip install -e ".[torch]"`` in a clone of the
repository, or a built wheel with ``[torch]``).

- `LoRALinear` and `LoRALinearFunction` (the hand-derived backward, in torch); `LoRAEmbedding`
  and `LoRAEmbeddingFunction` (LoRA on a token table);
- `inject_lora` (with the torch-only ``use_custom_backward``); `merge_lora`, `unmerge_lora`,
  `lora_state_dict`, `lora_layers`, `count_parameters` are `loralab.lora`'s own functions,
  which serve torch models through the backend registered below;
- `to_torch` / `to_numpy` and the converter registry (`register_converter`,
  `register_numpy_converter`);
- `check_equivalence` (the harness) and `shared_dropout_masks`;
- named adapters, mixed batches and adapter arithmetic (`set_adapter`, `mixed_batch`,
  `add_weighted_adapter`, ...: `loralab.lora.named_adapters`'s functions, which serve torch models);
- `save_adapter` / `load_adapter` (the same functions as in `loralab.lora`:
  they accept torch models and write HF PEFT's format).

Examples
--------
>>> from loralab.nn import MLP
>>> from loralab.lora import inject_lora as np_inject
>>> import numpy as np
>>> np_model = np_inject(MLP([4, 8, 3], seed=0, dtype=np.float64), ["0", "2"], r=2, seed=0)
>>> twin = to_torch(np_model)
>>> [n for n, p in twin.named_parameters() if p.requires_grad]
['0.lora_A', '0.lora_B', '2.lora_A', '2.lora_B']
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        'loralab.torch needs PyTorch (torch>=2.2,<2.14): run pip install -e ".[torch]" in a clone '
        "of the loralab repository, or install its built wheel with [torch] (loralab is not on a "
        "package index yet)"
    ) from exc

from loralab.lora import (
    active_adapters,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    mixed_batch,
    register_backend,
    save_adapter,
    set_adapter,
    unmerge_lora,
)
from loralab.torch.adapter_backend import TorchBackend, is_torch_model
from loralab.torch.convert import (
    Container,
    param_to_numpy,
    param_to_torch,
    register_converter,
    register_numpy_converter,
    to_numpy,
    to_torch,
)
from loralab.torch.embedding import LoRAEmbedding, LoRAEmbeddingFunction
from loralab.torch.equivalence import (
    EquivalenceReport,
    check_equivalence,
    relative_difference,
    shared_dropout_masks,
)
from loralab.torch.inject import inject_lora
from loralab.torch.layers import LoRALinear, LoRALinearFunction
from loralab.torch.quant import Linear4bit  # registers the 4-bit base with to_torch / to_numpy

__all__ = [
    "LoRALinear",
    "LoRALinearFunction",
    "LoRAEmbedding",
    "LoRAEmbeddingFunction",
    "Linear4bit",
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "lora_state_dict",
    "lora_layers",
    "count_parameters",
    "to_torch",
    "to_numpy",
    "register_converter",
    "register_numpy_converter",
    "param_to_torch",
    "param_to_numpy",
    "Container",
    "check_equivalence",
    "EquivalenceReport",
    "shared_dropout_masks",
    "relative_difference",
    "save_adapter",
    "load_adapter",
    "set_adapter",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "disable_adapters",
    "mixed_batch",
    "add_weighted_adapter",
]

# loralab.lora's functions serve torch models through this backend (the core never imports torch).
register_backend(is_torch_model, TorchBackend())

# The GPT's and LLaMA's converters register themselves with the registry on import.
from loralab.torch import gpt as _gpt  # noqa: E402, F401
from loralab.torch import llama as _llama  # noqa: E402, F401
