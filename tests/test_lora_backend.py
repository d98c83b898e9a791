"""loralab.lora.backend: the registry through which one implementation serves NumPy and torch models."""

import numpy as np
import pytest

from loralab.lora import Backend, inject_lora, lora_layers, register_backend
from loralab.lora import backend as backend_module
from loralab.lora.backend import NumpyBackend, backend_for
from loralab.nn import MLP


def test_numpy_models_get_the_numpy_backend_and_unknown_models_a_named_error():
    assert isinstance(backend_for(MLP([4, 3], seed=0)), NumpyBackend)
    with pytest.raises(TypeError, match="inject_lora: expected a loralab.nn.Module .* got dict"):
        inject_lora({}, ["0"])
    with pytest.raises(TypeError, match="lora_layers: expected a loralab.nn.Module"):
        lora_layers([1, 2])


def test_register_backend_wants_a_backend():
    with pytest.raises(TypeError, match="register_backend: expected a Backend, got str"):
        register_backend(lambda m: True, "numpy")


def test_a_registered_backend_serves_its_models(monkeypatch):
    monkeypatch.setattr(backend_module, "_BACKENDS", list(backend_module._BACKENDS))

    class Wrapped:  # a model kind loralab does not know: a wrapper around a loralab model
        def __init__(self, inner):
            self.inner = inner

        def named_modules(self):
            return self.inner.named_modules()

    class WrappedBackend(NumpyBackend):
        pass

    backend = WrappedBackend()
    register_backend(lambda m: isinstance(m, Wrapped), backend)
    model = inject_lora(MLP([4, 8, 3], seed=0, dtype=np.float64), ["0"], r=2, seed=0)
    assert backend_for(Wrapped(model)) is backend
    assert [n for n, _ in lora_layers(Wrapped(model))] == ["0"]
    assert isinstance(backend, Backend)
