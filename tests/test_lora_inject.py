"""LoRA on whole models: matching rules, freezing, exactness after injection, merge, counting."""

import numpy as np
import pytest

from loralab import functional as F
from loralab.lora import (
    LoraConfig,
    LoRALinear,
    count_parameters,
    inject_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from loralab.lora.inject import match_target
from loralab.nn import MLP, Linear, Module, ReLU, Sequential
from loralab.optim import Adam


class Attention(Module):
    def __init__(self, d, seed):
        super().__init__()
        g = np.random.default_rng(seed)
        self.q = Linear(d, d, rng=g, dtype=np.float64)
        self.k = Linear(d, d, rng=g, dtype=np.float64)
        self.v = Linear(d, d, rng=g, dtype=np.float64)
        self.o = Linear(d, d, rng=g, dtype=np.float64)

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


class Net(Module):
    def __init__(self, d=6, seed=0):
        super().__init__()
        self.layers = Sequential(Attention(d, seed), ReLU(), Attention(d, seed + 1))
        self.head = Linear(d, 3, seed=seed, dtype=np.float64)

    def forward(self, x):
        return self.head(self.layers(x))


def test_matching_rules_follow_peft():
    assert match_target("layers.0.q", ["q"])
    assert match_target("q", ["q"])
    assert not match_target("layers.0.qq", ["q"])
    assert match_target("layers.0.q", ["0.q"])
    assert match_target("layers.2.v", r"layers\.\d\.(q|v)")
    assert not match_target("layers.2.v", r"(q|v)")  # a regex must match the full name


def test_inject_by_suffix_and_by_regex():
    model = inject_lora(Net(), ["q", "v"], r=2, seed=0)
    assert [n for n, _ in lora_layers(model)] == [
        "layers.0.q",
        "layers.0.v",
        "layers.2.q",
        "layers.2.v",
    ]
    model = inject_lora(Net(), r"layers\.2\.(k|o)", r=2, seed=0)
    assert [n for n, _ in lora_layers(model)] == ["layers.2.k", "layers.2.o"]
    model = inject_lora(Net(), "all-linear", r=2, seed=0)
    assert len(lora_layers(model)) == 9


def test_inject_freezes_everything_but_A_and_B_and_output_is_unchanged():
    model = Net()
    x = np.random.default_rng(0).standard_normal((4, 6))
    before = model(x).data.copy()
    inject_lora(model, ["q", "v", "head"], r=2, alpha=8, seed=0)
    np.testing.assert_array_equal(model(x).data, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert count_parameters(model) == (4 * 2 * 12 + 2 * 9, sum(p.size for p in model.parameters()))


def test_nothing_matching_lists_the_linear_modules():
    with pytest.raises(
        ValueError, match=r"matched no module; the Linear modules of this model are \['layers.0.q'"
    ):
        inject_lora(Net(), ["query"])
    with pytest.raises(TypeError, match="target 'layers.1' is a ReLU"):
        inject_lora(Net(), ["layers.1"])
    with pytest.raises(TypeError, match="target_modules must be"):
        inject_lora(Net(), [])
    with pytest.raises(ValueError, match="invalid regular expression"):
        inject_lora(Net(), "(q")


def test_bad_options_leave_the_model_untouched():
    model = MLP([8, 4, 2], seed=0)
    with pytest.raises(ValueError, match=r"r=3 exceeds min\(in_features, out_features\)=2"):
        inject_lora(model, ["0", "2"], r=3)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    inject_lora(model, ["0"], r=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, ["0"], r=2)


def test_merge_unmerge_whole_model_float64():
    model = inject_lora(Net(), ["q", "k", "v", "o"], r=3, alpha=6, seed=1)
    g = np.random.default_rng(2)
    for _, layer in lora_layers(model):
        layer.lora_B.data[:] = g.standard_normal(layer.lora_B.shape)
    weights = {n: p.data.copy() for n, p in model.named_parameters() if "base" in n}
    x = g.standard_normal((5, 6))
    y = model(x).data
    merge_lora(model)
    np.testing.assert_allclose(model(x).data, y, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in weights:
            np.testing.assert_allclose(p.data, weights[n], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="are not merged"):
        unmerge_lora(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(Net())


def test_lora_state_dict_and_training_touches_only_adapters():
    model = inject_lora(MLP([6, 8, 3], seed=0, dtype=np.float64), ["0", "2"], r=2, seed=0)
    assert sorted(lora_state_dict(model)) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, t = np.random.default_rng(1).standard_normal((16, 6)), np.arange(16) % 3
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n])
            assert p.grad is None


def test_injection_is_reproducible_from_a_seed():
    a = inject_lora(MLP([5, 5, 5], seed=0), ["0", "2"], r=2, seed=7)
    b = inject_lora(MLP([5, 5, 5], seed=0), ["0", "2"], r=2, seed=7)
    for (_, la), (_, lb) in zip(lora_layers(a), lora_layers(b), strict=True):
        np.testing.assert_array_equal(la.lora_A.data, lb.lora_A.data)
    assert isinstance(a[0], LoRALinear) and isinstance(a[0].base, Linear)


def test_inject_with_a_lora_config_equals_the_keyword_form():
    config = LoraConfig(
        r=3, lora_alpha=6, lora_dropout=0.1, target_modules=["q", "v"], use_rslora=True
    )
    a = inject_lora(Net(), config, seed=4)
    b = inject_lora(Net(), ["q", "v"], r=3, alpha=6, dropout=0.1, use_rslora=True, seed=4)
    assert [n for n, _ in lora_layers(a)] == [n for n, _ in lora_layers(b)]
    for (_, la), (_, lb) in zip(lora_layers(a), lora_layers(b), strict=True):
        np.testing.assert_array_equal(la.lora_A.data, lb.lora_A.data)
        assert (la.r, la.alpha, la.scaling, la.dropout) == (lb.r, lb.alpha, lb.scaling, lb.dropout)
    with pytest.raises(TypeError, match=r"LoraConfig and the keyword options \['alpha'\]"):
        inject_lora(Net(), config, alpha=5)
    with pytest.raises(ValueError, match="has no target_modules"):
        inject_lora(Net(), LoraConfig(r=2))


def test_a_config_rank_and_alpha_pattern_apply_at_injection_as_in_peft():
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q", "v"],
        rank_pattern={r"layers\.2\.q": 3},
        alpha_pattern={"v": 8},
    )
    layers = dict(lora_layers(inject_lora(Net(), config, seed=0)))
    assert layers["layers.2.q"].r == 3 and layers["layers.0.q"].r == 2
    assert layers["layers.0.v"].alpha == layers["layers.2.v"].alpha == 8
    assert layers["layers.0.q"].alpha == 4
