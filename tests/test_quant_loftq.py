"""LoftQ: Q + s B A approximates W better than Q alone; the same steps as PEFT's loftq_init."""

import numpy as np
import pytest

from loralab.quant import Linear4bit, loftq, quantize


def weight(shape=(96, 128), seed=0):
    rng = np.random.default_rng(seed)
    low_rank = rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1])) * 0.05
    return (rng.standard_normal(shape) * 0.02 + low_rank).astype(np.float32)


def test_loftq_beats_plain_quantization_and_iterations_help():
    W = weight()
    result = loftq(W, r=8, num_iter=5)
    plain = quantize(W).dequantize()
    assert result.quantization_error == pytest.approx(
        np.linalg.norm(W - plain) / np.linalg.norm(W), rel=1e-6
    )
    assert result.errors[0] < 0.9 * result.quantization_error
    assert min(result.errors[1:]) < result.errors[0]
    approx = result.weight.dequantize() + result.B @ result.A
    np.testing.assert_allclose(
        np.linalg.norm(W - approx) / np.linalg.norm(W), result.errors[-1], rtol=1e-4
    )


def test_the_factors_have_loras_shapes_and_scaling():
    W = weight()
    one, two = loftq(W, r=4, scaling=1.0), loftq(W, r=4, scaling=2.0)
    assert one.A.shape == (4, 128) and one.B.shape == (96, 4)
    np.testing.assert_allclose(2.0 * two.B @ two.A, one.B @ one.A, rtol=1e-5, atol=1e-7)


def test_a_loftq_layer_starts_closer_to_the_pretrained_layer():
    from loralab.lora import inject_lora
    from loralab.nn import Sequential

    W = weight(seed=1)
    result = loftq(W, r=8, num_iter=3, scaling=2.0)
    model = inject_lora(
        Sequential(Linear4bit.from_quantized(result.weight)), ["0"], r=8, alpha=16, seed=0
    )
    layer = model.get_submodule("0")
    layer.lora_A.data[...], layer.lora_B.data[...] = result.A, result.B
    x = np.random.default_rng(2).standard_normal((32, 128)).astype(np.float32)
    exact = x @ W.T
    qlora_start = x @ quantize(W).dequantize().T
    assert result.errors[-1] < result.quantization_error
    assert np.linalg.norm(model(x).data - exact) < np.linalg.norm(qlora_start - exact)


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"r": 0}, ValueError, "r"),
        ({"r": 200}, ValueError, "r"),
        ({"r": 2.0}, TypeError, "r"),
        ({"r": 2, "num_iter": 0}, ValueError, "num_iter"),
        ({"r": 2, "scaling": -1.0}, ValueError, "scaling"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, error, word):
    with pytest.raises(error, match=word):
        loftq(weight(), **kwargs)


def test_the_same_steps_as_peft_loftq_init():
    # PEFT's loftq_init hard-codes a CUDA (or XPU) device, so its loop is run here on the CPU
    # with its own parts: bitsandbytes' NF4 (blocks of 64, no double quantization, as its
    # Params4bit) and PEFT's _low_rank_decomposition.
    torch = pytest.importorskip("torch")
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")

    W = weight(seed=3)
    weight_t = torch.from_numpy(W)
    res, errors = weight_t.clone(), []
    for i in range(3):
        packed, state = bnb_functional.quantize_4bit(res, blocksize=64, quant_type="nf4")
        dequantized = bnb_functional.dequantize_4bit(packed, state)
        out = loftq_utils._low_rank_decomposition(weight_t - dequantized, reduced_rank=8)
        L, R = out["L"], out["R"]
        errors.append(
            float(torch.linalg.norm(weight_t - dequantized - L @ R) / torch.linalg.norm(weight_t))
        )
        if i == 0:
            first = dequantized.numpy()
        res = weight_t - L @ R
    ours = loftq(W, r=8, num_iter=3)
    np.testing.assert_array_equal(quantize(W).dequantize(), first)  # the first Q, bit for bit
    np.testing.assert_allclose(ours.errors, errors, rtol=1e-3)
    np.testing.assert_allclose(ours.B @ ours.A, (L @ R).numpy(), rtol=1e-3, atol=1e-4)
