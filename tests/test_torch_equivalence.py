"""Tests for loralab.torch.equivalence: the NumPy reference and its torch twin train identically."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from builders import every_layer_model  # noqa: E402

from loralab import lora, nn  # noqa: E402
from loralab.lora import inject_lora  # noqa: E402
from loralab.torch import (  # noqa: E402
    EquivalenceReport,
    check_equivalence,
    relative_difference,
    shared_dropout_masks,
    to_torch,
)

pytestmark = pytest.mark.torch

RTOL = {np.float64: 1e-10, np.float32: 1e-5}


def _nonzero_B(model, rng):
    """Give every B values, so that A gets a gradient from the first step."""
    for _, layer in model.named_modules():
        if isinstance(layer, lora.LoRALinear):
            layer.lora_B.data = (0.1 * rng.normal(size=layer.lora_B.shape)).astype(
                layer.lora_B.dtype
            )


def every_layer(dtype, seed=0):
    model, rng = every_layer_model(dtype, seed=seed, targets=("2", "5", "7"), b_scale=0.1)
    batches = [(rng.integers(0, 11, (4, 6)), rng.integers(0, 5, (4, 6))) for _ in range(3)]
    return model, batches


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_layer_type_with_lora_and_dropout_50_adam_steps(dtype):
    model, batches = every_layer(dtype)
    report = check_equivalence(model, to_torch(model), batches, steps=50, lr=1e-2)
    assert report.steps == 50 and report.input_grad == []  # integer inputs
    assert report.dtype == np.dtype(dtype).name
    report.assert_close(RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    ("sizes", "activation", "targets"),
    [
        ([5, 3], "relu", None),
        ([6, 16, 4], "gelu", ["0", "2"]),
        ([10, 24, 24, 8, 3], "relu", r"[24]"),
        ([4, 32, 32, 4], "gelu", None),
    ],
)
def test_mlps_with_and_without_lora(dtype, sizes, activation, targets):
    rng = np.random.default_rng(len(sizes))
    model = nn.MLP(sizes, activation=activation, rng=rng, dtype=dtype)
    if targets is not None:
        inject_lora(model, targets, r=2, alpha=4, seed=1)
        _nonzero_B(model, rng)
    batches = [
        (rng.normal(size=(8, sizes[0])).astype(dtype), rng.integers(0, sizes[-1], 8))
        for _ in range(4)
    ]
    twin = to_torch(model)
    report = check_equivalence(model, twin, batches, steps=50, lr=5e-3)
    assert len(report.input_grad) == 50
    report.assert_close(RTOL[dtype])
    if targets is not None:  # only the adapters moved, in both
        assert all(p.grad is None for n, p in twin.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize(
    ("optimizer", "options"), [("adamw", {"weight_decay": 0.1}), ("sgd", {"momentum": 0.9})]
)
def test_other_optimizers_and_mse(optimizer, options):
    rng = np.random.default_rng(3)
    model = inject_lora(nn.MLP([5, 9, 3], rng=rng, dtype=np.float64), ["0", "2"], r=2, seed=0)
    batches = [(rng.normal(size=(6, 5)), rng.normal(size=(6, 3))) for _ in range(2)]
    report = check_equivalence(
        model,
        to_torch(model),
        batches,
        steps=10,
        lr=0.05,
        optimizer=optimizer,
        loss="mse",
        optimizer_options=options,
    )
    report.assert_close(1e-10)


def test_dropout_needs_the_shared_masks():
    """Without shared masks the twins drift apart: the harness's agreement is not trivial."""
    model, batches = every_layer(np.float64)
    twin = to_torch(model)
    x = batches[0][0]
    with shared_dropout_masks(model, twin):
        np.testing.assert_allclose(
            twin(torch.tensor(x)).detach().numpy(), model(x).data, rtol=1e-12
        )
    assert twin[4]._forward_hooks == {} and twin[2].mask_rng is None  # restored on exit
    diff = relative_difference(model(x).data, twin(torch.tensor(x)))
    assert diff > 1e-3


def test_shared_masks_keep_a_generator_shared():
    model, _ = every_layer(np.float64)
    assert model[2].rng is model[5].rng  # inject_lora gives all adapters one generator
    twin = to_torch(model)
    with shared_dropout_masks(model, twin):
        assert twin[2].mask_rng is twin[5].mask_rng and twin[2].mask_rng is not model[2].rng


def test_report_is_readable_and_catches_a_difference():
    model, batches = every_layer(np.float64)
    twin = to_torch(model)
    with torch.no_grad():
        twin[7].lora_B.add_(1e-6)
    report = check_equivalence(model, twin, batches, steps=3, lr=1e-2)
    text = str(report)
    assert "3 steps (float64)" in text and "max" in text and "7.lora_B" in text
    assert report.max_param > 1e-8 and report.worst_param == "7.lora_B"
    with pytest.raises(AssertionError, match="max_param"):
        report.assert_close(1e-10)


def test_relative_difference():
    assert relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_difference([1.0, 2.0], [1.0, 2.5]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_difference(np.zeros(2), np.zeros(3))
    assert EquivalenceReport("float64").max_difference == 0.0


def test_refuses_mismatched_models_and_options():
    rng = np.random.default_rng(0)
    model = nn.MLP([3, 2], seed=0, dtype=np.float64)
    batches = [(rng.normal(size=(2, 3)), np.array([0, 1]))]
    with pytest.raises(ValueError, match="parameters differ"):
        check_equivalence(model, to_torch(nn.MLP([3, 4, 2], seed=0)), batches, steps=1, lr=0.1)
    twin = to_torch(model)
    twin[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad differs for \['0.bias'\]"):
        check_equivalence(model, twin, batches, steps=1, lr=0.1)
    for kwargs, error, match in [
        ({"optimizer": "lion"}, ValueError, "optimizer must be one of .*got optimizer='lion'"),
        ({"optimizer": None}, TypeError, "optimizer must be one of .*got optimizer=None"),
        ({"loss": "hinge"}, ValueError, "loss must be one of .*got loss='hinge'"),
        ({"loss": 2}, TypeError, "loss must be one of .*got loss=2"),
        ({"steps": 0}, ValueError, "steps must be a positive integer, got 0"),
        ({"steps": 1.0}, TypeError, "steps must be a positive integer, got 1.0"),
        ({"lr": 0.0}, ValueError, "lr must be a positive number, got lr=0.0"),
        ({"lr": "0.1"}, TypeError, "lr must be a positive number, got lr='0.1'"),
        ({"training": "yes"}, TypeError, "training must be True or False, got 'yes'"),
    ]:
        with pytest.raises(error, match="^check_equivalence: " + match):
            check_equivalence(model, to_torch(model), batches, **{"steps": 1, "lr": 0.1, **kwargs})


def test_zero_grad_parameters_are_checked_to_be_zero_and_left_out():
    """``zero_grad`` names parameters whose exact gradient is zero (such as attention's key bias):
    the report measures how far from zero their gradients are; a real gradient is caught."""
    rng = np.random.default_rng(0)
    model = nn.MLP([3, 4, 2], seed=0, dtype=np.float64)
    batches = [(rng.normal(size=(5, 3)), rng.integers(0, 2, 5))]
    report = check_equivalence(model, to_torch(model), batches, steps=2, lr=0.1)
    assert report.zero_grad == [] and report.max_zero_grad == 0.0
    # 0.bias has a real gradient: named as zero-gradient, it is reported far from zero.
    report = check_equivalence(
        model, to_torch(model), batches, steps=2, lr=0.1, zero_grad={"0.bias"}
    )
    assert len(report.zero_grad) == 2 and report.max_zero_grad > 1e-3
    with pytest.raises(AssertionError, match="max_zero_grad"):
        report.assert_close(1e-10)
    assert "zero-gradient parameters" in str(report)
    for zero_grad, error, match in [
        (["nope"], ValueError, r"zero_grad names \['nope'\]"),
        ("0.bias", TypeError, "collection of names"),
        (["0.weight", "0.bias", "2.weight", "2.bias"], ValueError, "every trainable parameter"),
    ]:
        with pytest.raises(error, match=match):
            check_equivalence(model, to_torch(model), batches, steps=1, lr=0.1, zero_grad=zero_grad)
