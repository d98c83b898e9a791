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
from loralab.lora.embedding_layer import LoRAEmbeddingMixin, validate_embedding_options
from loralab.lora.linear_shared import (
    DEFAULT_ADAPTER,
    check_adapter_name,
    check_not_in_mixed_batch,
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
    "stored_transposed",
    "check_known",
    "check_called",
    "adapter_names_of",
    "active_names",
]

_DEFAULTS: dict[str, Any] = {  # inject_lora's option keywords and their defaults
    "r": 8,
    "alpha": 8,
    "dropout": 0.0,
    "init": "kaiming",
    "use_rslora": False,
    "use_dora": False,
}


def stored_transposed(layer: Any) -> bool:
    """Whether the checkpoint stores this linear layer's weight as (in, out) (GPT-2's Conv1D).

    The weight in memory is (out, in) either way; the mark (``fan_in_fan_out = True``, set by
    `loralab.models.gpt2`'s loader on the base layer) is what PEFT's ``fan_in_fan_out`` records.
    """
    return bool(getattr(getattr(layer, "base", layer), "fan_in_fan_out", False))


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


def select_targets(
    model: Any, target_modules: str | Sequence[str], backend: Backend, new_adapter: bool = False
) -> list[str]:
    """Names of the linear modules that ``target_modules`` selects, with PEFT's rules.

    With ``new_adapter`` (a second adapter name) existing LoRA layers are targets too (the adapter
    goes beside theirs); otherwise a LoRA layer matched is an error. Modules inside a LoRA layer
    (its base, its other adapters) are never targets.
    """
    target_names("target_modules", target_modules, "inject_lora")
    linear_type, lora_type = backend.linear_types(), backend.lora_types()
    embedding_type = backend.embedding_types()
    modules = dict(model.named_modules())
    lora_paths = [n for n, m in modules.items() if isinstance(m, lora_type)]
    chosen = []
    for name, module in modules.items():
        if not name or not match_target(name, target_modules):
            continue
        if any(name.startswith(p + ".") or not p for p in lora_paths if p != name):
            continue  # the base or an adapter inside an existing LoRA layer
        if isinstance(module, lora_type):
            if not new_adapter:
                raise ValueError(f"inject_lora: module {name!r} already has a LoRA adapter")
        elif not isinstance(module, linear_type):
            if target_modules == ALL_LINEAR:
                continue  # PEFT's "all-linear": Linear layers only, embeddings skipped
            check_called(model, name, "inject_lora")
            if not isinstance(module, embedding_type):
                raise TypeError(
                    f"inject_lora: target {name!r} is a {type(module).__name__}; only Linear and "
                    "Embedding layers take LoRA"
                )
        chosen.append(name)
    if not chosen:
        linears = [n for n, m in modules.items() if isinstance(m, linear_type)]
        raise ValueError(
            f"inject_lora: target_modules={target_modules!r} matched no module; "
            f"the Linear modules of this model are {linears}"
        )
    return chosen


def check_called(model: Any, path: str, where: str) -> None:
    """Refuse LoRA on module ``path`` if its owner's forward reads its weight instead of calling it.

    A LoRA layer changes what its forward returns; a table the model indexes directly (the GPT's
    ``pos_emb.weight[:T]``) would ignore the adapter until merged, and merging would then change
    the output. A module lists such children in ``lora_refused_targets`` {name: why}.
    """
    parent, _, child = path.rpartition(".")
    reason = getattr(model.get_submodule(parent), "lora_refused_targets", {}).get(child)
    if reason:
        raise ValueError(
            f"{where}: module {path!r} cannot take a LoRA adapter: {reason}, so the adapter would "
            "do nothing until merged and merging would change the output; target other modules"
        )


def adapter_names_of(layers: list[tuple[str, Any]]) -> list[str]:
    """Every adapter name on ``layers`` [(path, LoRA layer)], in order of first appearance.

    A layer kind without named adapters (`loralab.lora.LoRAEmbedding`, for now) holds "default".
    """
    names: list[str] = []
    for _, layer in layers:
        names += [n for n in getattr(layer, "adapter_names", [DEFAULT_ADAPTER]) if n not in names]
    return names


def active_names(layers: list[tuple[str, Any]]) -> list[str]:
    """The active adapters of a model's LoRA layers (the same list on every named-adapter layer)."""
    for _, layer in layers:
        if hasattr(layer, "active_adapter_names"):
            return list(layer.active_adapter_names)
    return [DEFAULT_ADAPTER]


def wrap_targets(
    model: Any,
    config: LoraConfig,
    backend: Backend,
    seed: int | None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> Any:
    """Put adapter ``adapter_name`` on the linear modules ``config`` selects, all or nothing.

    A plain linear module is replaced by ``backend.build(base, ...)``; an existing LoRA layer
    (when the model has adapters already and ``adapter_name`` is new) gets the adapter beside
    its others (`LoRALayerMixin.add_adapter`), inactive and frozen as in PEFT until
    `loralab.lora.named_adapters.set_adapter` activates it. Each layer's r and alpha come from
    ``config`` (``rank_pattern``/``alpha_pattern`` matched as PEFT does). Everything is checked
    for every target before anything changes (a model whose LoRA layers are merged is refused:
    new layers would start unmerged beside merged ones); the first adapter's parameters are the
    only trainable ones, drawn in module order from one generator built from ``seed``.
    """
    check_adapter_name(adapter_name, "inject_lora")
    existing = backend.lora_layers(model)
    check_not_in_mixed_batch(existing, "inject_lora")
    merged = [n for n, m in existing if m.merged]
    if merged:
        raise ValueError(
            f"inject_lora: the model's LoRA layers {merged} are merged into W0; unmerge first "
            "(unmerge_lora)"
        )
    known = adapter_names_of(existing)
    if adapter_name in known:
        raise ValueError(
            f"inject_lora: the model already has a LoRA adapter named {adapter_name!r} (its "
            f"adapters: {known}); pass a new adapter_name to add another beside it"
        )
    assert config.target_modules is not None
    chosen = select_targets(model, config.target_modules, backend, new_adapter=bool(existing))
    modules = dict(model.named_modules())
    lora_type = backend.lora_types()
    for name in chosen:
        base: Any = modules[name]
        is_embedding = isinstance(base, (*backend.embedding_types(), LoRAEmbeddingMixin))
        is_lora = isinstance(base, lora_type)  # kept as flags: isinstance would narrow base
        if is_embedding:
            if is_lora:  # a LoRAEmbedding holds one adapter
                raise ValueError(
                    f"inject_lora: a second adapter on the embedding {name!r} is not supported yet "
                    f"(it holds {base.adapter_names}); target Linear layers or a plain Embedding"
                )
            o = config.layer_options(name)
            validate_embedding_options(
                base.num_embeddings,
                base.embedding_dim,
                o["r"],
                o["alpha"],
                o["dropout"],
                o["init"],
                o["use_rslora"],
                o["use_dora"],
            )
            continue
        if config.fan_in_fan_out and not stored_transposed(base):
            raise ValueError(
                f"inject_lora: fan_in_fan_out=True is for layers whose checkpoint stores the weight "
                f"transposed (GPT-2's Conv1D, marked fan_in_fan_out=True by its loader); {name!r} "
                f"({type(base).__name__}) is not one"
            )
        where = f"LoRALinear(in_features={base.in_features}, out_features={base.out_features})"
        check_rank_fits(config.rank_for(name), base.in_features, base.out_features, where)
        holds_W0 = base.plain_base if is_lora else backend.holds_W0(model, name)
        if (config.use_dora or INITS[config.init].moves_W0) and not holds_W0:
            raise ValueError(
                f"inject_lora: use_dora={config.use_dora}, init={config.init!r} need W0 itself, "
                f"which the base at {name!r} ({type(base).__name__}) does not hold"
            )
        if is_lora and INITS[config.init].moves_W0:
            raise ValueError(
                f"inject_lora: init={config.init!r} replaces W0 by a residual, which would change "
                f"the adapters {base.adapter_names} at {name!r} trained on W0; use 'kaiming' or 'gaussian'"
            )
    rng = make_rng(seed)
    if not existing:
        model.requires_grad_(False)
    active = active_names(existing) if existing else [adapter_name]
    for name in chosen:
        options = config.layer_options(name)
        if isinstance(modules[name], lora_type):
            layer = modules[name]
            layer.add_adapter(adapter_name, rng=rng, **options)
        else:
            parent_name, _, child = name.rpartition(".")
            layer = backend.build(modules[name], rng=rng, adapter_name=adapter_name, **options)
            layer.active_adapter_names = list(active)
            setattr(model.get_submodule(parent_name), child, layer)
        if existing:  # a new adapter beside others starts inactive, its parameters frozen
            for param in layer.adapter_parameters(adapter_name).values():
                backend.set_trainable(param, False)
    return model


def set_merged(model: Any, merged: bool, adapter_names: Sequence[str] | None = None) -> Any:
    """Merge (``merged=True``) the adapters ``adapter_names`` (default: the active ones) of
    every LoRA layer, or unmerge every merged adapter; all or nothing."""
    what = "merge_lora" if merged else "unmerge_lora"
    layers = backend_for(model, what).lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layers; call inject_lora first")
    check_not_in_mixed_batch(layers, what)
    if merged and adapter_names is not None:
        adapter_names = check_known(model, adapter_names, what)
    if merged:
        wrong = [n for n, layer in layers if _to_merge(layer, adapter_names) & _merged(layer)]
    else:  # with named adapters a layer may hold none of the merged ones: it is skipped
        wrong = [n for n, layer in layers] if not any(m.merged for _, m in layers) else []
        layers = [(n, m) for n, m in layers if m.merged]
    if wrong and merged:
        raise ValueError(f"merge_lora: layers {wrong} are already merged; call unmerge_lora first")
    if wrong:
        raise ValueError(f"unmerge_lora: layers {wrong} are not merged; nothing to unmerge")
    for path, layer in layers if merged else ():
        names = None if adapter_names is None else list(adapter_names)
        problem = layer.merge_problem(names) if hasattr(layer, "merge_problem") else None
        if problem:
            raise ValueError(f"merge_lora: layer {path!r}: {problem}; nothing was merged")
    for _, layer in layers:
        if not merged:
            layer.unmerge()
        elif hasattr(layer, "adapter_names"):
            layer.merge(None if adapter_names is None else list(adapter_names))
        elif _to_merge(layer, adapter_names):  # a layer with its one "default" adapter
            layer.merge()
    return model


def _to_merge(layer: Any, adapter_names: Sequence[str] | None) -> set[str]:
    if hasattr(layer, "_names_to_merge"):
        return set(layer._names_to_merge(adapter_names))
    if adapter_names is None or DEFAULT_ADAPTER in adapter_names:
        return {DEFAULT_ADAPTER}
    return set()


def _merged(layer: Any) -> set[str]:
    if hasattr(layer, "merged_adapters"):
        return set(layer.merged_adapters)
    return {DEFAULT_ADAPTER} if layer.merged else set()


def check_known(model: Any, names: Any, where: str) -> list[str]:
    """``names`` (a str or a list of str) as a list, each an adapter of ``model``, no repeats."""
    layers = backend_for(model, where).lora_layers(model)
    known = adapter_names_of(layers)
    listed = [names] if isinstance(names, str) else names
    if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
        raise TypeError(f"{where}: expected an adapter name or a list of names, got {names!r}")
    unknown = [n for n in listed if n not in known]
    if unknown:
        raise ValueError(f"{where}: unknown adapters {unknown}; the model's adapters are {known}")
    repeated = sorted({n for n in listed if listed.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: adapter names {repeated} are given more than once")
    return list(listed)


def inject_lora(
    model: Any,
    target_modules: str | Sequence[str] | LoraConfig,
    *,
    r: int = 8,
    alpha: float = 8,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> Any:
    """Replace the matching linear (and embedding) modules of ``model`` by LoRA layers, in place.

    An embedding named in ``target_modules`` (the GPT's ``"tok_emb"``) gets a
    `loralab.lora.LoRAEmbedding` (A = 0, B ~ N(0, 1), as PEFT); ``"all-linear"`` skips embeddings.

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
    adapter_name : str, default "default"
        PEFT's name for the adapter. On a model that has LoRA layers already, a new name adds a
        second adapter beside the first (on existing LoRA layers and, wrapped, on plain ones),
        inactive and frozen until `loralab.lora.set_adapter` selects it (as PEFT's
        ``add_adapter``); the first adapter's parameter names stay ``<path>.lora_A`` ...

    Returns
    -------
    The same ``model``.

    Raises
    ------
    ValueError
        When nothing matches (the message lists the Linear modules that exist), a bad option, or
        LoRA layers of the model are merged ("unmerge first").
    TypeError
        When a matching module is neither a Linear nor an Embedding, or an option has the wrong type.

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
    return wrap_targets(model, make_config(target_modules, options), backend, seed, adapter_name)


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(dotted name, layer) for every LoRA layer in ``model``, in module order."""
    return backend_for(model, "lora_layers").lora_layers(model)


def merge_lora(model: Any, adapter_names: Sequence[str] | None = None) -> Any:
    """Merge adapters into their base weights (W0 <- W0 + ΔW); all or nothing.

    ``adapter_names``: which (default: the active ones, as PEFT); each layer remembers the
    merged ones in ``merged_adapters``, and a merged model runs the base alone (W0 holds them).
    """
    return set_merged(model, True, adapter_names)


def unmerge_lora(model: Any) -> Any:
    """Undo `merge_lora` (W0 <- W0 - ΔW, for every merged adapter, last first); all or nothing."""
    return set_merged(model, False)


def lora_state_dict(model: Any) -> dict[str, Any]:
    """Copies of the LoRA parameters only: ``{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}``
    (and ``"<path>.lora_magnitude_vector"`` with DoRA, ``"<path>.lora_embedding_A"``/``_B`` for an
    embedding, ``"<path>.lora_adapters.<name>.lora_A"`` ... for named adapters beyond a layer's
    first); ndarrays or detached torch tensors."""
    backend = backend_for(model, "lora_state_dict")
    out = {}
    for name, layer in backend.lora_layers(model):
        prefix = f"{name}." if name else ""
        for adapter in getattr(layer, "adapter_names", [DEFAULT_ADAPTER]):
            if hasattr(layer, "adapter_parameters"):
                params = layer.adapter_parameters(adapter)
                if adapter != layer.adapter_names[0]:
                    params = {f"lora_adapters.{adapter}.{k}": v for k, v in params.items()}
            else:
                params = {p: getattr(layer, p) for p in _parameter_names(layer)}
            out.update({prefix + k: backend.copy(v) for k, v in params.items()})
    return out


def _parameter_names(layer: Any) -> tuple[str, ...]:
    if isinstance(layer, LoRAEmbeddingMixin):  # PEFT's names for an embedding's A and B
        return ("lora_embedding_A", "lora_embedding_B")
    return ("lora_A", "lora_B", *layer.kind.extra_names)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) number of parameter values in ``model`` (NumPy or torch).

    A quantized base (`loralab.quant.Linear4bit`) keeps its frozen W0 outside the parameters;
    modules that say how many values they hold that way (``num_quantized_values``) have them
    counted in the total, never as trainable.

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
    for _, module in model.named_modules():
        total += getattr(module, "num_quantized_values", 0)
    return trainable, total
