"""loralab.quant's code books and blockwise quantizer, checked from first principles (no bitsandbytes)."""

from statistics import NormalDist

import numpy as np
import pytest

from loralab.quant import (
    DOUBLE_QUANT_BLOCK_SIZE,
    DYNAMIC8_VALUES,
    FP4_VALUES,
    INT4_VALUES,
    INT8_VALUES,
    LEVELS,
    NF4_VALUES,
    QuantizedTensor,
    pack_4bit,
    quantize,
    quantize_blockwise_8bit,
    unpack_4bit,
)
from loralab.quant.levels import NF4_OFFSET, linspace_float32


def weights(shape, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----- the code books ---------------------------------------------------------------------------------
def test_nf4_levels_are_asymmetric_normal_quantiles_from_minus_one_to_one():
    assert NF4_VALUES.shape == (16,) and NF4_VALUES.dtype == np.float32
    assert np.all(np.diff(NF4_VALUES) > 0)
    assert NF4_VALUES[0] == -1 and NF4_VALUES[-1] == 1
    assert (
        (NF4_VALUES < 0).sum() == 7 and (NF4_VALUES == 0).sum() == 1 and (NF4_VALUES > 0).sum() == 8
    )
    # The paper's construction in float64, independently: quantiles at evenly spaced probabilities.
    inv = NormalDist().inv_cdf
    positive = [inv(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-inv(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
    ideal = np.sort(positive + [0.0] + negative)
    np.testing.assert_allclose(NF4_VALUES, ideal / ideal.max(), rtol=0, atol=1e-6)


def test_linspace_float32_ends_exactly_and_is_evenly_spaced():
    points = linspace_float32(0.9677083, 0.5, 9)
    assert points.dtype == np.float32
    assert points[0] == np.float32(0.9677083) and points[-1] == np.float32(0.5)
    np.testing.assert_allclose(np.diff(points.astype(np.float64)), (0.5 - 0.9677083) / 8, rtol=1e-5)


def test_fp4_levels_are_sign_and_magnitude():
    assert FP4_VALUES.shape == (16,)
    assert FP4_VALUES[3] == 1 and FP4_VALUES[11] == -1  # code 0b011: the largest magnitude
    np.testing.assert_array_equal(FP4_VALUES[8:], -FP4_VALUES[:8])
    magnitudes = np.sort(FP4_VALUES[:8]) * 12  # before the scaling to [-1, 1]
    np.testing.assert_allclose(magnitudes, [0, 0.0625, 2, 3, 4, 6, 8, 12], rtol=1e-6)


def test_integer_levels_are_uniform():
    np.testing.assert_allclose(np.diff(INT4_VALUES), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(np.diff(INT8_VALUES), 1 / 127, rtol=1e-5)
    assert INT4_VALUES.size == 15 and INT8_VALUES.size == 255 and 0 in INT4_VALUES


def test_dynamic_map_has_256_sorted_levels_from_below_minus_099_to_one():
    assert DYNAMIC8_VALUES.shape == (256,)
    assert np.all(np.diff(DYNAMIC8_VALUES) > 0)
    assert DYNAMIC8_VALUES[-1] == 1 and 0 in DYNAMIC8_VALUES and -1 < DYNAMIC8_VALUES[0] < -0.99


def test_code_books_are_read_only():
    with pytest.raises(ValueError):
        NF4_VALUES[0] = 0


# ----- packing -----------------------------------------------------------------------------------------
def test_pack_puts_the_first_code_in_the_high_nibble_and_unpack_inverts():
    assert pack_4bit(np.array([1, 2, 15, 0], np.uint8)).tolist() == [0x12, 0xF0]
    codes = np.random.default_rng(1).integers(0, 16, 101).astype(np.uint8)
    padded = np.append(codes, np.uint8(0))
    np.testing.assert_array_equal(unpack_4bit(pack_4bit(padded), 101), codes)


# ----- quantize ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(LEVELS))
def test_every_value_gets_its_nearest_level_in_its_own_block(dtype):
    W = weights((48, 64), seed=2)
    q = quantize(W, dtype, block_size=64)
    blocks = W.reshape(-1, 64).astype(np.float64)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_array_equal(q.absmax, absmax.astype(np.float32))
    scaled = blocks / absmax[:, None]
    levels = LEVELS[dtype].astype(np.float64)
    got = levels[q.level_codes()].reshape(scaled.shape)
    best = np.abs(scaled[..., None] - levels).min(axis=-1)
    # float32 arithmetic may pick the other level only at a near-tie
    np.testing.assert_allclose(np.abs(scaled - got), best, atol=1e-6)


@pytest.mark.parametrize("dtype", sorted(LEVELS))
def test_dequantize_error_is_at_most_half_a_gap_times_absmax(dtype):
    W = weights((64, 96), seed=3)
    q = quantize(W, dtype, block_size=64)
    D = q.dequantize()
    assert D.shape == W.shape and D.dtype == np.float32
    half_gap = np.diff(np.sort(LEVELS[dtype])).max() / 2
    bound = np.repeat(q.absmax, 64).reshape(W.shape) * half_gap * (1 + 1e-6)
    assert np.all(np.abs(D - W) <= bound)


def test_nf4_beats_int4_on_normal_weights():
    W = weights((256, 256), seed=4)
    err = {d: np.mean((quantize(W, d).dequantize() - W) ** 2) for d in ("nf4", "int4", "int8")}
    assert err["int8"] < err["nf4"] < err["int4"]


def test_each_block_is_scaled_on_its_own():
    W = weights((4, 64), seed=5)
    W2 = W.copy()
    W2[0] *= 100  # only block 0 changes
    q, q2 = quantize(W), quantize(W2)
    np.testing.assert_array_equal(q.level_codes()[64:], q2.level_codes()[64:])
    np.testing.assert_array_equal(q.absmax[1:], q2.absmax[1:])


@pytest.mark.parametrize("n", [1, 2, 63, 65, 127, 200])
def test_sizes_not_a_multiple_of_the_block_are_padded(n):
    W = weights((n,), seed=n)
    q = quantize(W, "nf4", block_size=64)
    n_blocks = -(-n // 64)
    assert q.absmax.shape == (n_blocks,) and q.codes.shape == (-(-n // 2),)
    assert q.absmax[-1] == np.abs(W[(n_blocks - 1) * 64 :]).max()  # the short block's own absmax
    D = q.dequantize()
    assert D.shape == (n,)
    half_gap = np.diff(NF4_VALUES).max() / 2
    assert np.all(np.abs(D - W) <= np.repeat(q.absmax, 64)[:n] * half_gap * (1 + 1e-6))
    if n % 2:  # the pad nibble is the code of 0
        assert q.codes[-1] & 0x0F == int(np.flatnonzero(NF4_VALUES == 0)[0])


def test_a_zero_block_dequantizes_to_exact_zeros():
    W = weights((3, 64), seed=6)
    W[1] = 0
    for dq in (False, True):
        D = quantize(W, "nf4", double_quant=dq).dequantize()
        assert np.all(D[1] == 0)


def test_extremes_of_each_block_are_exact():
    W = weights((8, 64), seed=7)
    D = quantize(W, "nf4").dequantize()
    rows = np.arange(8)
    peak = np.abs(W).argmax(axis=1)
    np.testing.assert_array_equal(D[rows, peak], W[rows, peak])


def test_float64_input_is_quantized_as_float32():
    W = weights((32, 64), seed=8)
    a, b = quantize(W.astype(np.float64)), quantize(W)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.absmax, b.absmax)


def test_int8_stores_one_byte_per_value():
    W = weights((16, 64), seed=9)
    q = quantize(W, "int8")
    assert q.codes.shape == (W.size,) and q.nbytes == W.size + 4 * (W.size // 64)


# ----- memory and double quantization ------------------------------------------------------------------
def test_nbytes_counts_packed_codes_and_constants():
    W = weights((1024, 1024), seed=10)
    n, n_blocks = W.size, W.size // 64
    plain = quantize(W, "nf4")
    assert plain.nbytes == n // 2 + 4 * n_blocks
    assert plain.bits_per_parameter == 4 + 32 / 64
    dq = quantize(W, "nf4", double_quant=True)
    n_groups = -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE)
    assert dq.nbytes == n // 2 + n_blocks + 4 * n_groups + 4
    # QLoRA: 4 + 8/64 + 32/(64 * 256) bits, plus one float32 offset per tensor
    assert dq.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, rel=1e-12)
    assert dq.nbytes / (4 * n) <= 0.145


def test_double_quant_constants_are_close_to_the_float32_ones():
    W = weights((512, 256), seed=11)
    plain, dq = quantize(W), quantize(W, double_quant=True)
    np.testing.assert_array_equal(plain.codes, dq.codes)  # the 4-bit codes use the exact absmax
    centred = plain.absmax - dq.absmax_offset
    scale = np.repeat(dq.absmax_scale, DOUBLE_QUANT_BLOCK_SIZE)[: centred.size]
    half_gap = np.diff(DYNAMIC8_VALUES).max() / 2
    assert np.all(np.abs(dq.absmax - plain.absmax) <= scale * (half_gap + 2e-5) + 1e-9)
    assert dq.absmax_offset == np.float32(plain.absmax.astype(np.float64).mean())


def test_blockwise_8bit_is_within_two_lookup_half_steps_of_the_nearest_level():
    # The value is first rounded to the nearest of 65,536 points of [-1, 1] (at most 1/65535
    # away), and that point's nearest level is taken: |x - chosen| <= |x - nearest| + 2/65535.
    x = np.random.default_rng(12).standard_normal(256 * 64).astype(np.float32)
    codes, absmax = quantize_blockwise_8bit(x)
    np.testing.assert_array_equal(absmax, np.abs(x.reshape(-1, 256)).max(axis=1))
    normed = (x.reshape(-1, 256) / absmax[:, None]).reshape(-1).astype(np.float64)
    levels = DYNAMIC8_VALUES.astype(np.float64)
    best = np.abs(normed[:, None] - levels).min(axis=1)
    got = np.abs(normed - levels[codes])
    assert np.all(got <= best + 2 / 65535 + 1e-7)
    assert np.mean(got > best + 1e-7) < 1e-2  # the nearest level almost always


# ----- the result object and errors --------------------------------------------------------------------
def test_quantized_tensor_reports_what_it_holds():
    q = quantize(weights((8, 64)), "fp4", block_size=32, double_quant=True)
    assert (q.shape, q.dtype, q.block_size, q.double_quant) == ((8, 64), "fp4", 32, True)
    assert q.codes.dtype == np.uint8 and q.absmax.dtype == np.float32
    assert "fp4" in repr(q) and "double_quant" in repr(q)
    with pytest.raises(AttributeError):
        q.dtype = "nf4"  # frozen
    assert isinstance(q, QuantizedTensor)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"W": np.arange(64)}, TypeError, ["W", "int64"]),
        ({"W": np.array([1.0, np.nan, 2.0])}, ValueError, ["W", "finite", "(1,)", "nan"]),
        ({"W": np.array([[1.0, np.inf]])}, ValueError, ["W", "finite", "inf"]),
        ({"W": np.zeros((0, 4))}, ValueError, ["W", "(0, 4)"]),
        ({"block_size": 48}, ValueError, ["block_size", "power of two", "48"]),
        ({"block_size": 1}, ValueError, ["block_size", "1"]),
        ({"block_size": 64.0}, TypeError, ["block_size", "float"]),
        ({"block_size": True}, TypeError, ["block_size", "bool"]),
        ({"dtype": "nf3"}, ValueError, ["dtype", "nf4", "'nf3'"]),
        ({"dtype": 4}, TypeError, ["dtype", "int"]),
        ({"double_quant": "yes"}, TypeError, ["double_quant", "'yes'"]),
    ],
)
def test_bad_input_is_refused_by_name(kwargs, error, words):
    args = {"W": weights((4, 64))} | kwargs
    with pytest.raises(error) as info:
        quantize(**args)
    for word in words:
        assert word in str(info.value)


# ----- the memory arithmetic ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(LEVELS))
@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_parameter_is_what_a_large_tensor_stores(dtype, double_quant):
    from loralab.quant import bits_per_parameter

    W = weights((256, 256), seed=13)  # 1024 blocks of 64: 4 whole groups of 256 constants
    q = quantize(W, dtype, block_size=64, double_quant=double_quant)
    per_tensor = 32 / W.size if double_quant else 0  # the float32 mean of the constants
    assert q.bits_per_parameter == pytest.approx(
        bits_per_parameter(dtype, block_size=64, double_quant=double_quant) + per_tensor, rel=1e-12
    )


def test_quantized_bytes_gives_the_papers_llama_65b_figure():
    from loralab.quant import quantized_bytes

    assert (
        quantized_bytes(65e9, "nf4", double_quant=True) == 65e9 * (4 + 8 / 64 + 32 / 64 / 256) / 8
    )
    with pytest.raises(ValueError, match="dtype"):
        quantized_bytes(10, "nf5")


@pytest.mark.parametrize(
    ("block_size", "error"), [(64.0, TypeError), (True, TypeError), (1, ValueError)]
)
def test_bits_per_parameter_block_size_type_and_value(block_size, error):
    from loralab.quant.memory import bits_per_parameter

    with pytest.raises(error, match="block_size"):
        bits_per_parameter("nf4", block_size=block_size)
