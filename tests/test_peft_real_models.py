"""PEFT adapters on real checkpoint families (GPT-2, LLaMA): same logits, same training, folders.

LLaMA's adapters both ways are in test_models_llama.py; here LLaMA gets the SGD trajectory,
from_pretrained of a saved folder with greedy generation, and save_pretrained, each against
transformers in float64 (with that module's `float64_hf`, which runs HF's float32 steps in
float64)."""

import copy

import numpy as np
import pytest
from test_models_llama import IDS as LLAMA_IDS
from test_models_llama import SIZES as LLAMA_SIZES
from test_models_llama import float64_hf  # noqa: F401  (a fixture, used by name below)
from test_models_llama import hf_model as hf_llama
from test_models_llama import load as load_llama

from loralab.lora import LoraConfig, inject_lora, load_adapter, lora_state_dict, save_adapter
from loralab.models.gpt2 import from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=61, n_positions=16)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # training must be deterministic


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**CONFIG, **NO_DROPOUT, attn_implementation="eager")
    )
    return model.double().eval()


def _ours(hf):
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    return from_hf(hf.config.to_dict(), state, dtype=np.float64)


def _peft_model(hf, targets, **kw):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw
    )
    return peft.get_peft_model(copy.deepcopy(hf), config).eval()


IDS = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 12))


def _logits(model):
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_an_adapter_peft_saved_for_gpt2_runs_here_with_peft_logits(hf_gpt2, tmp_path, targets):
    in_peft = _peft_model(hf_gpt2, targets)
    in_peft.save_pretrained(tmp_path / "peft")
    ours = _ours(hf_gpt2)
    load_adapter(ours, tmp_path / "peft")
    assert np.abs(ours(IDS).data - _logits(in_peft)).max() < 1e-9


def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(hf_gpt2, tmp_path):
    ours = _ours(hf_gpt2)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), seed=0)
    rng = np.random.default_rng(1)
    for name, p in ours.named_parameters():
        if name.endswith("lora_B"):
            p.data = rng.standard_normal(p.data.shape) * 0.1  # B != 0: the update shows
    save_adapter(ours, tmp_path / "ours")
    import json

    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True  # GPT-2's Conv1D, as PEFT writes it
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_gpt2), tmp_path / "ours").eval()
    assert np.abs(_logits(back) - ours(IDS).data).max() < 1e-9


def test_fan_in_fan_out_is_refused_on_a_layer_that_is_not_stored_transposed():
    from loralab.nn import MLP

    with pytest.raises(ValueError, match="fan_in_fan_out=True is for layers whose checkpoint"):
        inject_lora(MLP([4, 8, 2], seed=0), LoraConfig(target_modules=["0"], fan_in_fan_out=True))


def _peft_key(name):
    return name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")


def _train_both(in_peft, ours, vocab_size):
    """Start ours from PEFT's (nonzero) A and B, take 5 SGD steps in each on the same batches.

    Returns (start, ours, theirs): the adapters before, and after in loralab and in PEFT.
    """
    from loralab import functional as F
    from loralab.optim import SGD

    mine = dict(ours.named_parameters())
    for name, p in in_peft.named_parameters():
        if "lora_" in name:
            mine[_peft_key(name)].data = p.detach().numpy().copy()
    start = {k: v.data.copy() for k, v in mine.items() if "lora_" in k}
    in_peft.train()
    torch_opt = torch.optim.SGD([p for p in in_peft.parameters() if p.requires_grad], lr=0.5)
    opt = SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    rng = np.random.default_rng(2)
    for _ in range(5):
        x = rng.integers(0, vocab_size, (3, 10))
        y = rng.integers(0, vocab_size, (3, 10))
        torch_opt.zero_grad()
        logits = in_peft(torch.as_tensor(x)).logits
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.as_tensor(y).reshape(-1)
        ).backward()
        torch_opt.step()
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
    theirs = {
        _peft_key(n): p.detach().numpy() for n, p in in_peft.named_parameters() if "lora_" in n
    }
    return start, lora_state_dict(ours), theirs


def _assert_same_training(start, state, theirs):
    assert set(state) == set(theirs) == set(start)
    moved = max(np.abs(state[k] - start[k]).max() for k in state)
    assert moved > 1e-3  # it trained: the agreement below is not two untouched copies
    diff = max(np.abs(state[k] - theirs[k]).max() for k in state)
    assert diff < 1e-8


def test_the_same_sgd_training_gives_the_same_adapter_as_peft(hf_gpt2):
    """Same init, same batches, plain SGD, float64: the adapters agree after several steps."""
    in_peft = _peft_model(hf_gpt2, ["c_attn"])
    ours = _ours(hf_gpt2)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]), seed=0)
    _assert_same_training(*_train_both(in_peft, ours, CONFIG["vocab_size"]))


# ----- LLaMA ------------------------------------------------------------------------------------
LLAMA_TARGETS = ["q_proj", "v_proj"]


@pytest.mark.usefixtures("float64_hf")
def test_the_same_sgd_training_of_a_llama_adapter_as_peft():
    hf = hf_llama(rope_theta=500.0)
    in_peft = _peft_model(hf, LLAMA_TARGETS).double()
    ours = load_llama(hf)
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), seed=0)
    _assert_same_training(*_train_both(in_peft, ours, LLAMA_SIZES["vocab_size"]))


@pytest.mark.usefixtures("float64_hf")
def test_a_saved_llama_folder_loads_and_generates_greedily_as_transformers(tmp_path):
    from loralab.models import from_pretrained, generate

    hf = hf_llama(rope_theta=500.0)
    hf.save_pretrained(tmp_path / "llama", safe_serialization=True)
    ours = from_pretrained(tmp_path / "llama", dtype=np.float64)
    prompt = np.random.default_rng(3).integers(0, LLAMA_SIZES["vocab_size"], (2, 5))
    got = generate(ours, prompt, 12)
    with torch.no_grad():
        want = hf.generate(
            torch.as_tensor(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    assert got.shape == (2, 17)
    np.testing.assert_array_equal(got, want)


@pytest.mark.usefixtures("float64_hf")
def test_a_merged_llama_saved_here_opens_in_transformers_with_the_same_logits(tmp_path):
    from loralab.lora import lora_layers, merge_lora
    from loralab.models import save_pretrained

    ours = load_llama(hf_llama(rope_theta=500.0))
    inject_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), seed=0)
    rng = np.random.default_rng(4)
    for _, layer in lora_layers(ours):
        layer.lora_B.data = 0.1 * rng.standard_normal(layer.lora_B.shape)
    want = ours(LLAMA_IDS).data
    merge_lora(ours)
    save_pretrained(ours, tmp_path / "merged")
    back = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "merged", torch_dtype=torch.float64, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        got = back(torch.as_tensor(LLAMA_IDS)).logits.numpy()
    assert np.abs(got - want).max() < 1e-9
