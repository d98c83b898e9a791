"""LoRA on whole models: put adapters on the linear layers chosen by name, merge them, count them.

Written once for every backend (`loralab.lora.backend`): the same functions serve NumPy models
and, once `loralab.torch` is imported, torch models.

Matching follows HF PEFT: a list of names matches a module whose full dotted name equals an entry
or ends with ``"." + entry`` (so ``"q"`` matches ``"blocks.0.attn.q"``); a string is a regular
expression that must match the full name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from loralab._validate import boolean, positive_int, probability
from loralab.lora.backend import Backend, backend_for
from loralab.lora.config import (
    ALL_LINEAR,
    INIT_TO_PEFT,
    LoraConfig,
    check_rank_fits,
    lora_init,
    positive_number,
    target_names,
)
from loralab.lora.variants import INITS
from loralab.nn.module import make_rng

__all__ = [
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "lora_state_dict",
    "lora_layers",
    "count_parameters",
    "match_target",
]

_DEFAULTS: dict[str, Any] = {  # inject_lora's option keywords and their defaults
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "init": "kaiming",
    "use_rslora": False,
    "use_dora": False,
}


def match_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """Whether module ``name`` is selected by ``target_modules`` (PEFT's rules).

    ``"all-linear"`` selects every module (``inject_lora`` then keeps the Linear ones).
    """
    if target_modules == ALL_LINEAR:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def make_config(target_modules: Any, options: dict[str, Any]) -> LoraConfig:
    """The `LoraConfig` of ``inject_lora``'s second argument and keyword options.

    ``target_modules`` is either a `LoraConfig` (then every option keyword must keep its default) or the
    names to adapt, with the options named as `LoRALinear`'s keywords (checked by the same
    validators, with the keyword's name in the message).
    """
    if isinstance(target_modules, LoraConfig):
        given = sorted(
            k for k, v in options.items() if type(v) is not type(_DEFAULTS[k]) or v != _DEFAULTS[k]
        )
        if given:
            raise TypeError(
                f"inject_lora: got a LoraConfig and the keyword options {given}; put them in the config"
            )
        if target_modules.target_modules is None:
            raise ValueError("inject_lora: the LoraConfig has no target_modules")
        if target_modules.init_lora_weights is False:
            raise ValueError(
                "inject_lora: init_lora_weights=False (A and B both random) is not implemented; "
                "loralab starts with B = 0 (True, 'gaussian') or a split of W0 ('pissa', 'olora')"
            )
        return target_modules
    where = "inject_lora"
    o = options
    target_names("target_modules", target_modules, where)
    positive_int("r", o["r"], where)
    positive_number("alpha", o["alpha"], where)
    probability("dropout", o["dropout"], where)
    lora_init("init", o["init"], where)
    boolean("use_rslora", o["use_rslora"], where)
    boolean("use_dora", o["use_dora"], where)
    return LoraConfig(
        r=int(o["r"]),
        lora_alpha=o["alpha"],
        lora_dropout=o["dropout"],
        target_modules=target_modules,
        use_rslora=o["use_rslora"],
        use_dora=o["use_dora"],
        init_lora_weights=INIT_TO_PEFT[o["init"]],
    )


def select_targets(model: Any, target_modules: str | Sequence[str], backend: Backend) -> list[str]:
    """Names of the linear modules that ``target_modules`` selects, with PEFT's rules."""
    target_names("target_modules", target_modules, "inject_lora")
    linear_type, lora_type = backend.linear_types(), backend.lora_type
    modules = dict(model.named_modules())
    chosen = []
    for name, module in modules.items():
        if not name or not match_target(name, target_modules):
            continue
        if isinstance(modules.get(name.rpartition(".")[0]), lora_type):
            continue  # the base inside an existing adapter
        if isinstance(module, lora_type):
            raise ValueError(f"inject_lora: module {name!r} already has a LoRA adapter")
        if not isinstance(module, linear_type):
            if target_modules == ALL_LINEAR:
                continue
            raise TypeError(
                f"inject_lora: target {name!r} is a {type(module).__name__}; only Linear layers take LoRA"
            )
        chosen.append(name)
    if not chosen:
        linears = [n for n, m in modules.items() if isinstance(m, linear_type)]
        raise ValueError(
            f"inject_lora: target_modules={target_modules!r} matched no module; "
            f"the Linear modules of this model are {linears}"
        )
    return chosen


def wrap_targets(model: Any, config: LoraConfig, backend: Backend, seed: int | None) -> Any:
    """Replace the linear modules ``config`` selects by ``backend.build(base, ...)``, all or nothing.

    Each layer's r and alpha come from ``config`` (``rank_pattern``/``alpha_pattern`` matched as
    PEFT does). Everything is checked for every target before anything changes (a model whose
    LoRA layers are merged is refused: new layers would start unmerged beside merged ones); then
    all parameters are frozen and the LoRA layers (whose A and B require gradients) put in place,
    drawing their initial values in module order from one generator built from ``seed``.
    """
    merged = [n for n, m in backend.lora_layers(model) if m.merged]
    if merged:
        raise ValueError(
            f"inject_lora: the model's LoRA layers {merged} are merged into W0; unmerge first "
            "(unmerge_lora)"
        )
    assert config.target_modules is not None
    chosen = select_targets(model, config.target_modules, backend)
    modules = dict(model.named_modules())
    for name in chosen:
        base = modules[name]
        where = f"LoRALinear(in_features={base.in_features}, out_features={base.out_features})"
        check_rank_fits(config.rank_for(name), base.in_features, base.out_features, where)
        if (config.use_dora or INITS[config.init].moves_W0) and not backend.holds_W0(model, name):
            raise ValueError(
                f"inject_lora: use_dora={config.use_dora}, init={config.init!r} need W0 itself, "
                f"which the base at {name!r} ({type(base).__name__}) does not hold"
            )
    rng = make_rng(seed)
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        layer = backend.build(modules[name], rng=rng, **config.layer_options(name))
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def set_merged(model: Any, merged: bool) -> Any:
    """Merge (``merged=True``) or unmerge every LoRA layer of ``model``; all or nothing."""
    what = "merge_lora" if merged else "unmerge_lora"
    layers = backend_for(model, what).lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layers; call inject_lora first")
    wrong = [n for n, layer in layers if layer.merged == merged]
    if wrong and merged:
        raise ValueError(f"merge_lora: layers {wrong} are already merged; call unmerge_lora first")
    if wrong:
        raise ValueError(f"unmerge_lora: layers {wrong} are not merged; nothing to unmerge")
    for _, layer in layers:
        layer.merge() if merged else layer.unmerge()
    return model


def inject_lora(
    model: Any,
    target_modules: str | Sequence[str] | LoraConfig,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int | None = None,
) -> Any:
    """Replace the matching linear modules of ``model`` by LoRA layers, in place.

    Every parameter that is not a LoRA A or B (or a DoRA magnitude) is frozen. Right after
    injection the model computes exactly what it computed before: every B is zero (for PiSSA and
    OLoRA, W0 - s B A + s B A = W0).

    Parameters
    ----------
    model : loralab.nn.Module or torch.nn.Module
        A torch model gets `loralab.torch.LoRALinear` layers (`loralab.torch.inject_lora` adds
        the torch-only ``use_custom_backward`` option).
    target_modules : list of str, str or LoraConfig
        Module names (exact or dotted suffix), one regular expression for the full name, or
        ``"all-linear"`` for every Linear layer (as PEFT); or a `loralab.lora.LoraConfig`
        holding them and every option (then the option keywords must keep their defaults).
    r, alpha, dropout, init, use_rslora, use_dora
        As in `loralab.lora.LoRALinear` (``init="pissa"`` or ``"olora"`` replaces each adapted W0
        by its residual, see `loralab.lora.variants`). Types are strict: ``use_dora="false"`` is a TypeError.
    seed : int, optional
        One generator built from it initialises the adapters in module order.

    Returns
    -------
    The same ``model``.

    Raises
    ------
    ValueError
        When nothing matches (the message lists the Linear modules that exist), a bad option, or
        LoRA layers of the model are merged ("unmerge first").
    TypeError
        When a matching module is not a Linear, or an option has the wrong type.

    Examples
    --------
    >>> from loralab.nn import MLP
    >>> model = inject_lora(MLP([8, 16, 4], seed=0), ["0", "2"], r=2, alpha=4, seed=0)
    >>> count_parameters(model)
    (88, 300)
    """
    options = dict(
        r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora, use_dora=use_dora
    )
    backend = backend_for(model, "inject_lora")
    return wrap_targets(model, make_config(target_modules, options), backend, seed)


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(dotted name, layer) for every LoRA layer in ``model``, in module order."""
    return backend_for(model, "lora_layers").lora_layers(model)


def merge_lora(model: Any) -> Any:
    """Merge every adapter into its base weight (W0 <- W0 + ΔW); all or nothing."""
    return set_merged(model, True)


def unmerge_lora(model: Any) -> Any:
    """Undo `merge_lora` (W0 <- W0 - ΔW); all or nothing."""
    return set_merged(model, False)


def lora_state_dict(model: Any) -> dict[str, Any]:
    """Copies of the LoRA parameters only: ``{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}``
    (and ``"<path>.lora_magnitude_vector"`` with DoRA); ndarrays or detached torch tensors."""
    backend = backend_for(model, "lora_state_dict")
    return {
        f"{name}.{pname}" if name else pname: backend.copy(getattr(layer, pname))
        for name, layer in backend.lora_layers(model)
        for pname in ("lora_A", "lora_B", *layer.kind.extra_names)
    }


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) number of parameter values in ``model`` (NumPy or torch).

    Examples
    --------
    >>> from loralab.nn import Linear
    >>> count_parameters(Linear(10, 5))
    (55, 55)
    """
    trainable = total = 0
    for p in model.parameters():
        size = math.prod(p.shape)
        total += size
        trainable += size if p.requires_grad else 0
    return trainable, total
