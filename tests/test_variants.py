"""The LoRA variants: rsLoRA, DoRA, PiSSA, OLoRA, LoRA+ (NumPy; torch in test_torch_variants.py,
PEFT cross-checks in test_peft_variants.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loralab import Tensor, gradcheck, numerical_grad, optim
from loralab.lora import (
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from loralab.lora.engine_functions import DoRALinearFn
from loralab.lora.ops import dora_forward, row_norms
from loralab.lora.variants import loraplus_param_groups, olora_init, pissa_init
from loralab.nn import MLP, Linear


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def dora_model(seed=0, **kw):
    model = inject_lora(
        MLP([8, 16, 4], seed=seed, dtype=np.float64),
        ["0", "2"],
        r=2,
        alpha=4,
        use_dora=True,
        seed=seed,
        **kw,
    )
    rng = np.random.default_rng(seed + 1)
    for _, layer in lora_layers(model):
        layer.lora_B.data[:] = rng.normal(size=layer.lora_B.shape)
        layer.lora_magnitude_vector.data *= rng.uniform(0.5, 1.5, layer.out_features)
    return model


# ----- rsLoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 4, 16])
def test_rslora_scaling(r):
    base = Linear(32, 32, seed=0)
    assert LoRALinear(base, r=r, alpha=8, use_rslora=True).scaling == pytest.approx(8 / np.sqrt(r))
    assert LoRALinear(Linear(32, 32, seed=0), r=r, alpha=8).scaling == pytest.approx(8 / r)


# ----- DoRA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_dora_op_gradcheck(with_mask):
    x = Tensor(rand(2, 3, 5), requires_grad=True)
    W0 = Tensor(rand(4, 5, seed=1))
    b = Tensor(rand(4, seed=2), requires_grad=True)
    A = Tensor(rand(2, 5, seed=3), requires_grad=True)
    B = Tensor(rand(4, 2, seed=4), requires_grad=True)
    m = Tensor(rand(4, seed=5) ** 2 + 0.5, requires_grad=True)
    mask = (np.random.default_rng(6).random((2, 3, 5)) > 0.3) / 0.7 if with_mask else None

    def f(x, b, A, B, m):
        # the norm is detached: compare with differences that also hold it fixed
        return DoRALinearFn.apply(x, W0, b, A, B, m, scaling=0.7, mask=mask)

    norm = row_norms(W0.data, A.data, B.data, 0.7)
    y = f(x, b, A, B, m)
    expected = (m.data / norm) * (
        (x.data if mask is None else x.data * mask) @ (W0.data + 0.7 * B.data @ A.data).T
    )
    if mask is not None:
        expected += (x.data - x.data * mask) @ W0.data.T
    np.testing.assert_allclose(y.data, expected + b.data, atol=1e-12)
    # x, b and m do not enter the norm, so plain central differences check them exactly
    assert gradcheck(lambda x, b, m: f(x, b, A, B, m), x, b, m)


def test_dora_gradients_of_A_and_B_hold_the_norm_fixed():
    x, W0, A, B = rand(3, 5), rand(4, 5, seed=1), rand(2, 5, seed=3), rand(4, 2, seed=4)
    m = rand(4, seed=5) ** 2 + 0.5
    At, Bt = Tensor(A, requires_grad=True), Tensor(B, requires_grad=True)
    c = rand(3, 4, seed=9)
    (DoRALinearFn.apply(x, W0, None, At, Bt, m, scaling=0.7, mask=None) * c).sum().backward()
    norm = row_norms(W0, A, B, 0.7)  # a constant, as DoRA prescribes

    def loss():  # reads A and B, which numerical_grad perturbs in place
        return float(((m / norm) * (x @ (W0 + 0.7 * B @ A).T) * c).sum())

    np.testing.assert_allclose(At.grad, numerical_grad(loss, A), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(Bt.grad, numerical_grad(loss, B), rtol=1e-6, atol=1e-8)


def test_dora_starts_as_the_base_and_merges():
    base = MLP([8, 16, 4], seed=0, dtype=np.float64)
    x = rand(5, 8)
    before = base(x).data.copy()
    model = inject_lora(base, ["0", "2"], r=2, alpha=4, use_dora=True, seed=0)
    np.testing.assert_allclose(model(x).data, before, atol=1e-12)
    layer = model.get_submodule("0")
    np.testing.assert_allclose(
        layer.lora_magnitude_vector.data, np.linalg.norm(layer.base.weight.data, axis=1)
    )
    assert layer.lora_magnitude_vector.requires_grad
    model = dora_model()
    W_before = [layer.base.weight.data.copy() for _, layer in lora_layers(model)]
    y = model(x).data.copy()
    merge_lora(model)
    np.testing.assert_allclose(model(x).data, y, atol=1e-12)
    for _, layer in lora_layers(model):
        layer.unmerge()
    for (_, layer), W in zip(lora_layers(model), W_before):
        np.testing.assert_allclose(layer.base.weight.data, W, atol=1e-12)
    np.testing.assert_allclose(model(x).data, y, atol=1e-12)


def test_dora_adapter_roundtrip(tmp_path):
    model = dora_model()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.0.lora_magnitude_vector"].shape == (16,)
    fresh = load_adapter(MLP([8, 16, 4], seed=0, dtype=np.float64), tmp_path)
    x = rand(3, 8)
    np.testing.assert_allclose(fresh(x).data, model(x).data, atol=1e-12)
    plain = inject_lora(MLP([8, 16, 4], seed=0, dtype=np.float64), ["0", "2"], r=2, alpha=4, seed=0)
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(plain, tmp_path)


# ----- PiSSA and OLoRA ---------------------------------------------------------------------------------
def test_pissa_puts_the_top_singular_part_into_the_adapter():
    W0 = rand(12, 9)
    A, B, W_res = pissa_init(W0, 3, 2.0)
    U, S, Vh = np.linalg.svd(W0)
    np.testing.assert_allclose(2.0 * B @ A, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-12)
    np.testing.assert_allclose(W_res + 2.0 * B @ A, W0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(W_res, compute_uv=False)[:6], S[3:], atol=1e-12)


def test_olora_puts_orthonormal_columns_into_B():
    W0 = rand(12, 9)
    A, B, W_res = olora_init(W0, 4, 0.5)
    np.testing.assert_allclose(B.T @ B, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(np.tril(A, -1), 0, atol=1e-12)
    np.testing.assert_allclose(W_res + 0.5 * B @ A, W0, atol=1e-12)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_leave_the_output_unchanged_and_are_recorded(init, tmp_path):
    model = MLP([8, 16, 4], seed=0, dtype=np.float64)
    x = rand(5, 8)
    before = model(x).data.copy()
    inject_lora(model, ["0", "2"], r=3, alpha=6, init=init, seed=0)
    np.testing.assert_allclose(model(x).data, before, atol=1e-12)
    assert np.abs(model.get_submodule("0").lora_B.data).max() > 0
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init


# ----- LoRA+ ------------------------------------------------------------------------------------------
def test_loraplus_groups_give_B_a_larger_learning_rate():
    model = dora_model()
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=8)
    assert [g["lr"] for g in groups] == [1e-3, 8e-3]
    layers = [layer for _, layer in lora_layers(model)]
    assert {id(p) for p in groups[0]["params"]} == {id(layer.lora_A) for layer in layers}
    # as PEFT: every 1-D trainable parameter (DoRA's magnitudes here) goes with B
    fast = {id(p) for layer in layers for p in (layer.lora_B, layer.lora_magnitude_vector)}
    assert {id(p) for p in groups[1]["params"]} == fast
    opt = optim.SGD(groups, lr=1e-3)
    for p in model.parameters():
        p.grad = np.ones_like(p.data) if p.requires_grad else None
    B0 = model.get_submodule("0").lora_B.data.copy()
    A0 = model.get_submodule("0").lora_A.data.copy()
    opt.step()
    np.testing.assert_allclose(B0 - model.get_submodule("0").lora_B.data, 8e-3)
    np.testing.assert_allclose(A0 - model.get_submodule("0").lora_A.data, 1e-3)
    with pytest.raises(ValueError, match="no trainable lora_B or lora_embedding_"):
        loraplus_param_groups(MLP([2, 2]), lr=1e-3)


def embedding_model(seed=0):
    from loralab.nn import Embedding, Sequential

    model = Sequential(Embedding(11, 8, seed=seed), Linear(8, 4, seed=seed))
    return inject_lora(model, ["0", "1"], r=2, alpha=4, seed=seed)


def test_loraplus_gives_embedding_adapters_their_own_learning_rate_as_peft():
    model = embedding_model()
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=2e-4)
    emb, fc = model.get_submodule("0"), model.get_submodule("1")
    assert [([id(p) for p in g["params"]], g["lr"]) for g in groups] == [
        ([id(fc.lora_A)], 1e-3),
        ([id(emb.lora_embedding_A), id(emb.lora_embedding_B)], 2e-4),
        ([id(fc.lora_B)], 8e-3),
    ]
    assert loraplus_param_groups(model, lr=1e-3)[1]["lr"] == 1e-6  # PEFT's default
    from loralab.nn import Embedding, Sequential

    only_embedding = inject_lora(Sequential(Embedding(11, 8, seed=0)), ["0"], r=2, seed=0)
    (group,) = loraplus_param_groups(only_embedding, lr=1e-3)
    assert len(group["params"]) == 2 and group["lr"] == 1e-6
    with pytest.raises(ValueError, match="loraplus_lr_embedding must be positive"):
        loraplus_param_groups(model, lr=1e-3, loraplus_lr_embedding=0.0)


def test_bad_init_names_the_options():
    with pytest.raises(ValueError, match="pissa"):
        LoRALinear(Linear(4, 4), r=2, init="svd")


# ----- the torch twin of the variants --------------------------------------------------------------------
def test_dora_forward_without_bias_and_mask_is_c_times_lora():
    x, W0, A, B, m = (
        rand(3, 5),
        rand(4, 5, seed=1),
        rand(2, 5, seed=3),
        rand(4, 2, seed=4),
        rand(4, seed=5),
    )
    y, _ = dora_forward(x, W0, None, A, B, m, 0.5)
    W = W0 + 0.5 * B @ A
    np.testing.assert_allclose(
        y, x @ (m[:, None] * W / np.linalg.norm(W, axis=1, keepdims=True)).T, atol=1e-12
    )
