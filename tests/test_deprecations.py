"""0.1's import paths still work in 0.2, give the same objects as the new paths and say where to go.

Each old path is imported fresh (its cached module and the parent's attribute are removed first),
so the warning is seen even if another test imported it before.
"""

import importlib
import re
import subprocess
import sys
import warnings

import pytest

import loralab
from loralab._deprecated import MOVED_MODULES, MOVED_NAMES

RENAMED_IN_0_2 = {  # commit 451aeac: the file names of loralab.lora say what is inside
    "loralab.lora.adapter": "loralab.lora.peft_format",
    "loralab.lora.adapters": "loralab.lora.named_adapters",
    "loralab.lora.embedding": "loralab.lora.embedding_ops",
    "loralab.lora.layer": "loralab.lora.linear_layer",
    "loralab.lora.layer_mixin": "loralab.lora.linear_shared",
    "loralab.lora.functions": "loralab.lora.engine_functions",
}


# loralab.tensor's Functions as 0.1 named them (7270cc2 added the Fn suffix to every one)
TENSOR_OPS_OF_0_1 = (
    "Add Sub Mul Div Neg Pow MatMul Sum Mean Reshape Transpose GetItem Exp Log Tanh ReLU".split()
)


def forget(monkeypatch, old):
    """Make the next import of `old` a first import (a cached module does not warn again)."""
    monkeypatch.delitem(sys.modules, old, raising=False)
    parent, _, child = old.rpartition(".")
    monkeypatch.delattr(sys.modules[parent], child, raising=False)


def test_every_renamed_module_and_the_changelogs_moves_have_a_shim():
    assert RENAMED_IN_0_2.items() <= MOVED_MODULES.items()
    assert MOVED_MODULES["loralab.lora.functional"] == "loralab.lora.ops"
    assert MOVED_NAMES["loralab.nn"]["LoRALinear"] == "loralab.lora.LoRALinear"
    assert MOVED_NAMES["loralab.functional"]["lora_linear"] == "loralab.lora.lora_linear"
    # commits c52206a, 9a9258e and 7270cc2 (0.1.0 -> 0.2.0): renamed loaders and engine Functions
    assert MOVED_NAMES["loralab.models"]["load_pretrained"] == "loralab.models.load_gpt"
    assert MOVED_NAMES["loralab.demo"]["load_pretrained"] == "loralab.models.digits.load_digits_mlp"
    assert set(MOVED_NAMES["loralab.tensor"]) == set(TENSOR_OPS_OF_0_1)


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_an_old_module_path_is_the_new_module_and_warns_with_its_name(monkeypatch, old, new):
    forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning, match=re.escape(f"use {new}")) as record:
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert all(w.filename == __file__ for w in record)  # the warning points at the caller


def test_import_statements_of_last_terms_notebooks_still_run(monkeypatch):
    for old in ("loralab.lora.layer", "loralab.lora.adapter", "loralab.lora.functional"):
        forget(monkeypatch, old)
    namespace: dict = {}
    with pytest.warns(DeprecationWarning) as record:
        exec(  # noqa: S102 - the statements a student wrote, as written
            "from loralab.lora.layer import LoRALinear\n"
            "import loralab.lora.adapter\n"
            "from loralab.lora.functional import lora_forward\n",
            namespace,
        )
    from loralab.lora import LoRALinear, ops, peft_format

    assert namespace["LoRALinear"] is LoRALinear
    assert namespace["loralab"].lora.adapter is peft_format
    assert namespace["lora_forward"] is ops.lora_forward
    messages = [str(w.message) for w in record]
    assert [m.split(" is deprecated")[0] for m in messages] == [
        "loralab.lora.layer",
        "loralab.lora.adapter",
        "loralab.lora.functional",
    ]


@pytest.mark.parametrize(
    "module, name",
    [(module, name) for module, names in sorted(MOVED_NAMES.items()) for name in sorted(names)],
)
def test_a_moved_name_is_the_new_object_and_warns_with_its_new_path(module, name):
    new = MOVED_NAMES[module][name]
    home, _, attribute = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=re.escape(f"{module}.{name} is deprecated")) as w:
        old_object = getattr(importlib.import_module(module), name)
    assert new in str(w[0].message)
    assert w[0].filename == __file__
    assert old_object is getattr(importlib.import_module(home), attribute)


def test_the_changelogs_examples_as_a_student_writes_them():
    import loralab.functional as F
    import loralab.nn

    with pytest.warns(DeprecationWarning, match=re.escape("use loralab.lora.LoRALinear")):
        assert loralab.nn.LoRALinear is loralab.lora.LoRALinear
    with pytest.warns(DeprecationWarning, match=re.escape("use loralab.lora.lora_linear")):
        assert F.lora_linear is loralab.lora.lora_linear


def test_last_terms_loaders_and_engine_ops_still_run():
    namespace: dict = {}
    with pytest.warns(DeprecationWarning) as record:
        exec(  # noqa: S102 - the statements a student wrote, as written
            "from loralab.models import load_pretrained\n"
            "from loralab.demo import load_pretrained as load_digits\n"
            "from loralab.tensor import Add, Tensor\n"
            "gpt = load_pretrained()\n"
            "mlp, from_checkpoint = load_digits()\n"
            "total = Add.apply(Tensor([1.0, 2.0]), Tensor([3.0, 4.0]))\n",
            namespace,
        )
    assert [str(w.message).split(" is deprecated")[0] for w in record] == [
        "loralab.models.load_pretrained",
        "loralab.demo.load_pretrained",
        "loralab.tensor.Add",
    ]
    from loralab.models import GPT
    from loralab.nn import MLP

    assert isinstance(namespace["gpt"], GPT) and isinstance(namespace["mlp"], MLP)
    assert namespace["from_checkpoint"] is True
    assert namespace["total"].data.tolist() == [4.0, 6.0]


def test_unknown_names_still_fail_as_before():
    with pytest.raises(AttributeError, match="'loralab.nn' has no attribute 'LoRALinearr'"):
        loralab.nn.LoRALinearr  # noqa: B018
    with pytest.raises(AttributeError, match="'loralab.functional' has no attribute 'nope'"):
        loralab.functional.nope  # noqa: B018
    with pytest.raises(AttributeError, match="'loralab.tensor' has no attribute 'AddFnn'"):
        importlib.import_module("loralab.tensor").AddFnn  # noqa: B018
    with pytest.raises(AttributeError, match="'loralab.models' has no attribute 'load_gptt'"):
        importlib.import_module("loralab.models").load_gptt  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("loralab.lora.no_such_module")


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_an_alias_leaves_the_real_module_as_it_was(monkeypatch, old, new):
    forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning):
        importlib.import_module(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the real module is found first
        module = importlib.import_module(new)
    assert (module.__name__, module.__spec__.name) == (new, new)
    assert module.__file__.endswith(".py")


def test_import_loralab_warns_about_nothing_and_imports_no_torch():
    code = "import sys, loralab, loralab.nn, loralab.functional; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], check=True)


def test_the_shims_are_gone_in_0_3():
    major, minor = (int(part) for part in loralab.__version__.split(".")[:2])
    assert (major, minor) < (0, 3) or not (MOVED_MODULES or MOVED_NAMES), (
        "0.3 removes the deprecated paths of 0.1: delete loralab/_deprecated.py and its callers"
    )
