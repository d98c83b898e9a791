"""Old import paths of loralab 0.1 that still work in 0.2, with a `DeprecationWarning`; removed in 0.3.

Two tables, written once here so that the renamed modules stay clean:

- `MOVED_MODULES`: an old module name -> the module that replaced it. A finder at the end of
  `sys.meta_path` answers ``import loralab.lora.adapter`` (whose file no longer exists) with the
  new module itself, so both names give the same object.
- `MOVED_NAMES`: an attribute that left its module -> its new home. The old module's
  ``__getattr__`` calls `moved_attribute`, which imports the new home by name at first use: the
  old module does not import it at load time (the layering stays as it is, see
  ``tests/test_import_graph.py``, which lists these edges).

Every old path warns once per use and names the new path, so last term's notebooks still run and
say what to change.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import FrameType, ModuleType
from typing import Any

MOVED_MODULES = {
    "loralab.lora.adapter": "loralab.lora.peft_format",
    "loralab.lora.adapters": "loralab.lora.named_adapters",
    "loralab.lora.embedding": "loralab.lora.embedding_ops",
    "loralab.lora.layer": "loralab.lora.linear_layer",
    "loralab.lora.layer_mixin": "loralab.lora.linear_shared",
    "loralab.lora.functions": "loralab.lora.engine_functions",
    "loralab.lora.functional": "loralab.lora.ops",
    "loralab.nn.lora": "loralab.lora.linear_layer",
}

MOVED_NAMES = {
    "loralab.nn": {"LoRALinear": "loralab.lora.LoRALinear"},
    "loralab.functional": {
        "lora_linear": "loralab.lora.lora_linear",
        "LoRALinear": "loralab.lora.engine_functions.LoRALinearFn",
        "lora_forward": "loralab.lora.ops.lora_forward",
        "lora_backward": "loralab.lora.ops.lora_backward",
        "lora_backward_dW0": "loralab.lora.ops.lora_backward_dW0",
        # Engine Functions are named apart from modules since 0.2 (F.Linear is not nn.Linear).
        **{
            old: f"loralab.functional.{old}Fn"
            for old in (
                "Linear",
                "GELU",
                "Softmax",
                "LogSoftmax",
                "CrossEntropy",
                "MSELoss",
                "LayerNorm",
                "Embedding",
            )
        },
    },
    "loralab.tensor": {
        old: f"loralab.tensor.{old}Fn"
        for old in (
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Neg",
            "Pow",
            "MatMul",
            "Sum",
            "Mean",
            "Reshape",
            "Transpose",
            "GetItem",
            "Exp",
            "Log",
            "Tanh",
            "ReLU",
        )
    },
    "loralab.models": {"load_pretrained": "loralab.models.load_gpt"},
    "loralab.demo": {  # the digits checkpoint moved to loralab.models.digits
        "load_pretrained": "loralab.models.digits.load_digits_mlp",
        "pretrain": "loralab.models.digits.pretrain_digits_mlp",
        "CHECKPOINT": "loralab.models.digits.DIGITS_CHECKPOINT",
        "SIZES": "loralab.models.digits.DIGITS_SIZES",
    },
}

_IMPORTLIB = "<frozen importlib._bootstrap"  # `warnings` steps over these frames itself


def _warn(old: str, new: str) -> None:
    # Point the warning at the caller's line (a script or notebook cell shows it only then): past
    # this module, importlib.import_module and the old module's __getattr__, not counting the
    # import machinery's frozen frames (which `warnings` skips itself).
    frame: FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None:
        code = frame.f_code
        if code.co_filename in (__file__, importlib.__file__) or code.co_name == "__getattr__":
            level += 1
        elif not code.co_filename.startswith(_IMPORTLIB):
            break
        elif code.co_name == "_handle_fromlist":
            # `from package import old` first probes the name with hasattr, then fetches it:
            # the fetch warns, the probe would say it twice.
            return
        frame = frame.f_back
    warnings.warn(
        f"{old} is deprecated since loralab 0.2 and will be removed in 0.3: use {new}",
        DeprecationWarning,
        stacklevel=level,
    )


def moved_attribute(module: str, name: str) -> Any:
    """The object `module`.`name` moved to, with a warning; AttributeError if it never existed.

    Called by the ``__getattr__`` of a module that lost public names (``loralab.nn``,
    ``loralab.functional``, ``loralab.tensor``, ``loralab.models``, ``loralab.demo``).
    """
    target = MOVED_NAMES.get(module, {}).get(name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home, _, attribute = target.rpartition(".")
    _warn(f"{module}.{name}", target)
    return getattr(importlib.import_module(home), attribute)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name of `MOVED_MODULES` and loads it as the new module itself."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        _warn(spec.name, new)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # importlib overwrites it with the alias's spec
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the new module is loaded); give it back its own spec."""
        assert module.__spec__ is not None  # create_module stored the module's own spec there
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the alias finder last on `sys.meta_path` (once): real modules always win."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
