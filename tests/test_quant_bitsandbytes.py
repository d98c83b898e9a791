"""loralab.quant against bitsandbytes on CPU: the same levels, codes, constants and dequantized values.

bitsandbytes (0.45+) quantizes on CPU with ``quantize_4bit`` (a torch kernel: absmax, multiply by
1/absmax, bucketize on the midpoints) and ``quantize_blockwise`` (a C kernel with a 65,536-point
lookup table); our NumPy code follows both, so codes agree byte for byte. Two differences are
bitsandbytes', found by these tests and documented in `loralab.quant.blockwise`:

- double quantization subtracts the mean of the constants, which bitsandbytes takes in torch's
  float32 reduction (rounding that depends on the CPU's vector width); we take the correctly
  rounded mean. The offsets agree to an ulp or two; given bitsandbytes' offset, everything after
  it is identical.
- bitsandbytes 0.50's CPU ``dequantize_4bit`` C kernel (AVX-512) gives wrong values when a
  block spans two rows (last dimension not a multiple of the block size); for those shapes we
  compare with bitsandbytes' own reference implementation in torch.
"""

import glob
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the bitsandbytes cross-check needs torch")
bnb_functional = pytest.importorskip(
    "bitsandbytes.functional",
    reason='bitsandbytes is not installed (pip install -e ".[quant]" in the repository)',
)

from safetensors.numpy import load_file  # noqa: E402

from loralab.quant import (  # noqa: E402
    DYNAMIC8_VALUES,
    FP4_VALUES,
    NF4_VALUES,
    QuantizedTensor,
    dequantize_blockwise_8bit,
    quantize,
    quantize_blockwise_8bit,
)

pytestmark = pytest.mark.quant

CHECKPOINTS = sorted(
    glob.glob(str(Path(__file__).parents[1] / "loralab" / "data" / "checkpoints" / "*.safetensors"))
)


def bnb_4bit(W, quant_type, double_quant, block_size=64):
    packed, state = bnb_functional.quantize_4bit(
        torch.from_numpy(W),
        blocksize=block_size,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    return packed, state


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantization; its torch reference where its CPU kernel is wrong (see above)."""
    shape = tuple(state.shape)
    if shape[-1] % state.blocksize == 0:
        return bnb_functional.dequantize_4bit(packed, state).numpy().reshape(shape)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    out = _dequantize_4bit_compute(
        packed.reshape(-1), absmax, code, state.blocksize, shape, torch.float32
    )
    return out.numpy().reshape(shape)


def as_quantized(packed, state, dtype):
    """bitsandbytes' stored parts as our QuantizedTensor, to dequantize them with our code."""
    if state.nested:
        return QuantizedTensor(
            packed.numpy().reshape(-1), tuple(state.shape), dtype, state.blocksize,
            state.absmax.numpy(), state.state2.absmax.numpy(), np.float32(state.offset.item()),
        )  # fmt: skip
    return QuantizedTensor(
        packed.numpy().reshape(-1), tuple(state.shape), dtype, state.blocksize, state.absmax.numpy()
    )


def random_weights():
    rng = np.random.default_rng(0)
    yield "normal(64, 64)", (rng.standard_normal((64, 64)) * 0.02).astype(np.float32)
    yield "normal(256, 128)", rng.standard_normal((256, 128)).astype(np.float32)
    yield "heavy-tailed(128, 192)", rng.standard_t(3, (128, 192)).astype(np.float32)
    with_zeros = rng.standard_normal((8, 64)).astype(np.float32)
    with_zeros[2] = 0
    yield "zero block(8, 64)", with_zeros
    yield "odd size(33, 17)", rng.standard_normal((33, 17)).astype(np.float32)
    yield "short(7,)", rng.standard_normal(7).astype(np.float32)
    yield "blocks over rows(12, 96)", rng.standard_normal((12, 96)).astype(np.float32)


def checkpoint_weights():
    for path in CHECKPOINTS:
        for name, W in load_file(path).items():
            if W.ndim == 2:
                yield f"{Path(path).stem}:{name}", W


CASES = list(random_weights()) + list(checkpoint_weights())


def test_the_checkpoints_are_there():
    assert len(CHECKPOINTS) >= 2 and len(list(checkpoint_weights())) >= 10


def test_levels_equal_bitsandbytes_bit_for_bit():
    assert (
        NF4_VALUES.tobytes() == bnb_functional.get_4bit_type("nf4", device="cpu").numpy().tobytes()
    )
    assert (
        FP4_VALUES.tobytes() == bnb_functional.get_4bit_type("fp4", device="cpu").numpy().tobytes()
    )
    assert DYNAMIC8_VALUES.tobytes() == bnb_functional.create_dynamic_map().numpy().tobytes()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("label", "W"), CASES, ids=[c[0] for c in CASES])
def test_codes_absmax_and_dequantized_values_equal_bitsandbytes(label, W, quant_type):
    packed, state = bnb_4bit(W, quant_type, double_quant=False)
    q = quantize(W, quant_type, block_size=64)
    assert q.codes.tobytes() == packed.numpy().tobytes()
    assert q.absmax.tobytes() == state.absmax.numpy().tobytes()
    np.testing.assert_array_equal(q.dequantize(), bnb_dequantize(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("label", "W"), CASES, ids=[c[0] for c in CASES])
def test_double_quantization_equals_bitsandbytes(label, W, quant_type):
    packed, state = bnb_4bit(W, quant_type, double_quant=True)
    q = quantize(W, quant_type, block_size=64, double_quant=True)
    assert q.codes.tobytes() == packed.numpy().tobytes()

    # The mean of the constants: torch's float32 reduction against the correctly rounded mean.
    bnb_offset = np.float32(state.offset.item())
    assert abs(q.absmax_offset - bnb_offset) <= 2 * np.spacing(bnb_offset)

    # From the same offset on, the 8-bit quantization of the constants is the same, byte for byte.
    raw_absmax = bnb_4bit(W, quant_type, double_quant=False)[1].absmax.numpy()
    codes8, scale8 = quantize_blockwise_8bit(raw_absmax - bnb_offset)
    assert codes8.tobytes() == state.absmax.numpy().tobytes()
    assert scale8.tobytes() == state.state2.absmax.numpy().tobytes()
    np.testing.assert_array_equal(
        dequantize_blockwise_8bit(codes8, scale8, 256),
        bnb_functional.dequantize_blockwise(state.absmax, state.state2).numpy(),
    )

    # bitsandbytes' stored parts, dequantized by our code: the same values.
    expected = bnb_dequantize(packed, state)
    np.testing.assert_array_equal(as_quantized(packed, state, quant_type).dequantize(), expected)

    # Our own end to end: the offset's last bits can move a centred constant across a lookup
    # point, so a rare constant gets the neighbouring 8-bit level; every other block is equal to
    # within a few ulps of the offset.
    ours8, theirs8 = q.absmax_stored.astype(int), state.absmax.numpy().astype(int)
    moved = ours8 != theirs8
    assert moved.mean() <= 0.01 and np.all(np.abs(ours8 - theirs8)[moved] == 1)
    kept = np.repeat(~moved, 64)[: W.size].reshape(W.shape)
    np.testing.assert_allclose(
        q.dequantize()[kept], expected[kept], rtol=0, atol=8 * float(np.spacing(bnb_offset))
    )


def test_blockwise_8bit_equals_bitsandbytes_on_many_values():
    x = np.random.default_rng(3).standard_normal(256 * 200 + 17).astype(np.float32)
    x[:256] = 0  # an all-zero block
    out, state = bnb_functional.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    codes, absmax = quantize_blockwise_8bit(x)
    assert codes.tobytes() == out.numpy().tobytes()
    assert absmax.tobytes() == state.absmax.numpy().tobytes()
    # and bitsandbytes' search is not always the nearest level; ours is not either, identically
    normed = x / np.repeat(np.where(absmax == 0, 1, absmax), 256)[: x.size]
    nearest = np.abs(normed[:, None].astype(np.float64) - DYNAMIC8_VALUES).argmin(axis=1)
    assert 0 < np.count_nonzero((codes != nearest)[256:]) < 1e-2 * x.size


def test_the_bitsandbytes_cpu_kernel_issue_we_work_around_is_real_or_fixed():
    # Documented, not hidden: when it is fixed upstream this test says so and the workaround can go.
    W = np.random.default_rng(4).standard_normal((12, 96)).astype(np.float32)
    packed, state = bnb_4bit(W, "nf4", double_quant=False)
    kernel = bnb_functional.dequantize_4bit(packed, state).numpy()
    ours = quantize(W, "nf4").dequantize()
    if not np.array_equal(kernel, ours):
        assert (
            np.abs(kernel - W).max() > np.abs(ours - W).max()
        )  # the kernel is the one that is off
