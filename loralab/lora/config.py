"""`LoraConfig`: the one description of a LoRA adapter's options, with PEFT's field names.

A frozen dataclass, validated once in ``__post_init__``; ``to_dict()`` is exactly the content of
PEFT's ``adapter_config.json`` and ``from_dict()`` its inverse (``from_dict(c.to_dict()) == c``).
`loralab.lora.inject_lora`, the layers and the adapter loader all check their options with the
validators below (one function per rule), so the same mistake gets the same message everywhere.

Rules (strict, as JSON files are edited by hand):

- booleans are ``True``/``False`` (a string ``"false"`` or an ``int`` is a TypeError);
- numbers are finite ``int``/``float`` (never ``bool``); r and the rank_pattern values are ints;
- ``rank_pattern``/``alpha_pattern`` map regular expressions to values, matched as PEFT's
  ``get_pattern_key`` does (see `pattern_key`);
- a wrong type is a TypeError, a wrong value a ValueError; the message names the field and value
  (and, via ``from_dict(..., source=path)``, the file).

This module sits below the layers, injection and file format; it imports only the shared
validators (`loralab._validate`) and the variants' tables (`loralab.lora.variants`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from loralab._validate import boolean, positive_int, positive_number, probability
from loralab.lora.variants import INITS, SCALINGS

__all__ = [
    "LoraConfig",
    "LORA_INITS",
    "INIT_TO_PEFT",
    "positive_number",
    "lora_init",
    "check_rank_fits",
    "target_names",
    "pattern_key",
    "lora_scaling",
]

LORA_INITS = tuple(INITS)
"""loralab's names for A's (and B's) initialisation, as `LoRALinear(init=...)` takes them."""

INIT_TO_PEFT: dict[str, bool | str] = {
    "kaiming": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}
"""loralab's ``init`` -> PEFT's ``init_lora_weights`` (True is PEFT's kaiming-uniform A, B = 0)."""

ALL_LINEAR = "all-linear"


# ----- validators (the general ones, positive_int, positive_number, ..., are loralab._validate's) --
def lora_init(name: str, value: Any, where: str) -> str:
    """``value`` if it is one of loralab's `LORA_INITS`."""
    if not isinstance(value, str):
        raise TypeError(
            f"{where}: {name} must be a string, one of {list(LORA_INITS)}, got {name}={value!r} "
            f"({type(value).__name__})"
        )
    if value not in LORA_INITS:
        raise ValueError(f"{where}: {name} must be one of {list(LORA_INITS)}, got {name}={value!r}")
    return value


def check_rank_fits(r: int, in_features: int, out_features: int, where: str) -> None:
    """Refuse r > min(in_features, out_features).

    PEFT accepts such an r; loralab does not: s B A has rank at most min(in, out), so the extra
    rank only wastes parameters, and PiSSA/OLoRA have no r-th direction of W0 to take.
    """
    if r > min(in_features, out_features):
        raise ValueError(
            f"{where}: r={r} exceeds min(in_features, out_features)={min(in_features, out_features)};"
            " a rank-r update of this matrix cannot have a larger rank"
        )


def target_names(name: str, value: Any, where: str) -> str | tuple[str, ...]:
    """A regular expression string (or ``"all-linear"``) or a non-empty sequence of module names."""
    if isinstance(value, str):
        if value != ALL_LINEAR:
            _compile(value, name, where)
        return value
    if isinstance(value, Sequence) and value and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise TypeError(
        f"{where}: {name} must be a regular expression string or a non-empty list of module names, "
        f"got {name}={value!r}"
    )


def _compile(pattern: str, name: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: {name}: invalid regular expression {pattern!r}: {exc}") from exc


def _check_pattern(name: str, value: Any, where: str, check_value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where}: {name} must be a dict of module-name patterns, got {name}={value!r} "
            f"({type(value).__name__})"
        )
    checked = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{where}: {name} keys must be non-empty strings, got {key!r}")
        _compile(key, name, where)
        checked[key] = check_value(f"{name}[{key!r}]", v, where)
    return checked


def pattern_key(keys: Sequence[str], name: str) -> str | None:
    """The first of ``keys`` that selects module ``name``, with PEFT's ``get_pattern_key`` rule.

    A key is a regular expression that must match the whole name or a dotted suffix of it:
    ``re.match(rf"(.*\\.)?({key})$", name)``. So ``"q"`` and ``"^q$"`` select ``"q"``; ``"q"`` also
    selects ``"blocks.0.q"`` (``"^q$"`` does not), and ``"blocks\\.[01]\\.q"`` selects two layers.

    >>> pattern_key(["^2$", "0"], "net.0"), pattern_key(["^2$"], "2"), pattern_key(["^2$"], "net.2")
    ('0', '^2$', None)
    """
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


# ----- the config -----------------------------------------------------------------------------------
_UNSUPPORTED = {  # field: (the only value loralab accepts, the feature it would ask for)
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a bias on lora_B"),
    "modules_to_save": (None, "fully trained extra modules"),
    "layers_to_transform": (None, "layer selection by index"),
    "layers_pattern": (None, "layer selection by pattern"),
    "exclude_modules": (None, "excluded modules"),
}

# Fields PEFT writes that describe where the file came from; their values do not change the adapter.
_METADATA = (
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "megatron_config",
    "qalora_group_size",
)

_PEFT_INITS = (True, False, "gaussian", "pissa", "olora")


@dataclass(frozen=True)
class LoraConfig:
    """The options of a LoRA adapter, named as in HF PEFT's ``LoraConfig``.

    Parameters
    ----------
    r : int, default 8
        The rank of every adapted layer (unless ``rank_pattern`` says otherwise).
    lora_alpha : float, default 8 (PEFT's default; scaling = alpha / r = 1 at r = 8)
        The scaling numerator: s = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``).
        Finite and positive.
    lora_dropout : float in [0, 1), default 0.0
        Dropout on the LoRA branch's input.
    target_modules : str, sequence of str or None
        Module names (exact or dotted suffix), one regular expression for the full name, or
        ``"all-linear"``. Needed to inject; a saved adapter lists the full module paths.
    use_rslora, use_dora : bool, default False
        rsLoRA scaling; DoRA's magnitude vector.
    init_lora_weights : True, False, "gaussian", "pissa" or "olora", default True
        PEFT's init names: True is loralab's ``init="kaiming"``. False (A and B left random by
        PEFT) only matters at initialisation, so loralab accepts it when loading (the file's A and B
        replace the initial values) and refuses it when injecting. Other PEFT values (``pissa_niter_K``,
        ``corda``, ``loftq``, ``eva``, ``lora_ga``, ``orthogonal``, ...) are refused by name.
    rank_pattern, alpha_pattern : dict of {regex: value}
        Per-layer r and lora_alpha, matched as PEFT does (`pattern_key`).
    peft_type, task_type, base_model_name_or_path, revision, inference_mode
        Written for PEFT; peft_type must be "LORA".
    bias, fan_in_fan_out, lora_bias, modules_to_save, layers_to_transform, layers_pattern, exclude_modules
        PEFT features loralab does not implement: only their default values are accepted.

    Examples
    --------
    >>> c = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"^v$": 2})
    >>> c.rank_for("blocks.0.q"), c.rank_for("v"), c.scaling_for("v")
    (4, 2, 4.0)
    >>> LoraConfig.from_dict(c.to_dict()) == c
    True
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    peft_type: str = "LORA"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = True
    bias: str = "none"
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    exclude_modules: list[str] | None = None

    def __post_init__(self) -> None:
        where = "LoraConfig"
        if self.peft_type != "LORA":
            raise ValueError(f"{where}: peft_type must be 'LORA', got peft_type={self.peft_type!r}")
        set_ = object.__setattr__  # frozen: values are normalised once, here
        set_(self, "r", positive_int("r", self.r, where))
        positive_number("lora_alpha", self.lora_alpha, where)
        set_(self, "lora_dropout", probability("lora_dropout", self.lora_dropout, where))
        for name in ("use_rslora", "use_dora", "inference_mode", "fan_in_fan_out"):
            set_(self, name, boolean(name, getattr(self, name), where))
        if self.target_modules is not None:
            set_(self, "target_modules", target_names("target_modules", self.target_modules, where))
        init = self.init_lora_weights
        if not any(init is v if isinstance(v, bool) else init == v for v in _PEFT_INITS):
            raise ValueError(
                f"{where}: unsupported init_lora_weights={init!r}: loralab implements "
                f"{list(_PEFT_INITS)} (PEFT's pissa_niter_K, corda, loftq, eva, lora_ga, "
                "orthogonal, ... are not implemented)"
            )
        set_(
            self,
            "rank_pattern",
            _check_pattern("rank_pattern", self.rank_pattern, where, positive_int),
        )
        alphas = _check_pattern("alpha_pattern", self.alpha_pattern, where, positive_number)
        set_(self, "alpha_pattern", alphas)
        for name in ("task_type", "base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{where}: {name} must be a string or null, got {name}={value!r}")
        for name, (fine, what) in _UNSUPPORTED.items():
            value = getattr(self, name)
            if not _is_default(value, fine):
                raise ValueError(
                    f"{where}: unsupported {name}={value!r}: loralab does not support {what} "
                    f"(expected {name}={fine!r})"
                )

    # ----- per-layer values -----
    def rank_for(self, path: str) -> int:
        """r of the layer at ``path``: its ``rank_pattern`` entry (PEFT's rule) or ``r``."""
        key = pattern_key(list(self.rank_pattern), path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, path: str) -> float:
        """lora_alpha of the layer at ``path``: its ``alpha_pattern`` entry or ``lora_alpha``."""
        key = pattern_key(list(self.alpha_pattern), path)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def layer_options(self, path: str) -> dict[str, Any]:
        """`LoRALinear`'s keyword options for the layer at ``path`` (its r and alpha by pattern)."""
        return {
            "r": self.rank_for(path),
            "alpha": self.alpha_for(path),
            "dropout": self.lora_dropout,
            "init": self.init,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
        }

    def scaling_for(self, path: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, for the layer at ``path``."""
        return lora_scaling(self.alpha_for(path), self.rank_for(path), self.use_rslora)

    @property
    def init(self) -> str:
        """loralab's name for ``init_lora_weights`` ("kaiming" for True and False)."""
        if isinstance(self.init_lora_weights, bool):
            return "kaiming"
        return str(self.init_lora_weights)

    # ----- adapter_config.json -----
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content (JSON types: lists, not tuples)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "LoraConfig.from_dict") -> LoraConfig:
        """Build and validate a config from an ``adapter_config.json`` dict.

        Every error (TypeError for a wrong type, ValueError for a wrong value) names ``source``
        (the file), the field and its value. Fields PEFT writes for features loralab lacks must
        hold their "off" value (null, false, {} or []); unknown fields likewise; PEFT's
        provenance fields (``peft_version``, ``auto_mapping``, ...) are ignored.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for name in ("peft_type", "r", "lora_alpha"):
            if name not in data:
                raise ValueError(f"{source}: the field {name!r} is missing")
        kwargs = {}
        for name, value in data.items():
            if name in known:
                kwargs[name] = value
            elif name not in _METADATA and not _is_default(value, None):
                raise ValueError(
                    f"{source}: unsupported {name}={_short(value)}: loralab does not implement "
                    f"this PEFT option (expected null, false or empty)"
                )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            message = str(exc).replace("LoraConfig: ", f"{source}: ", 1)
            raise type(exc)(message) from None


def _is_default(value: Any, fine: Any) -> bool:
    """Whether ``value`` means "feature off": ``fine``, null, false, {} or []."""
    if value is None or value is fine:
        return True
    if isinstance(value, (dict, list, tuple)):
        return len(value) == 0
    if isinstance(value, bool) or isinstance(fine, bool):
        return value is False
    return value == fine


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a hand-made, deeply nested value
        return f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA (`loralab.lora.variants.SCALINGS`)."""
    return SCALINGS[use_rslora](alpha, r)
