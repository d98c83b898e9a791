"""loralab: learn LoRA (Low-Rank Adaptation) by building it.

The NumPy reference: a reverse-mode autograd engine (`Tensor`), layers (`loralab.nn`),
the fused LoRA op with a hand-derived backward (`loralab.lora.ops`), optimizers
(`loralab.optim`) and LoRA on whole models (`loralab.lora`). The PyTorch twin lives in
`loralab.torch` (the only module that imports torch).
"""

from loralab import _deprecated, functional, lora, nn, optim
from loralab._gradcheck import GradcheckError, gradcheck, numerical_grad
from loralab.tensor import Context, Function, Tensor, is_grad_enabled, no_grad

__version__ = "0.2.0"

_deprecated.install()  # 0.1's module paths (loralab.lora.adapter, ...) still import; removed in 0.3

__all__ = [
    "Tensor",
    "Function",
    "Context",
    "no_grad",
    "is_grad_enabled",
    "gradcheck",
    "numerical_grad",
    "GradcheckError",
    "functional",
    "lora",
    "nn",
    "optim",
    "__version__",
]
