"""LoRA on whole torch models: the twins of `loralab.lora.inject`, same rules, same errors.

Matching follows HF PEFT (and the NumPy functions): a list of names matches a module whose full
dotted name equals an entry or ends with ``"." + entry``; a string is a regular expression that
must match the full name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from loralab.lora.config import LoraConfig
from loralab.lora.inject import make_config, set_merged, wrap_targets
from loralab.torch.layers import LoRALinear

__all__ = [
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "lora_state_dict",
    "lora_layers",
    "count_parameters",
]


def inject_lora(
    model: torch.nn.Module,
    target_modules: str | Sequence[str] | LoraConfig,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int | None = None,
    use_custom_backward: bool = True,
) -> torch.nn.Module:
    """Replace the matching ``torch.nn.Linear`` modules by `LoRALinear` wrappers, in place.

    Every parameter that is not a LoRA A or B (or a DoRA magnitude) is frozen; right after
    injection the model computes what it computed before (every B is zero; for PiSSA and OLoRA,
    W0 - s B A + s B A = W0). With the same ``seed`` the adapters (and residual weights) equal
    those that `loralab.lora.inject_lora` makes for the NumPy twin of the model.

    Parameters
    ----------
    model : torch.nn.Module
    target_modules : list of str or str
        Module names (exact or dotted suffix), one regular expression for the full name, or
        ``"all-linear"`` for every Linear layer (as PEFT).
    r, alpha, dropout, init, use_rslora, use_dora, use_custom_backward
        As in `LoRALinear`.
    seed : int, optional
        One NumPy generator built from it initialises the adapters in module order.

    Returns
    -------
    The same ``model``.

    Raises
    ------
    ValueError
        When nothing matches (the message lists the Linear modules that exist) or a bad option.
    TypeError
        When a matching module is not a ``torch.nn.Linear``.
    """
    options = dict(
        r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora, use_dora=use_dora
    )
    return wrap_targets(
        model,
        make_config(target_modules, options),
        linear_type=torch.nn.Linear,
        lora_type=LoRALinear,
        build=functools.partial(LoRALinear, use_custom_backward=use_custom_backward),
        seed=seed,
    )


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoRALinear]]:
    """(dotted name, layer) for every `LoRALinear` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every adapter into its base weight (W0 <- W0 + ΔW); all or nothing."""
    return set_merged(model, LoRALinear, True)


def unmerge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `merge_lora` (W0 <- W0 - ΔW); all or nothing."""
    return set_merged(model, LoRALinear, False)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the LoRA parameters only: ``{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}``."""
    return {
        f"{name}.{pname}" if name else pname: p.detach().clone()
        for name, layer in lora_layers(model)
        for pname, p in layer.named_parameters(recurse=False)
        if pname.startswith("lora_")
    }


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameter values in ``model``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
