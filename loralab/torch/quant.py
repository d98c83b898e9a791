"""The torch twin of `loralab.quant.Linear4bit`: the same stored bytes, dequantized by torch.

The codes and constants are the NumPy `QuantizedTensor`'s, held as buffers (they move with
``.to(device)``); `Linear4bit.dequantized_weight` repeats the NumPy dequantization op for op in
float32, so the weights the two sides compute with are equal bit for bit. As on the NumPy side,
`Linear4bitFunction` dequantizes W0 in the forward pass and again in the backward pass. Quantizing (and
re-quantizing in `Linear4bit.add_delta_`) is done once, by the NumPy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loralab import quant
from loralab.quant.blockwise import DOUBLE_QUANT_BLOCK_SIZE, LEVELS, QuantizedTensor
from loralab.quant.levels import DYNAMIC8_VALUES
from loralab.torch.convert import register_converter, register_numpy_converter
from loralab.torch.layers import register_linear_type

__all__ = ["Linear4bit", "Linear4bitFunction"]


def _pairs(levels: np.ndarray) -> torch.Tensor:
    sixteen = np.zeros(16, dtype=np.float32)
    sixteen[: levels.size] = levels
    return torch.from_numpy(np.stack([np.repeat(sixteen, 16), np.tile(sixteen, 16)], axis=1))


@register_linear_type
class Linear4bit(torch.nn.Module):
    """``y = x dequantize(W0)^T + b``, W0 stored blockwise in 4 (or 8) bits and frozen.

    Build one from the NumPy layer with `from_numpy` (or convert a whole model with
    `loralab.torch.to_torch`). A `loralab.torch.LoRALinear` wraps it as its base (QLoRA): the
    layer computes ``base(x) + s ((x * mask) A^T) B^T`` and merges through `add_delta_`.

    Parameters
    ----------
    weight : loralab.quant.QuantizedTensor of shape (out_features, in_features)
    bias : torch.Tensor of shape (out_features,), optional
        Kept as a frozen Parameter.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, QuantizedTensor) or len(weight.shape) != 2:
            raise TypeError(f"Linear4bit: weight must be a 2-D QuantizedTensor, got {weight!r}")
        self.out_features, self.in_features = weight.shape
        self.dtype, self.block_size = weight.dtype, weight.block_size
        self.compute_dtype = np.dtype(np.float32)  # what forward returns; A and B are made of it
        self.register_buffer("codes", torch.from_numpy(weight.codes.copy()))
        self.register_buffer("absmax_stored", torch.from_numpy(weight.absmax_stored.copy()))
        dq = weight.double_quant
        scale = weight.absmax_scale.copy() if dq else np.zeros(0, np.float32)
        offset = np.float32(weight.absmax_offset if dq else 0)
        self.double_quant = dq
        self.register_buffer("absmax_scale", torch.from_numpy(scale))
        self.register_buffer("absmax_offset", torch.tensor(offset))
        levels = LEVELS[self.dtype]
        table = _pairs(levels) if levels.size <= 16 else torch.from_numpy(levels.copy())
        self.register_buffer("levels", table, persistent=False)
        self.register_buffer("dynamic8", torch.from_numpy(DYNAMIC8_VALUES.copy()), persistent=False)
        self.bias = (
            None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        )

    @classmethod
    def from_numpy(cls, layer: quant.Linear4bit) -> Linear4bit:
        """The twin of a NumPy `loralab.quant.Linear4bit` (same codes, constants and bias)."""
        bias = None if layer.bias is None else torch.from_numpy(layer.bias.data.copy())
        return cls(layer.weight, bias)

    def quantized(self) -> QuantizedTensor:
        """The stored weight as a NumPy `QuantizedTensor` (copies of the buffers)."""
        dq = self.double_quant
        return QuantizedTensor(
            self.codes.cpu().numpy().copy(),
            (self.out_features, self.in_features),
            self.dtype,
            self.block_size,
            self.absmax_stored.cpu().numpy().copy(),
            self.absmax_scale.cpu().numpy().copy() if dq else None,
            np.float32(self.absmax_offset.item()) if dq else None,
        )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # loaded buffers are checked whole, as a QuantizedTensor is when built: a code outside the
        # level table or a NaN or negative constant is a named ValueError, not a wrong W0 later
        incoming = {
            name: state_dict.get(prefix + name, getattr(self, name))
            for name in ("codes", "absmax_stored", "absmax_scale", "absmax_offset")
        }
        arrays = {k: v.detach().cpu().numpy() for k, v in incoming.items()}
        current = {k: getattr(self, k) for k in incoming}
        if all(arrays[k].shape == tuple(current[k].shape) for k in arrays):  # else torch says so
            dq = self.double_quant
            try:
                QuantizedTensor(
                    arrays["codes"].astype(current["codes"].cpu().numpy().dtype),
                    (self.out_features, self.in_features),
                    self.dtype,
                    self.block_size,
                    arrays["absmax_stored"].astype(current["absmax_stored"].cpu().numpy().dtype),
                    arrays["absmax_scale"].astype(np.float32) if dq else None,
                    np.float32(arrays["absmax_offset"]) if dq else None,
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"Linear4bit: loading the buffers under {prefix!r}: {exc}"
                ) from exc
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _state(self) -> tuple[torch.Tensor, ...]:
        # the stored tensors; add_delta_ replaces them (never writes into them), so a snapshot
        # taken in forward still describes the W0 that forward used
        return (self.codes, self.absmax_stored, self.absmax_scale, self.absmax_offset)

    def _absmax(
        self, stored: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        if not self.double_quant:
            return stored
        spread = scale.repeat_interleave(DOUBLE_QUANT_BLOCK_SIZE)[: stored.numel()]
        return self.dynamic8[stored.long()] * spread + offset

    def _dequantize(self, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        codes, stored, scale, offset = state
        n, bs = self.out_features * self.in_features, self.block_size
        if self.levels.ndim == 2:  # 4-bit: each byte gives its two levels at once
            values = self.levels[codes.long()].reshape(-1)[:n]
        else:
            values = self.levels[codes.long()]
        absmax = self._absmax(stored, scale, offset)
        full = n - n % bs
        head = values[:full].reshape(-1, bs) * absmax[: full // bs, None]
        if full < n:
            head = torch.cat([head.reshape(-1), values[full:] * absmax[-1]])
        return head.reshape(self.out_features, self.in_features)

    def absmax(self) -> torch.Tensor:
        """Per-block scales, shape (n_blocks,), float32 (dequantized if double quantized)."""
        return self._absmax(self.absmax_stored, self.absmax_scale, self.absmax_offset)

    @property
    def num_quantized_values(self) -> int:
        """out_features * in_features: the frozen W0's values, stored quantized, not as a Parameter.

        `loralab.lora.count_parameters` adds them to the model's total (as PEFT counts a 4-bit
        base), so a QLoRA model's trainable fraction is measured against the whole model.
        """
        return self.out_features * self.in_features

    def dequantized_weight(self) -> torch.Tensor:
        """W0, shape (out_features, in_features), float32, equal to the NumPy layer's."""
        return self._dequantize(self._state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x of shape (..., in_features) -> (..., out_features); no gradient for W0."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit(in_features={self.in_features}): expected x of shape "
                f"(..., {self.in_features}), got {tuple(x.shape)}"
            )
        return Linear4bitFunction.apply(x, self.bias, self, self._state())

    @torch.no_grad()
    def add_delta_(self, delta: Any) -> Linear4bit:
        """Merge ΔW (out_features, in_features) into W0 and re-quantize (the NumPy rule)."""
        delta = (
            delta.detach().cpu().numpy() if isinstance(delta, torch.Tensor) else np.asarray(delta)
        )
        if delta.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"Linear4bit.add_delta_: expected delta of shape "
                f"({self.out_features}, {self.in_features}), got {delta.shape}"
            )
        merged = self.dequantized_weight().cpu().numpy() + delta.astype(np.float32)
        q = quant.quantize(merged, self.dtype, self.block_size, self.double_quant)
        device = self.codes.device
        self.codes = torch.from_numpy(q.codes.copy()).to(device)
        self.absmax_stored = torch.from_numpy(q.absmax_stored.copy()).to(device)
        if q.double_quant:
            self.absmax_scale = torch.from_numpy(q.absmax_scale.copy()).to(device)
            self.absmax_offset = torch.tensor(q.absmax_offset, device=device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, block_size={self.block_size}{dq}"
        )


class Linear4bitFunction(torch.autograd.Function):
    """``y = x W0^T + b``, W0 dequantized in forward and again in backward (the NumPy `Linear4bitFn`).

    Between the two passes only the 4-bit codes are referenced, as in bitsandbytes' 4-bit matmul.
    Backward: dx = dy W0; no dW0; db = the sum of dy over rows, if b requires a gradient.
    """

    @staticmethod
    def forward(ctx, x, bias, layer, state):
        ctx.layer, ctx.state = layer, state
        W0 = layer._dequantize(state).to(x.dtype)
        return torch.nn.functional.linear(x, W0, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        need_x, need_b = ctx.needs_input_grad[:2]
        dx = grad @ ctx.layer._dequantize(ctx.state).to(grad.dtype) if need_x else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if need_b else None
        return dx, db, None, None


def _to_numpy(t: Linear4bit, convert: Any) -> quant.Linear4bit:
    bias = None if t.bias is None else t.bias.detach().cpu().numpy().copy()
    return quant.Linear4bit.from_quantized(t.quantized(), bias)


register_converter(quant.Linear4bit, lambda m, convert, dtype: Linear4bit.from_numpy(m))
register_numpy_converter(Linear4bit, _to_numpy)
