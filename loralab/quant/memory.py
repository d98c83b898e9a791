"""Bits per parameter of a blockwise-quantized weight: the arithmetic of QLoRA's Section 3.

A k-bit code per value plus one float32 absmax per block of ``block_size`` values::

    k + 32 / block_size                                  (NF4, blocks of 64: 4.5 bits)

and with double quantization (the absmax constants in 8 bits, in blocks of 256, each block with
a float32 scale)::

    k + 8 / block_size + 32 / (block_size * 256)         (NF4, blocks of 64: 4.127 bits)

These are the limits for a large tensor; `QuantizedTensor.bits_per_parameter` measures a real one
(its last block's padding and the float32 mean of the constants add a few bytes per tensor).
"""

from __future__ import annotations

from typing import Any

from loralab.quant.blockwise import _BITS, DOUBLE_QUANT_BLOCK_SIZE

__all__ = ["bits_per_parameter", "quantized_bytes", "qlora_memory"]


def bits_per_parameter(
    dtype: str = "nf4", *, block_size: int = 64, double_quant: bool = False
) -> float:
    """Bits stored per parameter by ``quantize(W, dtype, block_size, double_quant)`` for a large W.

    >>> bits_per_parameter("nf4"), round(bits_per_parameter("nf4", double_quant=True), 3)
    (4.5, 4.127)
    """
    if dtype not in _BITS:
        raise ValueError(f"bits_per_parameter: dtype must be one of {sorted(_BITS)}, got {dtype!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"bits_per_parameter: block_size must be an int, got {block_size!r}")
    if block_size < 2:
        raise ValueError(f"bits_per_parameter: block_size must be >= 2, got {block_size!r}")
    if double_quant:
        return _BITS[dtype] + 8 / block_size + 32 / (block_size * DOUBLE_QUANT_BLOCK_SIZE)
    return _BITS[dtype] + 32 / block_size


def quantized_bytes(
    n_params: int, dtype: str = "nf4", *, block_size: int = 64, double_quant: bool = False
) -> float:
    """Bytes of ``n_params`` weights quantized so: ``n_params * bits_per_parameter / 8``.

    >>> round(quantized_bytes(65e9, "nf4", double_quant=True) / 1e9, 1)  # LLaMA 65B (QLoRA, Sec. 3)
    33.5
    """
    return (
        n_params * bits_per_parameter(dtype, block_size=block_size, double_quant=double_quant) / 8
    )


def qlora_memory(estimate: Any, dtype: str, double_quant: bool) -> dict:
    """QLoRA's training memory next to a LoRA estimate (a `loralab.counting.MemoryEstimate`).

    The frozen base is quantized (`quantized_bytes` of the model's parameters); the adapter's
    weights, gradients and optimizer states stay as the estimate has them. Activations excluded.
    Returns the ``qlora`` entry of ``loralab params --json``.
    """
    base = round(quantized_bytes(estimate.total_params, dtype, double_quant=double_quant))
    base_unquantized = estimate.lora.weights - estimate.adapter_bytes
    adapter = estimate.lora.total - base_unquantized
    return {
        "quant": dtype,
        "double_quant": bool(double_quant),
        "bits_per_parameter": bits_per_parameter(dtype, double_quant=double_quant),
        "base_weights_bytes": base,
        "base_weights_bytes_unquantized": base_unquantized,
        "memory_qlora_bytes": base + adapter,
    }
