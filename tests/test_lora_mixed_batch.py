"""Mixed batches on NumPy models: row i through adapter_names[i], by the grouped op."""

import numpy as np
import pytest
from builders import nonzero_B

from loralab import gradcheck, nn
from loralab.lora import (
    disable_adapters,
    inject_lora,
    lora_layers,
    merge_lora,
    mixed_batch,
    set_adapter,
    unmerge_lora,
)
from loralab.lora.engine_functions import GroupedLoRAFn, GroupedLoRALinearFn
from loralab.tensor import Tensor


def model_with_adapters():
    """An MLP with "default" (r=2) on 0, 2, "task" (r=3) on 0, 4, "other" (r=1) on 2; B nonzero."""
    model = nn.MLP([6, 10, 8, 5], seed=0, dtype=np.float64)
    inject_lora(model, ["0", "2"], r=2, alpha=4, seed=1)
    inject_lora(model, ["0", "4"], r=3, alpha=3, seed=2, adapter_name="task")
    inject_lora(model, ["2"], r=1, alpha=2, seed=3, adapter_name="other")
    return nonzero_B(model, seed=4).eval()


ROWS = ["task", "__base__", "default", "other", "task", "default", "__base__", "other"]


def test_each_row_equals_the_row_alone_with_its_adapter():
    model = model_with_adapters()
    x = np.random.default_rng(5).normal(size=(len(ROWS), 3, 6))  # (batch, tokens, in)
    with mixed_batch(model, ROWS):
        y = model(x).data
    for i, name in enumerate(ROWS):
        if name == "__base__":
            with disable_adapters(model):
                alone = model(x[i : i + 1]).data
        else:
            set_adapter(model, name)
            alone = model(x[i : i + 1]).data
        np.testing.assert_allclose(y[i : i + 1], alone, rtol=1e-12, atol=1e-14)
    assert all(layer.mixed_rows is None for _, layer in lora_layers(model))


def test_the_grouped_function_passes_gradcheck():
    rng = np.random.default_rng(6)
    ranks, d_in, d_out = [2, 3, 1], 5, 4
    x = Tensor(rng.normal(size=(6, 2, d_in)), requires_grad=True)
    As = [Tensor(rng.normal(size=(r, d_in)), requires_grad=True) for r in ranks]
    Bs = [Tensor(rng.normal(size=(d_out, r)), requires_grad=True) for r in ranks]
    index = rng.integers(-1, 3, size=(6, 2))
    scalings = [0.5, 2.0, 1.5]

    def fn(x, *AB):
        return GroupedLoRAFn.apply(x, *AB, index=index, scalings=scalings)

    assert gradcheck(fn, x, *As, *Bs)


def test_bad_requests_are_named_and_leave_no_routing_behind():
    model = model_with_adapters()
    x = np.zeros((3, 6))
    with pytest.raises(
        ValueError, match=r"unknown adapters \['nope'\].*\['default', 'task', 'other'\]"
    ):
        with mixed_batch(model, ["task", "nope", "__base__"]):
            pass
    with pytest.raises(ValueError, match="got 2 adapter names but x has shape"):
        with mixed_batch(model, ["task", "default"]):
            model(x)
    with pytest.raises(TypeError, match="list of str"):
        with mixed_batch(model, "task"):
            pass
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        with mixed_batch(model, ["task", "default", "task"]):
            pass
    unmerge_lora(model)
    assert all(layer.mixed_rows is None for _, layer in lora_layers(model))


def test_dora_adapters_are_refused_as_peft_does():
    model = inject_lora(nn.MLP([4, 6, 3], seed=0), ["0"], r=2, use_dora=True, seed=0)
    with pytest.raises(ValueError, match="DoRA"):
        with mixed_batch(model, ["default", "__base__"]):
            pass


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_fused_grouped_linear_function_passes_gradcheck(with_bias):
    rng = np.random.default_rng(7)
    ranks, d_in, d_out = [2, 1], 4, 3
    x = Tensor(rng.normal(size=(5, 2, d_in)), requires_grad=True)
    W0 = Tensor(rng.normal(size=(d_out, d_in)), requires_grad=True)  # dW0 too, as full fine-tuning
    b = Tensor(rng.normal(size=(d_out,)), requires_grad=True) if with_bias else None
    As = [Tensor(rng.normal(size=(r, d_in)), requires_grad=True) for r in ranks]
    Bs = [Tensor(rng.normal(size=(d_out, r)), requires_grad=True) for r in ranks]
    index = rng.integers(-1, 2, size=(5, 2))

    def fn(x, W0, *rest):
        bias, AB = (rest[0], rest[1:]) if with_bias else (None, rest)
        return GroupedLoRALinearFn.apply(x, W0, bias, *AB, index=index, scalings=[0.5, 3.0])

    inputs = [x, W0, *([b] if with_bias else []), *As, *Bs]
    assert gradcheck(fn, *inputs)
