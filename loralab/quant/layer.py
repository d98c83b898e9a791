"""`Linear4bit`: a frozen Linear whose W0 is stored in 4 bits, the base layer of QLoRA.

QLoRA (Dettmers et al. 2023, Eq. 5) computes ``Y = X doubleDequant(c1, c2, W_NF4)^T + s X A^T B^T``:
the base weight lives in NF4 and is dequantized to the compute dtype whenever it is used; only
the adapter (A, B) is trained, so the backward pass needs dX through the dequantized W0 and never
a gradient of W0 (which would have nowhere to go: 4-bit codes are not trainable).

`Linear4bitFn` does what bitsandbytes' 4-bit matmul does: W0 is dequantized in the forward pass
and again in the backward pass, so that between the two only the 4-bit codes are held (keeping
every layer's float32 W0 until its backward would give the memory back). Both dequantize into a
`Workspace`, one float32 array reused by all the layers of a model: NumPy hands a freed large
array back to the operating system, and a fresh W0 per call cost as much in page faults as the
dequantization itself (torch's caching allocator spares bitsandbytes this). The array is per
thread, so several threads may call one quantized model's forward at once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from loralab.lora.inject import match_target
from loralab.lora.linear_shared import LoRALayerMixin, register_linear_type
from loralab.nn import Linear, Module, Parameter
from loralab.nn.layers import check_input
from loralab.quant.blockwise import QuantizedTensor, quantize
from loralab.tensor import Function, Tensor

__all__ = ["Linear4bit", "Linear4bitFn", "Workspace", "quantize_model"]


class Workspace:
    """A float32 scratch array for dequantized weights, grown to the largest request.

    `Linear4bit` layers dequantize W0 into it in the forward and the backward pass; the layers
    of one model share one (`quantize_model` gives them the same), so it holds one layer's W0.
    Each thread gets its own array, so threads calling one model's forward at once never write
    into the W0 another thread is multiplying with (a thread holds at most one scratch W0).
    A copy (or a pickled model) starts with an empty workspace.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (Workspace, ())  # scratch is never copied; threading.local cannot be pickled

    def _buffer(self) -> np.ndarray:
        return getattr(self._local, "buffer", _EMPTY)

    def get(self, size: int) -> np.ndarray:
        """A float32 array of at least ``size`` elements, the calling thread's (contents are scratch)."""
        buffer = self._buffer()
        if buffer.size < size:
            buffer = self._local.buffer = np.empty(size, dtype=np.float32)
        return buffer

    @property
    def nbytes(self) -> int:
        """Bytes of the calling thread's scratch array (4 x its largest request so far)."""
        return int(self._buffer().nbytes)


_EMPTY = np.empty(0, dtype=np.float32)


class Linear4bitFn(Function):
    """``y = x W0^T + b`` with ``W0 = weight.dequantize()``, rebuilt in backward instead of saved.

    Inputs x (..., in) and b (out,) or None; output (..., out). Backward: dx = dy W0 (W0
    dequantized again); no dW0; db = sum of dy over rows if b needs it. Keyword options
    ``weight`` (a `QuantizedTensor` of shape (out, in)) and ``workspace``.

    The math is `loralab.functional.LinearFn`'s, but that Function saves W for its backward,
    which would hold every layer's float32 W0 between the passes; this one saves the codes.
    """

    @staticmethod
    def forward(ctx, x, b, *, weight, workspace):
        W0 = weight.dequantize(out=workspace.get(weight.workspace_size))
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ W0.T
        if b is not None:
            y += b
        ctx.save_for_backward(weight, workspace, x.shape, b is not None)
        return y.reshape(x.shape[:-1] + (W0.shape[0],))

    @staticmethod
    def backward(ctx, grad):
        weight, workspace, x_shape, has_bias = ctx.saved
        need_x, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        dx = None
        if need_x:
            W0 = weight.dequantize(out=workspace.get(weight.workspace_size))
            dx = (g @ W0).reshape(x_shape)
        db = g.sum(axis=0) if has_bias and need_b else None
        return dx, db


@register_linear_type
class Linear4bit(Module):
    """``y = x dequantize(W0)^T + b`` with W0 quantized blockwise (NF4 by default) and frozen.

    Parameters
    ----------
    linear : loralab.nn.Linear
        The layer to quantize; its weight (out_features, in_features) becomes `weight`, its
        bias is kept in float32 as a frozen Parameter (bitsandbytes keeps biases unquantized).
    dtype : {"nf4", "fp4", "int4", "int8"}, default "nf4"
    block_size : int, default 64
    double_quant : bool, default True
        Quantize the absmax constants too (QLoRA's double quantization).

    Attributes
    ----------
    weight : QuantizedTensor of shape (out_features, in_features)
        Not a Parameter: it has no gradient and is not in ``parameters()`` or ``state_dict()``.
    bias : Parameter of shape (out_features,), requires_grad False, or None
    in_features, out_features : int
    compute_dtype : numpy dtype
        float32: what forward returns (and what LoRA's A and B are made of on this base).

    workspace : Workspace
        Where W0 is dequantized during forward and backward (shared by `quantize_model`'s layers).

    Notes
    -----
    ``forward`` dequantizes W0 once per call (n multiplications) for y, and the backward pass
    dequantizes it once more for dx = dy W0 (`Linear4bitFn`); no dW0 is ever formed.
    """

    def __init__(
        self,
        linear: Linear,
        *,
        dtype: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
    ):
        super().__init__()
        if not isinstance(linear, Linear):
            raise TypeError(
                f"Linear4bit: expected a loralab.nn.Linear, got {type(linear).__name__}"
            )
        weight = quantize(linear.weight.data, dtype, block_size, double_quant)
        self._store(weight, None if linear.bias is None else linear.bias.data)

    @classmethod
    def from_quantized(cls, weight: QuantizedTensor, bias: Any = None) -> Linear4bit:
        """A layer around an already quantized weight (out_features, in_features) and a bias."""
        if not isinstance(weight, QuantizedTensor) or len(weight.shape) != 2:
            raise TypeError(f"Linear4bit: weight must be a 2-D QuantizedTensor, got {weight!r}")
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer._store(weight, bias)
        return layer

    def _store(self, weight: QuantizedTensor, bias: Any) -> None:
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = np.dtype(np.float32)
        self.workspace = Workspace()
        self.weight = weight
        self.bias = (
            None if bias is None else Parameter(np.asarray(bias, np.float32), requires_grad=False)
        )

    @property
    def num_quantized_values(self) -> int:
        """out_features * in_features: the frozen W0's values, stored quantized, not as a Parameter.

        `loralab.lora.count_parameters` adds them to the model's total (as PEFT counts a 4-bit
        base), so a QLoRA model's trainable fraction is measured against the whole model.
        """
        return self.out_features * self.in_features

    def dequantized_weight(self) -> np.ndarray:
        """W0 as the layer computes with it: shape (out_features, in_features), float32."""
        return self.weight.dequantize()

    def forward(self, x: Any) -> Tensor:
        """x of shape (..., in_features) -> y of shape (..., out_features)."""
        x = check_input(f"Linear4bit(in_features={self.in_features})", x, self.in_features)
        return Linear4bitFn.apply(x, self.bias, weight=self.weight, workspace=self.workspace)

    def add_delta_(self, delta: Any) -> Linear4bit:
        """Merge ``delta`` (ΔW = s B A, shape (out_features, in_features)) into the 4-bit W0.

        Dequantizes W0, adds ΔW and quantizes again with the same format. The result is not
        W0 + ΔW: the sum is rounded to the 4-bit grid once more, and that rounding error (of
        the order of the quantization step, usually larger than ΔW itself) is the price of
        merging into a quantized base. Unmerging (adding -ΔW) does not give back the old codes.
        """
        delta = np.asarray(getattr(delta, "data", delta))
        if delta.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"Linear4bit.add_delta_: expected delta of shape "
                f"({self.out_features}, {self.in_features}), got {delta.shape}"
            )
        merged = self.dequantized_weight() + delta.astype(np.float32)
        w = self.weight
        self.weight = quantize(merged, w.dtype, w.block_size, w.double_quant)
        return self

    def extra_repr(self) -> str:
        w = self.weight
        dq = ", double_quant" if w.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={w.dtype}, block_size={w.block_size}{dq}"
        )


def quantize_model(
    model: Module,
    target_modules: str | Sequence[str] | None = None,
    *,
    dtype: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> Module:
    """Replace the model's Linear layers (all, or those named) by frozen `Linear4bit` layers.

    Parameters
    ----------
    model : Module
    target_modules : str or sequence of str, optional
        PEFT's rules, as `inject_lora`: a list of names or name suffixes (``"fc"`` matches
        ``"mlp.fc"``), or a regular expression for the whole name. None quantizes every Linear.
    dtype, block_size, double_quant : as `Linear4bit`

    Returns
    -------
    The same model, changed in place. Every selected layer is quantized before any is
    replaced, so a refused call leaves the model as it was. On a model with LoRA layers already
    (`loralab.lora.inject_lora` first), the Linear bases inside them are quantized (a LoRA
    layer's own name selects its base); refused for merged layers, DoRA adapters and adapters
    that are not float32.

    Raises
    ------
    ValueError
        ``target_modules`` matches no Linear (the message lists the Linear modules).
    """
    modules = dict(model.named_modules())
    linears = {name: m for name, m in modules.items() if name and isinstance(m, Linear)}
    chosen = [
        n
        for n in linears
        if target_modules is None
        or match_target(n, target_modules)
        or (
            _lora_parent(modules, n) is not None
            and match_target(n[: -len(".base")], target_modules)
        )
    ]
    if not chosen:
        raise ValueError(
            f"quantize_model: target_modules={target_modules!r} matched no Linear; "
            f"the Linear modules of this model are {list(linears)}"
        )
    for name in chosen:
        lora = _lora_parent(modules, name)
        if lora is not None:
            _check_lora_parent(name, lora)
    built = {
        name: Linear4bit(
            linears[name], dtype=dtype, block_size=block_size, double_quant=double_quant
        )
        for name in chosen
    }
    workspace = Workspace()
    for name, layer in built.items():
        layer.workspace = workspace
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        lora = _lora_parent(modules, name)
        if lora is not None:  # the LoRA layer now runs base(x) + its branch (W0 is not plain)
            lora.plain_base = False
    return model


def _lora_parent(modules: dict[str, Module], name: str) -> LoRALayerMixin | None:
    """The LoRA layer whose base is module ``name``, if it is one."""
    parent, _, child = name.rpartition(".")
    layer = modules.get(parent) if child == "base" else None
    return layer if isinstance(layer, LoRALayerMixin) else None


def _check_lora_parent(name: str, layer: LoRALayerMixin) -> None:
    """Refuse, by name, a LoRA layer whose base cannot become 4-bit under its adapters."""
    where = f"quantize_model: {name!r} is the base of a LoRA layer"
    if layer.merged:
        raise ValueError(
            f"{where} whose adapters {layer.merged_adapters} are merged; unmerge first"
        )
    dora = [n for n in layer.adapter_names if layer.adapter(n).use_dora]
    if dora:
        raise ValueError(f"{where} with DoRA adapters {dora}, which need W0 itself")
    dtypes = sorted({str(layer.adapter(n).lora_A.data.dtype) for n in layer.adapter_names})
    if dtypes != ["float32"]:
        raise ValueError(
            f"{where} whose adapters are {dtypes}; a 4-bit base computes in float32, so its "
            "adapters must be float32 too (quantize before inject_lora)"
        )
