"""Blockwise absmax quantization to 4 or 8 bits, and QLoRA's double quantization of the constants.

A weight W is flattened and cut into blocks of ``block_size`` values (the last block may be
shorter: it is quantized on its own, as bitsandbytes does). For every block b::

    absmax_b = max_i |W_i|                  (one float32 constant per block)
    code_i   = argmin_k |W_i / absmax_b - LEVELS[k]|
    W_i     ~= LEVELS[code_i] * absmax_b     (dequantization)

Two 4-bit codes share a byte, the first in the high nibble (bitsandbytes' packing). With a
float32 constant per 64 weights that is 4 + 32/64 = 4.5 bits per parameter; double quantization
(QLoRA, Section 3) quantizes the constants too: minus their mean, to 8 bits in blocks of 256,
which costs 8/64 + 32/(64 * 256) bits, 4.127 bits per parameter in all.

Rounding follows bitsandbytes' CPU code exactly, so codes match it byte for byte:

- 4-bit: ``W * (1 / absmax)`` in float32 (the short last block divides instead), then the
  nearest level, a tie going to the lower level (``torch.bucketize`` on the midpoints).
- 8-bit constants: bitsandbytes' C kernel does not search the 256 levels; it rounds the
  normalised value to one of 65,536 evenly spaced points of [-1, 1] and reads that point's
  nearest level from a table. The point is at most 1/65535 from the value, so the level chosen
  is at most 2/65535 = 3.1e-5 (in units of the block's absmax) farther than the nearest one:
  values near a midpoint between two levels, or near 0 where the levels are closer together
  than the points, can get another level. `quantize_blockwise_8bit` reproduces the table, so it
  makes the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from loralab.quant.levels import (
    DYNAMIC8_VALUES,
    FP4_VALUES,
    INT4_VALUES,
    INT8_VALUES,
    NF4_VALUES,
)

__all__ = [
    "QuantizedTensor",
    "quantize",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "pack_4bit",
    "unpack_4bit",
    "LEVELS",
    "DOUBLE_QUANT_BLOCK_SIZE",
]

DOUBLE_QUANT_BLOCK_SIZE = 256
"""Block size of the second quantization (of the absmax constants), as QLoRA and bitsandbytes."""

LEVELS: dict[str, np.ndarray] = {
    "nf4": NF4_VALUES,
    "fp4": FP4_VALUES,
    "int4": INT4_VALUES,
    "int8": INT8_VALUES,
}
"""The code book of each format, indexed by code."""

_BITS = {"nf4": 4, "fp4": 4, "int4": 4, "int8": 8}
_TINY = np.float32(1e-38)  # bitsandbytes' floor under absmax before taking 1 / absmax
_LUT_POINTS = 65536


def _search_table(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Midpoints of the sorted levels, and the code of each sorted position. A stable sort keeps
    # FP4's +0 (code 0) before its "-0" (code 8), the order bitsandbytes' argsort gives.
    order = np.argsort(levels, kind="stable")
    ordered = levels[order]
    midpoints = (ordered[:-1] + ordered[1:]) / np.float32(2)
    return midpoints, order.astype(np.uint8)


_SEARCH = {name: _search_table(levels) for name, levels in LEVELS.items()}


def _pair_table(levels: np.ndarray) -> np.ndarray:
    # byte -> (level of its high nibble, level of its low nibble), shape (256, 2); int4's unused
    # 16th code decodes to 0
    sixteen = np.zeros(16, dtype=np.float32)
    sixteen[: levels.size] = levels
    return np.stack([np.repeat(sixteen, 16), np.tile(sixteen, 16)], axis=1)


_PAIRS = {name: _pair_table(levels) for name, levels in LEVELS.items() if _BITS[name] == 4}


@cache
def _quad_table(dtype: str) -> np.ndarray:
    # two bytes read as one little-endian uint16 v (v & 0xFF is the first byte) -> their four
    # levels, shape (65536, 4), 1 MiB: one gather per two bytes, about 15% faster than per byte
    pairs = _PAIRS[dtype]
    v = np.arange(65536)
    table = np.concatenate([pairs[v & 0xFF], pairs[v >> 8]], axis=1)
    table.flags.writeable = False
    return table


def pack_4bit(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first of each pair in the high nibble.

    Parameters
    ----------
    codes : ndarray of shape (n,), uint8 values in [0, 16); n even

    Returns
    -------
    ndarray of shape (n // 2,), uint8
    """
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of `pack_4bit`: the first ``n`` codes, shape (n,), uint8."""
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]


def _blocks_scaled(flat: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block absmax, shape (n_blocks,), and ``flat / absmax`` clipped to [-1, 1], shape (n,)."""
    n = flat.size
    full = n - n % block_size
    blocks = flat[:full].reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    inverse = np.float32(1) / np.maximum(absmax, _TINY)
    scaled = np.clip(blocks * inverse[:, None], -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_max = np.abs(tail).max()
        absmax = np.append(absmax, tail_max)
        tail_scaled = np.clip(tail / np.maximum(tail_max, _TINY), -1, 1)
        scaled = np.concatenate([scaled, tail_scaled])
    return scaled.astype(np.float32, copy=False), absmax.astype(np.float32, copy=False)


def _nearest_codes(scaled: np.ndarray, dtype: str) -> np.ndarray:
    midpoints, order = _SEARCH[dtype]
    return order[np.searchsorted(midpoints, scaled, side="left")]


def _lut_8bit(levels: np.ndarray) -> np.ndarray:
    # bitsandbytes' build_quantize_lut: point i of [-1, 1] is -1 + 2i / 65535 (float32), and
    # gets the first level whose upper midpoint is not below it.
    i = np.arange(_LUT_POINTS, dtype=np.float32)
    points = np.float32(-1) + (np.float32(2) * i) / np.float32(_LUT_POINTS - 1)
    midpoints = np.float32(0.5) * (levels[:-1] + levels[1:])
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


_DYNAMIC8_LUT = _lut_8bit(DYNAMIC8_VALUES)


def quantize_blockwise_8bit(
    x: np.ndarray, block_size: int = DOUBLE_QUANT_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' 8-bit blockwise quantization (dynamic map), as its CPU kernel computes it.

    Used by double quantization on the (absmax - mean) constants. Each block's values are
    multiplied by 1 / absmax (float32), clipped to [-1, 1], mapped to the nearest of 65,536
    evenly spaced points, ``trunc(fma((v + 1) / 2, 65535, 0.5))``, and that point's nearest
    level is the code: at most 2/65535 farther than the nearest level (see the module docstring).

    Parameters
    ----------
    x : ndarray of shape (n,), float32
    block_size : int

    Returns
    -------
    codes : ndarray of shape (n,), uint8, indices into `DYNAMIC8_VALUES`
    absmax : ndarray of shape (ceil(n / block_size),), float32
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n_blocks = -(-x.size // block_size)
    padded = np.zeros(n_blocks * block_size, dtype=np.float32)
    padded[: x.size] = x
    blocks = padded.reshape(n_blocks, block_size)
    absmax = np.maximum(np.abs(blocks).max(axis=1), np.float32(0))
    safe = np.where(absmax == 0, np.float32(1), absmax)
    normed = np.clip(blocks * (np.float32(1) / safe)[:, None], -1, 1)
    half = (normed + np.float32(1)) * np.float32(0.5)
    # One rounding of half * 65535 + 0.5 (a fused multiply-add): exact in float64, then float32.
    point = (half.astype(np.float64) * (_LUT_POINTS - 1) + 0.5).astype(np.float32)
    codes = _DYNAMIC8_LUT[point.astype(np.int64)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[: x.size], absmax


def dequantize_blockwise_8bit(codes: np.ndarray, absmax: np.ndarray, block_size: int) -> np.ndarray:
    """``DYNAMIC8_VALUES[codes] * absmax`` block by block; shape (n,), float32."""
    values = DYNAMIC8_VALUES[codes]
    return values * np.repeat(absmax, block_size)[: codes.size]


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A weight stored blockwise in 4 or 8 bits; `dequantize` gives the float32 approximation.

    Build one with `quantize`. Fields (all NumPy arrays are the stored bytes); a tensor built by
    hand (or from loaded arrays) is checked whole when it is made, so a wrong length, a code
    outside the level table or a non-finite constant is a ValueError naming the field:

    Attributes
    ----------
    codes : ndarray, uint8
        4-bit formats: shape (ceil(n / 2),), two codes per byte, the first in the high nibble
        (bitsandbytes' order; an odd n is padded with the code of 0). int8: shape (n,).
    shape : tuple of int
        The shape of the original weight (n = its size).
    dtype : str
        ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``.
    block_size : int
    absmax_stored : ndarray of shape (n_blocks,)
        float32 constants, or with double quantization their uint8 codes in `DYNAMIC8_VALUES`.
    absmax_scale : ndarray of shape (ceil(n_blocks / 256),), float32, or None
        Double quantization: the absmax of each block of 256 centred constants.
    absmax_offset : numpy.float32 or None
        Double quantization: the mean subtracted from the constants before quantizing them.
    """

    codes: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    absmax_stored: np.ndarray
    absmax_scale: np.ndarray | None = None
    absmax_offset: np.float32 | None = None

    def __post_init__(self) -> None:
        _validate_quantized(self)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are themselves quantized."""
        return self.absmax_scale is not None

    @property
    def size(self) -> int:
        """The number of quantized values, n."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def absmax(self) -> np.ndarray:
        """The per-block scales, shape (n_blocks,), float32 (dequantized if double quantized)."""
        if self.absmax_scale is None:
            return self.absmax_stored
        centred = dequantize_blockwise_8bit(
            self.absmax_stored, self.absmax_scale, DOUBLE_QUANT_BLOCK_SIZE
        )
        return centred + self.absmax_offset

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes plus the constants (the shared code books excluded)."""
        total = self.codes.nbytes + self.absmax_stored.nbytes
        if self.absmax_scale is not None:
            total += self.absmax_scale.nbytes + np.dtype(np.float32).itemsize
        return int(total)

    @property
    def bits_per_parameter(self) -> float:
        """``8 * nbytes / n``: 4.5 for NF4 with 64-blocks, 4.127 with double quantization."""
        return 8 * self.nbytes / self.size

    def level_codes(self) -> np.ndarray:
        """One code per value, shape (n,), uint8 (the 4-bit codes unpacked)."""
        if _BITS[self.dtype] == 8:
            return self.codes
        return unpack_4bit(self.codes, self.size)

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:
        """``LEVELS[code] * absmax`` of each value's block, float32, of the original shape.

        ``out``, a float32 array of at least `workspace_size` elements, is written to instead
        of a new array (the result is then a view of it).
        """
        n, bs = self.size, self.block_size
        if _BITS[self.dtype] == 4:
            # gather the levels of two bytes at once (not unpack, then index: 4x slower)
            if self.codes.size % 2 == 0:
                table, index = _quad_table(self.dtype), self.codes.view("<u2")
            else:
                table, index = _PAIRS[self.dtype], self.codes
        else:
            table, index = LEVELS[self.dtype][:, None], self.codes
        width = table.shape[1]
        if out is None:
            out = np.empty(index.size * width, dtype=np.float32)
        gathered = out[: index.size * width].reshape(-1, width)
        np.take(table, index, axis=0, out=gathered, mode="clip")  # indices are in range
        values = out[:n]
        absmax = self.absmax
        full = n - n % bs
        head = values[:full].reshape(-1, bs)
        np.multiply(head, absmax[: full // bs, None], out=head)
        if full < n:
            values[full:] *= absmax[-1]
        return values.reshape(self.shape)

    @property
    def workspace_size(self) -> int:
        """The float32 elements `dequantize` writes (n, plus one pad value for an odd 4-bit n)."""
        return self.codes.size * (2 if _BITS[self.dtype] == 4 else 1)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={self.shape}, dtype={self.dtype!r}, "
            f"block_size={self.block_size}{dq}, nbytes={self.nbytes})"
        )


def _check_block_size(block_size: Any, where: str = "quantize") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"{where}: block_size must be an int, got {type(block_size).__name__}")
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"{where}: block_size must be a power of two >= 2, got {block_size}")
    return int(block_size)


def _check_array(name: str, value: Any, dtype: Any, length: int) -> np.ndarray:
    where = "QuantizedTensor"
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where}: {name} must be a NumPy array, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{where}: {name} must have dtype {np.dtype(dtype)}, got {value.dtype}")
    if value.shape != (length,):
        raise ValueError(
            f"{where}: {name} must have shape ({length},) for this shape and block size, "
            f"got {value.shape}"
        )
    return value


def _check_constants(name: str, values: np.ndarray, non_negative: bool) -> None:
    bad = ~np.isfinite(values) | ((values < 0) if non_negative else False)
    if bad.any():
        i = int(np.argmax(bad))
        kind = "finite and >= 0" if non_negative else "finite"
        raise ValueError(
            f"QuantizedTensor: {name} must be {kind}; {int(bad.sum())} values are not, the "
            f"first at index {i} is {values[i]!r}"
        )


def _validate_quantized(q: QuantizedTensor) -> None:
    """Check every field of ``q`` against the others (lengths, dtypes, codes, constants)."""
    where = "QuantizedTensor"
    if not isinstance(q.dtype, str) or q.dtype not in LEVELS:
        raise ValueError(f"{where}: dtype must be one of {sorted(LEVELS)}, got {q.dtype!r}")
    _check_block_size(q.block_size, where)
    shape = q.shape
    if not isinstance(shape, tuple) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(f"{where}: shape must be a tuple of positive ints, got {shape!r}")
    n = int(np.prod(shape, dtype=np.int64))
    n_blocks = -(-n // q.block_size)
    four_bit = _BITS[q.dtype] == 4
    codes = _check_array("codes", q.codes, np.uint8, -(-n // 2) if four_bit else n)
    n_levels = LEVELS[q.dtype].size
    if n_levels < 2 ** _BITS[q.dtype]:  # int4 (15 levels) and int8 (255): some codes mean nothing
        top = (
            max(int((codes >> 4).max()), int((codes & 0x0F).max()))
            if four_bit
            else int(codes.max())
        )
        if top >= n_levels:
            raise ValueError(
                f"{where}: codes must index the {n_levels} levels of {q.dtype!r} (0 to "
                f"{n_levels - 1}), got a code {top}"
            )
    if q.absmax_scale is None:
        if q.absmax_offset is not None:
            raise ValueError(f"{where}: absmax_offset is set but absmax_scale is None")
        absmax = _check_array("absmax_stored", q.absmax_stored, np.float32, n_blocks)
        _check_constants("absmax_stored", absmax, non_negative=True)
        return
    _check_array("absmax_stored", q.absmax_stored, np.uint8, n_blocks)
    scale = _check_array(
        "absmax_scale", q.absmax_scale, np.float32, -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE)
    )
    _check_constants("absmax_scale", scale, non_negative=True)
    offset = q.absmax_offset
    if not isinstance(offset, np.float32):
        raise TypeError(
            f"{where}: absmax_offset must be a numpy.float32 with double quantization, got "
            f"{offset!r} ({type(offset).__name__})"
        )
    _check_constants("absmax_offset", np.array([offset]), non_negative=False)
    with np.errstate(over="ignore", invalid="ignore"):
        _check_constants("the dequantized absmax", q.absmax, non_negative=False)


def _check_weight(W: Any) -> np.ndarray:
    data = getattr(W, "data", W) if not isinstance(W, np.ndarray) else W
    array = np.asarray(data)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"quantize: W must hold floating-point values (float16, float32 or float64), "
            f"got dtype {array.dtype}"
        )
    if array.size == 0:
        raise ValueError(f"quantize: W must have at least one value, got shape {array.shape}")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(
            f"quantize: W must be finite; {int((~finite).sum())} values are not, "
            f"the first at index {tuple(int(i) for i in bad)} is {array[tuple(bad)]!r}"
        )
    limit = float(np.finfo(np.float32).max)
    too_big = np.abs(array) > limit
    if too_big.any():  # float64 values that would round to inf in float32
        bad = np.argwhere(too_big)[0]
        raise ValueError(
            f"quantize: W must fit in float32 (|W| <= {limit:.4g}); {int(too_big.sum())} values "
            f"do not, the first at index {tuple(int(i) for i in bad)} is {array[tuple(bad)]!r}"
        )
    return array


def quantize(
    W: Any, dtype: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> QuantizedTensor:
    """Quantize W blockwise: absmax scaling per block, then the nearest level of ``dtype``.

    Parameters
    ----------
    W : ndarray (or Tensor) of any shape, floating point
        Quantized as float32 (float64 values are rounded to float32 first).
    dtype : {"nf4", "fp4", "int4", "int8"}
        The code book: `NF4_VALUES`, `FP4_VALUES`, `INT4_VALUES` or `INT8_VALUES`.
    block_size : int, power of two, default 64
        Values sharing one absmax. The last block is shorter when W's size is not a multiple.
    double_quant : bool, default False
        Quantize the absmax constants as well (8 bits, blocks of 256, after subtracting their
        mean), as QLoRA and bitsandbytes' ``compress_statistics=True``.

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    TypeError
        W not floating point; dtype not a str; block_size or double_quant of the wrong type.
    ValueError
        W empty, not finite or beyond float32's range; dtype unknown; block_size not a power of
        two >= 2.

    Examples
    --------
    >>> W = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    >>> q = quantize(W, "nf4", double_quant=True)
    >>> q.dequantize().shape, round(q.bits_per_parameter, 3)
    ((256, 256), 4.127)
    """
    if not isinstance(dtype, str):
        raise TypeError(f"quantize: dtype must be a str, got {type(dtype).__name__}")
    if dtype not in LEVELS:
        raise ValueError(f"quantize: dtype must be one of {sorted(LEVELS)}, got {dtype!r}")
    block_size = _check_block_size(block_size)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise TypeError(f"quantize: double_quant must be a bool, got {double_quant!r}")
    array = _check_weight(W)
    flat = array.astype(np.float32, copy=False).reshape(-1)

    scaled, absmax = _blocks_scaled(flat, block_size)
    codes = _nearest_codes(scaled, dtype)
    if _BITS[dtype] == 4:
        if codes.size % 2:
            codes = np.append(codes, _nearest_codes(np.zeros(1, np.float32), dtype))
        codes = pack_4bit(codes)

    if not double_quant:
        return QuantizedTensor(codes, array.shape, dtype, block_size, absmax)
    # The correctly rounded mean (bitsandbytes takes torch's float32 mean, whose last bit depends
    # on the CPU's vector width; the two agree to about one unit in the last place).
    offset = np.float32(absmax.astype(np.float64).mean())
    absmax_codes, absmax_scale = quantize_blockwise_8bit(absmax - offset)
    return QuantizedTensor(
        codes, array.shape, dtype, block_size, absmax_codes, absmax_scale, offset
    )
