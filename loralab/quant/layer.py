"""`Linear4bit`: a frozen Linear whose W0 is stored in 4 bits, the base layer of QLoRA.

QLoRA (Dettmers et al. 2023, Eq. 5) computes ``Y = X doubleDequant(c1, c2, W_NF4)^T + s X A^T B^T``:
the base weight lives in NF4 and is dequantized to the compute dtype whenever it is used; only
the adapter (A, B) is trained, so the backward pass needs dX through the dequantized W0 and never
a gradient of W0 (which would have nowhere to go: 4-bit codes are not trainable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loralab import functional as F
from loralab.lora.inject import match_target
from loralab.nn import Linear, Module, Parameter
from loralab.nn.layers import check_input
from loralab.quant.blockwise import QuantizedTensor, quantize
from loralab.tensor import Tensor

__all__ = ["Linear4bit", "quantize_model"]


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

    Notes
    -----
    ``forward`` dequantizes W0 once per call (n multiplications) and uses it for y and, in the
    backward pass, for dx = dy W0; no dW0 is ever formed.
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
        self.weight = weight
        self.bias = (
            None if bias is None else Parameter(np.asarray(bias, np.float32), requires_grad=False)
        )

    def dequantized_weight(self) -> np.ndarray:
        """W0 as the layer computes with it: shape (out_features, in_features), float32."""
        return self.weight.dequantize()

    def forward(self, x: Any) -> Tensor:
        """x of shape (..., in_features) -> y of shape (..., out_features)."""
        x = check_input(f"Linear4bit(in_features={self.in_features})", x, self.in_features)
        return F.linear(x, self.dequantized_weight(), self.bias)

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
    replaced, so a refused call leaves the model as it was.

    Raises
    ------
    ValueError
        ``target_modules`` matches no Linear (the message lists the Linear modules).
    """
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if name and isinstance(m, Linear)]
    chosen = [n for n in linears if target_modules is None or match_target(n, target_modules)]
    if not chosen:
        raise ValueError(
            f"quantize_model: target_modules={target_modules!r} matched no Linear; "
            f"the Linear modules of this model are {linears}"
        )
    built = {
        name: Linear4bit(
            modules[name], dtype=dtype, block_size=block_size, double_quant=double_quant
        )
        for name in chosen
    }
    for name, layer in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model
