"""`inject_lora` for torch models: `loralab.lora.inject_lora` plus the torch-only ``use_custom_backward``.

Everything else (matching, validation, merging, counting) is `loralab.lora`'s one implementation,
reached through the registered `loralab.torch.adapter_backend.TorchBackend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loralab.lora.config import LoraConfig
from loralab.lora.inject import make_config, wrap_targets
from loralab.lora.linear_shared import DEFAULT_ADAPTER
from loralab.torch.adapter_backend import TorchBackend

__all__ = ["inject_lora"]


def inject_lora(
    model: torch.nn.Module,
    target_modules: str | Sequence[str] | LoraConfig,
    *,
    r: int = 8,
    alpha: float = 8,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int | None = None,
    use_custom_backward: bool = True,
    adapter_name: str = DEFAULT_ADAPTER,
) -> torch.nn.Module:
    """`loralab.lora.inject_lora` on a torch model, with `loralab.torch.LoRALinear` layers.

    With the same ``seed`` the adapters (and residual weights) equal those that
    `loralab.lora.inject_lora` makes for the NumPy twin of the model. ``use_custom_backward``:
    as in `loralab.torch.LoRALinear`; the other arguments (``adapter_name`` included) as in
    `loralab.lora.inject_lora`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"inject_lora: expected a torch.nn.Module, got {type(model).__name__}")
    options = dict(
        r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora, use_dora=use_dora
    )
    backend = TorchBackend(use_custom_backward=use_custom_backward)
    config = make_config(target_modules, options)
    return wrap_targets(model, config, backend, seed, adapter_name)
