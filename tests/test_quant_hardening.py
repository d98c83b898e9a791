"""Quantized bases under misuse: threads, hand-built tensors, merges that fail, LoRA before 4 bits."""

import copy
import pickle
import threading
from dataclasses import replace

import numpy as np
import pytest

from loralab import Tensor
from loralab.lora import inject_lora, lora_layers, merge_lora
from loralab.nn import MLP
from loralab.quant import Linear4bit, QuantizedTensor, loftq, quantize, quantize_model


# ----- threads share one model: each gets its own scratch W0 ---------------------------------------
def test_threads_calling_one_quantized_model_get_the_single_thread_outputs():
    model = quantize_model(MLP([96, 256, 192, 8], seed=0))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((16, 96)).astype(np.float32) for _ in range(4)]
    expected = [model(x).data.copy() for x in xs]
    wrong: list[int] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        start.wait()
        for _ in range(40):
            if not np.array_equal(model(xs[i]).data, expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_a_copied_or_pickled_quantized_model_computes_the_same():
    model = quantize_model(MLP([16, 8, 4], seed=2))
    x = np.ones((2, 16), np.float32)
    y = model(x).data
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_array_equal(twin(x).data, y)


# ----- quantize and QuantizedTensor: checked whole ---------------------------------------------------
def test_quantize_refuses_float64_values_beyond_float32_by_name():
    W = np.ones((4, 8))
    W[1, 2] = 1e39
    with pytest.raises(ValueError, match=r"fit in float32.*\(1, 2\)"):
        quantize(W)


def weight(dtype="nf4", double_quant=True, shape=(8, 24)):
    W = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    return quantize(W, dtype, 64, double_quant)


def bad_fields():
    q = weight()
    plain = weight(double_quant=False)
    q8 = weight("int8", double_quant=False)
    q4 = weight("int4", double_quant=False)
    code255 = q8.codes.copy()
    code255[5] = 255
    nibble15 = q4.codes.copy()
    nibble15[0] = 0xF0 | (nibble15[0] & 0x0F)
    return {
        "codes too short": (
            lambda: replace(q, codes=q.codes[:10]),
            ValueError,
            "codes must have shape",
        ),
        "codes of int8 dtype": (
            lambda: replace(q, codes=q.codes.astype(np.int8)),
            TypeError,
            "codes",
        ),
        "absmax too long": (
            lambda: replace(plain, absmax_stored=np.ones(9, np.float32)),
            ValueError,
            "absmax_stored must have shape",
        ),
        "negative absmax": (
            lambda: replace(plain, absmax_stored=-plain.absmax_stored),
            ValueError,
            "absmax_stored must be finite and >= 0",
        ),
        "nan absmax": (
            lambda: replace(plain, absmax_stored=np.full_like(plain.absmax_stored, np.nan)),
            ValueError,
            "absmax_stored must be finite",
        ),
        "inf scale": (
            lambda: replace(q, absmax_scale=np.full_like(q.absmax_scale, np.inf)),
            ValueError,
            "absmax_scale must be finite",
        ),
        "nan offset": (
            lambda: replace(q, absmax_offset=np.float32("nan")),
            ValueError,
            "absmax_offset",
        ),
        "offset not float32": (lambda: replace(q, absmax_offset=0.5), TypeError, "absmax_offset"),
        "int8 code 255": (
            lambda: replace(q8, codes=code255),
            ValueError,
            "codes must index the 255",
        ),
        "int4 code 15": (
            lambda: replace(q4, codes=nibble15),
            ValueError,
            "codes must index the 15",
        ),
        "unknown dtype": (lambda: replace(q, dtype="nf5"), ValueError, "dtype must be one of"),
        "block size 0": (
            lambda: replace(q, block_size=0),
            ValueError,
            "block_size must be a power",
        ),
        "block size mismatched": (lambda: replace(q, block_size=32), ValueError, "must have shape"),
        "block size a str": (
            lambda: replace(q, block_size="64"),
            TypeError,
            "block_size must be an int",
        ),
        "shape with 0": (lambda: replace(q, shape=(0, 24)), ValueError, "shape must be"),
    }


@pytest.mark.parametrize("case", sorted(bad_fields()))
def test_a_quantized_tensor_with_a_bad_field_is_refused_by_name(case):
    changed, error, message = bad_fields()[case]
    with pytest.raises(error, match=message):
        Linear4bit.from_quantized(changed())


def test_a_good_hand_built_tensor_is_accepted_by_from_quantized():
    q = weight()
    same = QuantizedTensor(
        q.codes.copy(), q.shape, q.dtype, 64, q.absmax_stored, q.absmax_scale, q.absmax_offset
    )
    np.testing.assert_array_equal(
        Linear4bit.from_quantized(same).dequantized_weight(), q.dequantize()
    )


# ----- merge into a 4-bit base: all or nothing ------------------------------------------------------
@pytest.mark.parametrize("quantized", [False, True])
def test_merge_lora_with_a_later_non_finite_update_changes_no_layer(quantized):
    model = MLP([16, 32, 8], seed=4)
    if quantized:
        quantize_model(model)
    inject_lora(model, ["0", "2"], r=2, seed=0)
    (_, first), (_, second) = lora_layers(model)
    first.lora_B.data[...] = 0.1
    second.lora_B.data[...] = np.inf
    xs = [np.ones((3, lay.in_features), np.float32) for lay in (first, second)]
    with np.errstate(all="ignore"):
        before = [lay.base(x).data.copy() for lay, x in zip((first, second), xs, strict=True)]
        with pytest.raises(
            ValueError, match=r"merge_lora: layer '2'.*not finite.*nothing was merged"
        ):
            merge_lora(model)
    assert not first.merged and not second.merged
    for lay, x, b in zip((first, second), xs, before, strict=True):
        np.testing.assert_array_equal(lay.base(x).data, b)


# ----- quantize_model after inject_lora ---------------------------------------------------------------
def test_quantize_model_after_inject_lora_quantizes_the_bases_and_runs():
    model = MLP([64, 32, 8], seed=5)
    inject_lora(model, ["0", "2"], r=4, seed=0)
    rng = np.random.default_rng(6)
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = rng.uniform(-0.1, 0.1, layer.lora_B.shape).astype(np.float32)
    quantize_model(model)
    # the same as quantizing first, then putting the same adapters on
    reference = quantize_model(MLP([64, 32, 8], seed=5))
    inject_lora(reference, ["0", "2"], r=4, seed=0)
    for (_, got), (_, ref) in zip(lora_layers(model), lora_layers(reference), strict=True):
        assert isinstance(got.base, Linear4bit)
        ref.lora_B.data[...] = got.lora_B.data
    x = Tensor(rng.standard_normal((5, 64)).astype(np.float32), requires_grad=True)
    np.testing.assert_array_equal(model(x).data, reference(x).data)
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)


def test_quantize_model_after_inject_lora_selects_a_base_by_its_lora_layers_name():
    model = inject_lora(MLP([16, 8, 4], seed=7), ["0", "2"], r=2, seed=0)
    quantize_model(model, ["0"])
    assert isinstance(model.get_submodule("0.base"), Linear4bit)
    assert not isinstance(model.get_submodule("2.base"), Linear4bit)


def test_quantize_model_refuses_lora_layers_it_cannot_quantize_under_by_name():
    float64 = inject_lora(MLP([16, 8, 4], seed=8, dtype=np.float64), ["0"], r=2, seed=0)
    with pytest.raises(ValueError, match="'0.base' is the base of a LoRA layer.*float64"):
        quantize_model(float64)
    dora = inject_lora(MLP([16, 8, 4], seed=8), ["0"], r=2, seed=0, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        quantize_model(dora)
    merged = merge_lora(inject_lora(MLP([16, 8, 4], seed=8), ["0"], r=2, seed=0))
    with pytest.raises(ValueError, match="merged"):
        quantize_model(merged)
    for model in (float64, dora, merged):
        assert not any(isinstance(m, Linear4bit) for _, m in model.named_modules())


# ----- LoftQ on a zero weight --------------------------------------------------------------------------
def test_loftq_on_an_all_zero_weight_is_a_named_error():
    with pytest.raises(ValueError, match="loftq: W .* is all zeros"):
        loftq(np.zeros((8, 8), np.float32), r=2)


@pytest.mark.torch
def test_the_torch_twin_checks_loaded_buffers_whole():
    torch = pytest.importorskip("torch")
    import loralab.torch as tl

    twin = tl.to_torch(quantize_model(MLP([16, 8, 4], seed=9), dtype="int8", double_quant=False))
    state = twin.state_dict()
    twin.load_state_dict(state)  # its own buffers load
    state["0.codes"] = state["0.codes"].clone()
    state["0.codes"][0] = 255
    before = twin.get_submodule("0").codes.clone()
    with pytest.raises(ValueError, match=r"under '0\.'.*codes must index the 255 levels"):
        twin.load_state_dict(state)
    assert torch.equal(twin.get_submodule("0").codes, before)
