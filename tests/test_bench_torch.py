"""Tests for the PyTorch side of the benchmarked model (loralab.bench.mlp): needs torch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loralab.bench.mlp import HandStep, MLPArrays, torch_model, torch_step  # noqa: E402
from loralab.torch import LoRALinear  # noqa: E402


def test_the_torch_side_takes_the_hand_written_step():
    rng = np.random.default_rng(0)
    arrays = MLPArrays.random(8, rng, r=2)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    t = rng.standard_normal((5, 8)).astype(np.float32)
    hand = HandStep(arrays, x, t)
    hand()
    twin = torch_model(arrays, lora=True)
    torch_step(twin, x, t)()
    for i, name in enumerate(["0", "2", "4", "6"]):
        layer = twin.get_submodule(name)
        assert isinstance(layer, LoRALinear) and not layer.use_custom_backward  # plain autograd
        np.testing.assert_allclose(
            layer.lora_A.detach().numpy(), hand.params[i].data, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            layer.lora_B.detach().numpy(), hand.params[4 + i].data, rtol=1e-5, atol=1e-6
        )
        assert not layer.base.weight.requires_grad


def test_the_merged_torch_model_computes_the_unmerged_one():
    rng = np.random.default_rng(1)
    arrays = MLPArrays.random(8, rng, r=2)
    x = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
    with torch.no_grad():
        merged = torch_model(arrays, lora=True, merged=True)(x)
        unmerged = torch_model(arrays, lora=True)(x)
        base = torch_model(arrays, lora=False)(x)
    np.testing.assert_allclose(merged.numpy(), unmerged.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(merged.numpy(), base.numpy())  # B != 0: the adapter matters
