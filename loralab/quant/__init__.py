"""QLoRA from scratch: 4-bit NormalFloat (and FP4, int4, int8) blockwise quantization in NumPy.

- `levels`: the code books (`NF4_VALUES` from normal quantiles, `FP4_VALUES`, int4/int8, and
  bitsandbytes' 8-bit dynamic map for double quantization), each derived in code.
- `blockwise`: `quantize` -> `QuantizedTensor` (packed codes, absmax constants, optional double
  quantization), equal byte for byte to bitsandbytes' CPU kernels.
- `layer`: `Linear4bit`, a frozen quantized base layer (LoRA wraps it: QLoRA), and `quantize_model`.
- `memory`: `bits_per_parameter` and `quantized_bytes`, the paper's memory arithmetic.
- `loftq`: LoftQ's initialisation (alternate quantizing and a rank-r SVD of the residual).

NumPy only: torch and bitsandbytes are never imported here (the tests import them to compare).
"""

from loralab.quant.blockwise import (
    DOUBLE_QUANT_BLOCK_SIZE,
    LEVELS,
    QuantizedTensor,
    dequantize_blockwise_8bit,
    pack_4bit,
    quantize,
    quantize_blockwise_8bit,
    unpack_4bit,
)
from loralab.quant.layer import Linear4bit, Linear4bitFn, Workspace, quantize_model
from loralab.quant.levels import (
    DYNAMIC8_VALUES,
    FP4_VALUES,
    INT4_VALUES,
    INT8_VALUES,
    NF4_VALUES,
    normal_float_levels,
)
from loralab.quant.loftq import LoftQResult, loftq
from loralab.quant.memory import bits_per_parameter, quantized_bytes

__all__ = [
    "NF4_VALUES",
    "FP4_VALUES",
    "INT4_VALUES",
    "INT8_VALUES",
    "DYNAMIC8_VALUES",
    "LEVELS",
    "DOUBLE_QUANT_BLOCK_SIZE",
    "normal_float_levels",
    "QuantizedTensor",
    "quantize",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "pack_4bit",
    "unpack_4bit",
    "Linear4bit",
    "Linear4bitFn",
    "Workspace",
    "quantize_model",
    "bits_per_parameter",
    "quantized_bytes",
    "loftq",
    "LoftQResult",
]
