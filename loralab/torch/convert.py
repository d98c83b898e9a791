"""``to_torch`` and ``to_numpy``: the same model in both worlds, with a registry of converters.

A converted model has the same module names, parameter names (``"0.base.weight"``,
``"0.lora_A"``), values, frozen flags and training mode as the original; values are copied,
never shared.

Adding a layer type (the registry API, kept stable)
---------------------------------------------------
Whoever writes a new loralab layer registers how to convert it, from their own module::

    from loralab.torch.convert import (
        register_converter, register_numpy_converter, param_to_torch, param_to_numpy,
    )

    def gpt_to_torch(np_module, convert_child, dtype):      # -> torch.nn.Module
        t = TorchGPT(...)                                    # same child and parameter names
        t.wte = convert_child(np_module.wte)                 # children: always via convert_child
        t.pos = param_to_torch(np_module.pos, dtype)         # own parameters: via param_to_torch
        return t

    def gpt_to_numpy(torch_module, convert_child):           # -> loralab.nn.Module
        ...                                                  # convert_child / param_to_numpy

    register_converter(GPT, gpt_to_torch)
    register_numpy_converter(TorchGPT, gpt_to_numpy)

``register_converter(np_cls, fn)``: ``fn(np_module, convert_child, dtype) -> torch.nn.Module``,
where ``convert_child(np_child)`` converts a child (with the same dtype; shared children stay
shared) and ``dtype`` is a ``torch.dtype`` or None (keep each array's own dtype): pass it to
`param_to_torch`. ``register_numpy_converter(torch_cls, fn)``:
``fn(torch_module, convert_child) -> loralab.nn.Module``. Converters need not copy the training
flag (``to_torch``/``to_numpy`` do) nor move to a device (``to_torch(device=...)`` does, at the
end). Lookup walks the class's MRO, so a subclass without its own converter uses its parent's.
A LoRA layer's converter starts from `lora_twin` (the other side's layer, built plain around the
converted base) and copies A, B and the options onto it.

A loralab Module with no converter becomes a `Container`: a ``torch.nn.Module`` with the
same parameters and children (so names, adapters and state dicts work) that remembers the
original class and its plain attributes, so ``to_numpy`` rebuilds the original exactly; its
``forward`` raises, asking for a registered converter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, overload

import numpy as np
import torch

from loralab import lora, nn
from loralab.torch.layers import LoRALinear

__all__ = [
    "to_torch",
    "to_numpy",
    "register_converter",
    "register_numpy_converter",
    "param_to_torch",
    "param_to_numpy",
    "lora_twin",
    "Container",
]

# A converter takes its own class (``_linear_to_torch(m: nn.Linear, ...)``), hence the ``...``.
ToTorch = Callable[..., torch.nn.Module]  # (np_module, convert_child, dtype) -> torch module
ToNumpy = Callable[..., nn.Module]  # (torch_module, convert_child) -> loralab module

_TO_TORCH: dict[type, ToTorch] = {}
_TO_NUMPY: dict[type, ToNumpy] = {}


def register_converter(np_cls: type, fn: ToTorch) -> None:
    """Register ``fn(np_module, convert_child, dtype) -> torch.nn.Module`` for ``np_cls`` and subclasses."""
    if not (isinstance(np_cls, type) and issubclass(np_cls, nn.Module)):
        raise TypeError(
            f"register_converter: np_cls must be a loralab.nn.Module class, got {np_cls!r}"
        )
    if not callable(fn):
        raise TypeError(f"register_converter: fn must be callable, got {fn!r}")
    _TO_TORCH[np_cls] = fn


def register_numpy_converter(torch_cls: type, fn: ToNumpy) -> None:
    """Register ``fn(torch_module, convert_child) -> loralab.nn.Module`` for ``torch_cls`` and subclasses."""
    if not (isinstance(torch_cls, type) and issubclass(torch_cls, torch.nn.Module)):
        raise TypeError(
            f"register_numpy_converter: torch_cls must be a torch.nn.Module class, got {torch_cls!r}"
        )
    if not callable(fn):
        raise TypeError(f"register_numpy_converter: fn must be callable, got {fn!r}")
    _TO_NUMPY[torch_cls] = fn


def _lookup(table: dict[type, Any], cls: type) -> Any:
    for klass in cls.__mro__:
        if klass in table:
            return table[klass]
    return None


_TORCH_FLOATS = (torch.float16, torch.float32, torch.float64)  # the ones NumPy has too


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bfloat16:  # NumPy has no bfloat16: the twin could not be checked
            raise TypeError(
                "to_torch: dtype torch.bfloat16 is not supported: NumPy has no bfloat16, so the "
                "twin could not compute or be compared as the NumPy model; use torch.float32, "
                "torch.float16 or torch.float64"
            )
        if dtype not in _TORCH_FLOATS:
            raise TypeError(
                f"to_torch: dtype must be a floating dtype (torch.float16, torch.float32 or "
                f"torch.float64), got {dtype}"
            )
        return dtype
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"to_torch: dtype must be a torch or numpy dtype, got {dtype!r}") from exc
    if not np.issubdtype(np_dtype, np.floating) or np_dtype.itemsize > 8:
        raise TypeError(
            f"to_torch: dtype must be a floating dtype (float16, float32 or float64), got {np_dtype}"
        )
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


@overload
def param_to_torch(p: nn.Parameter, dtype: torch.dtype | None) -> torch.nn.Parameter: ...
@overload
def param_to_torch(p: None, dtype: torch.dtype | None) -> None: ...
def param_to_torch(p: nn.Parameter | None, dtype: torch.dtype | None) -> torch.nn.Parameter | None:
    """A copy of NumPy parameter ``p`` as a ``torch.nn.Parameter`` (same requires_grad); None stays None."""
    if p is None:
        return None
    t = torch.tensor(p.data)
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return torch.nn.Parameter(t, requires_grad=p.requires_grad)


@overload
def param_to_numpy(p: torch.Tensor) -> nn.Parameter: ...
@overload
def param_to_numpy(p: None) -> None: ...
def param_to_numpy(p: torch.Tensor | None) -> nn.Parameter | None:
    """A copy of torch parameter ``p`` as a loralab ``Parameter`` (same requires_grad); None stays None."""
    if p is None:
        return None
    return nn.Parameter(p.detach().cpu().numpy().copy(), requires_grad=p.requires_grad)


class Container(torch.nn.Module):
    """The torch stand-in for a loralab Module that has no registered converter.

    Holds the same parameters and children under the same names, plus ``numpy_class`` and
    ``numpy_attributes`` (the original's other attributes) so that `to_numpy` rebuilds it.
    """

    def __init__(self, numpy_class: type[nn.Module], numpy_attributes: dict[str, Any]):
        super().__init__()
        self.numpy_class = numpy_class
        self.numpy_attributes = numpy_attributes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self.numpy_class.__name__} was converted as a plain Container (it has no torch twin): "
            "register one with loralab.torch.register_converter to run it in torch"
        )

    def extra_repr(self) -> str:
        return f"numpy_class={self.numpy_class.__name__}"


# ----- loralab -> torch ------------------------------------------------------------------------------
def _meta(cls: type, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Build a torch layer on the meta device: no memory, no draw from torch's global RNG."""
    return cls(*args, **kwargs, device="meta")


def _linear_to_torch(m: nn.Linear, convert: Any, dtype: Any) -> torch.nn.Module:
    t = _meta(torch.nn.Linear, m.in_features, m.out_features, bias=m.bias is not None)
    t.weight = param_to_torch(m.weight, dtype)
    if m.bias is not None:  # else torch's bias is None already
        t.bias = param_to_torch(m.bias, dtype)
    return t


def _embedding_to_torch(m: nn.Embedding, convert: Any, dtype: Any) -> torch.nn.Module:
    t = _meta(torch.nn.Embedding, m.num_embeddings, m.embedding_dim)
    t.weight = param_to_torch(m.weight, dtype)
    return t


def _layernorm_to_torch(m: nn.LayerNorm, convert: Any, dtype: Any) -> torch.nn.Module:
    t = _meta(
        torch.nn.LayerNorm, m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None
    )
    if m.weight is not None and m.bias is not None:  # elementwise_affine: both, or neither
        t.weight, t.bias = param_to_torch(m.weight, dtype), param_to_torch(m.bias, dtype)
    return t


def _sequential_to_torch(m: nn.Sequential, convert: Any, dtype: Any) -> torch.nn.Module:
    t = torch.nn.Sequential()
    for name, child in m.named_children():
        t.add_module(name, convert(child))
    return t


def lora_twin(cls: Callable[..., Any], layer: Any, convert: Any) -> Any:
    """The start of a LoRA layer's converter: ``cls`` around ``convert(layer.base)``.

    Built as a plain "kaiming" layer with ``layer``'s r, alpha, dropout and use_rslora: a PiSSA /
    OLoRA base already holds the residual and must not be split again. The constructor freezes
    the base; the converted base's own requires_grad flags are put back. The converter copies
    A, B and the other options next.

    Parameters
    ----------
    cls : type
        The other side's LoRA layer class (``loralab.lora.LoRALinear``, `LoRALinear`, ...).
    layer : LoRA layer
        The layer being converted.
    convert : callable
        The ``convert_child`` the converter was given.
    """
    base = convert(layer.base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    twin = cls(
        base,
        r=layer.r,
        alpha=layer.alpha,
        dropout=layer.dropout,
        use_rslora=layer.use_rslora,
        seed=0,
    )
    for n, p in base.named_parameters():
        p.requires_grad = flags[n]
    return twin


def _lora_to_torch(m: lora.LoRALinear, convert: Any, dtype: Any) -> torch.nn.Module:
    t = lora_twin(LoRALinear, m, convert)
    t.lora_A, t.lora_B = param_to_torch(m.lora_A, dtype), param_to_torch(m.lora_B, dtype)
    t.init, t.use_dora = m.init, bool(getattr(m, "use_dora", False))
    if t.use_dora:
        t.lora_magnitude_vector = param_to_torch(m.lora_magnitude_vector, dtype)
    norm = getattr(m, "_merge_norm", None)
    if norm is not None:  # a merged DoRA layer needs the norm to unmerge
        t._merge_norm = torch.tensor(norm, dtype=dtype or t.base.weight.dtype)
    t.scaling, t.merged = m.scaling, m.merged
    t.copy_adapters_from(m, lambda p: param_to_torch(p, dtype))  # named adapters beyond the first
    return t


_SKIP = ("_parameters", "_modules", "training")


def _generic_to_torch(m: nn.Module, convert: Any, dtype: Any) -> torch.nn.Module:
    names = set(m._parameters) | set(m._modules) | set(_SKIP)
    attrs = {k: copy.deepcopy(v) for k, v in vars(m).items() if k not in names}
    t = Container(type(m), attrs)
    for name, p in m._parameters.items():
        t.register_parameter(name, param_to_torch(p, dtype))
    for name, child in m._modules.items():
        t.add_module(name, convert(child))
    return t


register_converter(nn.Linear, _linear_to_torch)
register_converter(nn.Embedding, _embedding_to_torch)
register_converter(nn.LayerNorm, _layernorm_to_torch)
register_converter(nn.ReLU, lambda m, convert, dtype: torch.nn.ReLU())
register_converter(nn.GELU, lambda m, convert, dtype: torch.nn.GELU(approximate="tanh"))
register_converter(nn.Dropout, lambda m, convert, dtype: torch.nn.Dropout(m.p))
register_converter(nn.Sequential, _sequential_to_torch)  # MLP included: same child names
register_converter(lora.LoRALinear, _lora_to_torch)


def to_torch(model: nn.Module, dtype: Any = None, device: Any = None) -> torch.nn.Module:
    """Convert a loralab model (with or without LoRA layers) to its ``torch.nn.Module`` twin.

    Parameters
    ----------
    model : loralab.nn.Module
    dtype : torch or numpy floating dtype, optional
        float16, float32 or float64: cast every floating parameter to it; None keeps each
        array's dtype (float32 stays float32). bfloat16, complex and integer dtypes are refused.
    device : torch.device or str, optional
        Move the result there ("cuda" for a GPU); None leaves it on the CPU.

    Returns
    -------
    torch.nn.Module
        Linear -> ``torch.nn.Linear``, Embedding, LayerNorm, ReLU and Dropout -> their torch
        namesakes, GELU -> ``torch.nn.GELU(approximate="tanh")``, Sequential and MLP ->
        ``torch.nn.Sequential`` (same child names), LoRALinear -> `loralab.torch.LoRALinear`,
        registered types via their converter, any other Module -> `Container`.

    Examples
    --------
    >>> from loralab.nn import MLP
    >>> t = to_torch(MLP([4, 8, 3], seed=0, dtype="float64"))
    >>> [(n, p.dtype) for n, p in t.named_parameters()][:1]
    [('0.weight', torch.float64)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_torch: expected a loralab.nn.Module, got {type(model).__name__}")
    tdtype = _torch_dtype(dtype)
    memo: dict[int, torch.nn.Module] = {}

    def convert(m: nn.Module) -> torch.nn.Module:
        if not isinstance(m, nn.Module):
            raise TypeError(f"to_torch: expected a loralab.nn.Module, got {type(m).__name__}")
        if id(m) not in memo:
            fn = _lookup(_TO_TORCH, type(m)) or _generic_to_torch
            out = fn(m, convert, tdtype)
            out.training = m.training
            memo[id(m)] = out
        return memo[id(m)]

    result = convert(model)
    return result if device is None else result.to(device)


# ----- torch -> loralab ------------------------------------------------------------------------------
def _linear_to_numpy(t: torch.nn.Linear, convert: Any) -> nn.Module:
    m = nn.Linear(t.in_features, t.out_features, bias=t.bias is not None, seed=0)
    m.weight, m.bias = param_to_numpy(t.weight), param_to_numpy(t.bias)
    return m


def _embedding_to_numpy(t: torch.nn.Embedding, convert: Any) -> nn.Module:
    m = nn.Embedding(t.num_embeddings, t.embedding_dim, seed=0)
    m.weight = param_to_numpy(t.weight)
    return m


def _layernorm_to_numpy(t: torch.nn.LayerNorm, convert: Any) -> nn.Module:
    if len(t.normalized_shape) != 1:
        raise ValueError(
            "to_numpy: loralab.nn.LayerNorm normalises the last axis only; got "
            f"LayerNorm(normalized_shape={tuple(t.normalized_shape)})"
        )
    m = nn.LayerNorm(t.normalized_shape[0], eps=t.eps, elementwise_affine=t.weight is not None)
    m.weight, m.bias = param_to_numpy(t.weight), param_to_numpy(t.bias)
    return m


def _gelu_to_numpy(t: torch.nn.GELU, convert: Any) -> nn.Module:
    if t.approximate != "tanh":
        raise ValueError(
            f"to_numpy: loralab.nn.GELU is the tanh approximation; got GELU(approximate={t.approximate!r}),"
            " expected GELU(approximate='tanh')"
        )
    return nn.GELU()


def _sequential_to_numpy(t: torch.nn.Sequential, convert: Any) -> nn.Module:
    m = nn.Sequential()
    for name, child in t._modules.items():  # named_children() would skip a repeated child
        setattr(m, name, convert(child))
    return m


def _lora_to_numpy(t: LoRALinear, convert: Any) -> nn.Module:
    m = lora_twin(lora.LoRALinear, t, convert)
    m.lora_A, m.lora_B = param_to_numpy(t.lora_A), param_to_numpy(t.lora_B)
    m.init, m.use_dora = t.init, t.use_dora
    if t.use_dora:
        m.lora_magnitude_vector = param_to_numpy(t.lora_magnitude_vector)
    if t._merge_norm is not None:
        m._merge_norm = t._merge_norm.detach().cpu().numpy().copy()
    m.scaling, m.merged = t.scaling, t.merged
    m.copy_adapters_from(t, param_to_numpy)  # named adapters beyond the first
    return m


def _generic_to_numpy(t: torch.nn.Module, convert: Any) -> nn.Module:
    if isinstance(t, Container):
        m = t.numpy_class.__new__(t.numpy_class)
        nn.Module.__init__(m)
        for k, v in t.numpy_attributes.items():
            object.__setattr__(m, k, copy.deepcopy(v))
    elif type(t) is torch.nn.Module:
        m = nn.Module()
    else:
        raise TypeError(
            f"to_numpy: no converter for {type(t).__module__}.{type(t).__name__}; "
            "register one with loralab.torch.register_numpy_converter"
        )
    for name, p in t.named_parameters(recurse=False):
        setattr(m, name, param_to_numpy(p))
    for name, child in t._modules.items():
        setattr(m, name, convert(child))
    return m


register_numpy_converter(torch.nn.Linear, _linear_to_numpy)
register_numpy_converter(torch.nn.Embedding, _embedding_to_numpy)
register_numpy_converter(torch.nn.LayerNorm, _layernorm_to_numpy)
register_numpy_converter(torch.nn.ReLU, lambda t, convert: nn.ReLU())
register_numpy_converter(torch.nn.GELU, _gelu_to_numpy)
register_numpy_converter(torch.nn.Dropout, lambda t, convert: nn.Dropout(t.p))
register_numpy_converter(torch.nn.Sequential, _sequential_to_numpy)
register_numpy_converter(LoRALinear, _lora_to_numpy)


# Options of torch.nn.Embedding that change what it computes, with their neutral values.
_EMBEDDING_DEFAULTS = {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False}
_NUMPY_DTYPES = (torch.float32, torch.float64)


def _check_convertible(module: torch.nn.Module) -> None:
    """Refuse, before converting anything, what loralab would compute differently."""
    for name, t in module.named_modules():
        if isinstance(t, torch.nn.Embedding):
            # padding_idx keeps one row's gradient at zero, max_norm renormalises rows in the
            # forward, scale_grad_by_freq rescales gradients: loralab.nn.Embedding does none.
            for option, default in _EMBEDDING_DEFAULTS.items():
                value = getattr(t, option)
                if value != default:
                    raise ValueError(
                        f"to_numpy: {name or 'the model'!r} is Embedding({option}={value}), which "
                        f"loralab.nn.Embedding does not implement (only {option}={default})"
                    )
    for name, p in module.named_parameters():
        if p.dtype not in _NUMPY_DTYPES:
            raise TypeError(
                f"to_numpy: parameter {name!r} has dtype {p.dtype}; loralab computes in float32 "
                "or float64: convert the model first with model.float() or model.double()"
            )


def to_numpy(module: torch.nn.Module) -> nn.Module:
    """Convert a torch model built from the layers `to_torch` produces back to loralab.

    Parameters
    ----------
    module : torch.nn.Module
        Made of ``torch.nn.Linear``, ``Embedding``, ``LayerNorm`` (last axis), ``ReLU``,
        ``GELU(approximate="tanh")``, ``Dropout``, ``Sequential``, `loralab.torch.LoRALinear`,
        `Container`, plain ``torch.nn.Module`` holders, or registered types.

    Returns
    -------
    loralab.nn.Module
        Same names, values (copied to the CPU, dtype kept), frozen flags and training mode.

    Raises
    ------
    TypeError
        For a torch layer with no converter (the message says how to register one), or a
        parameter that is not float32 or float64 (bfloat16, float16: NumPy has no bfloat16).
    ValueError
        For an ``Embedding`` with ``padding_idx``, ``max_norm`` or ``scale_grad_by_freq``.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"to_numpy: expected a torch.nn.Module, got {type(module).__name__}")
    _check_convertible(module)
    memo: dict[int, nn.Module] = {}

    def convert(t: torch.nn.Module) -> nn.Module:
        if id(t) not in memo:
            fn = _lookup(_TO_NUMPY, type(t)) or _generic_to_numpy
            out = fn(t, convert)
            object.__setattr__(out, "training", t.training)
            memo[id(t)] = out
        return memo[id(t)]

    return convert(module)
