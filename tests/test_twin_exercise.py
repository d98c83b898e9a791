"""The twin exercise (tutorial 7): check_lora_function passes the reference class and names the
usual mistakes of a hand-written torch.autograd.Function."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.exercises import EXERCISES, MISTAKES, check_lora_function
from loralab.exercises import twin_checks as T

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def _solutions():
    spec = importlib.util.spec_from_file_location(
        "loralab_solutions_twin", ROOT / "instructor" / "solutions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Right = _solutions().LoRAFunction


def _grads(ctx, dy, s=None):
    """The right (dx, dA, dB) from what the reference forward saved."""
    x, W0, A, B = ctx.saved_tensors
    s = ctx.scaling if s is None else s
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ W0 + s * ((dy @ B) @ A), s * (dy2 @ B).T @ x2, s * dy2.T @ (x2 @ A.T)


class NoScalingInBackward(Right):
    @staticmethod
    def backward(ctx, dy):
        dx, dA, dB = _grads(ctx, dy, s=1.0)
        return dx, None, dA, dB, None


class GradForW0(Right):
    @staticmethod
    def backward(ctx, dy):
        x, *_ = ctx.saved_tensors
        dx, dA, dB = _grads(ctx, dy)
        dW0 = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return dx, dW0, dA, dB, None


class GradForScaling(Right):
    @staticmethod
    def backward(ctx, dy):
        return *_grads(ctx, dy)[:1], None, *_grads(ctx, dy)[1:], torch.tensor(0.0)


class OnlyThree(Right):
    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy)


class TransposedDA(Right):
    @staticmethod
    def backward(ctx, dy):
        dx, dA, dB = _grads(ctx, dy)
        return dx, None, dA.T, dB, None


class W0TransposedInDx(Right):
    @staticmethod
    def backward(ctx, dy):
        x, W0, A, B = ctx.saved_tensors
        dx, dA, dB = _grads(ctx, dy)
        return dy @ W0.T + ctx.scaling * ((dy @ B) @ A), None, dA, dB, None


class BatchMean(Right):
    @staticmethod
    def backward(ctx, dy):
        dx, dA, dB = _grads(ctx, dy)
        n = dy.reshape(-1, dy.shape[-1]).shape[0]
        return dx, None, dA / n, dB / n, None


class AttributesNotSaved(Right):
    @staticmethod
    def forward(ctx, x, W0, A, B, scaling):
        ctx.x, ctx.W0, ctx.A, ctx.B, ctx.scaling = x, W0, A, B, scaling
        return x @ W0.T + scaling * ((x @ A.T) @ B.T)

    @staticmethod
    def backward(ctx, dy):
        x, W0, A, B, s = ctx.x, ctx.W0, ctx.A, ctx.B, ctx.scaling
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = dy @ W0 + s * ((dy @ B) @ A)
        return dx, None, s * (dy2 @ B).T @ x2, s * dy2.T @ (x2 @ A.T), None


class NoScalingInForward(Right):
    @staticmethod
    def forward(ctx, x, W0, A, B, scaling):
        ctx.save_for_backward(x, W0, A, B)
        ctx.scaling = scaling
        return x @ W0.T + (x @ A.T) @ B.T


class NumpyForward(Right):
    @staticmethod
    def forward(ctx, x, W0, A, B, scaling):
        ctx.save_for_backward(x, W0, A, B)
        ctx.scaling = scaling
        x, W0, A, B = (t.detach().numpy() for t in (x, W0, A, B))
        return x @ W0.T + scaling * ((x @ A.T) @ B.T)


class ChangesW0(Right):
    @staticmethod
    def forward(ctx, x, W0, A, B, scaling):
        W0.mul_(1.5)
        ctx.save_for_backward(x, W0, A, B)
        ctx.scaling = scaling
        return x @ W0.T + scaling * ((x @ A.T) @ B.T)


class Stub(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W0, A, B, scaling):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, dy):
        raise NotImplementedError


def test_reference_class_passes(capsys):
    assert check_lora_function(Right, strict=True) is True
    out = capsys.readouterr().out
    assert out.startswith(f"Correct: {EXERCISES['lora_function'].title}")
    assert "autograd now calls your backward" in out


@pytest.mark.parametrize(
    ("cls", "named"),
    [
        (NoScalingInBackward, MISTAKES["dA_missing_scaling"].title),
        (NoScalingInBackward, MISTAKES["dx_missing_scaling"].title),
        (GradForW0, T.GRAD_FOR_W0.title),
        (GradForScaling, T.GRAD_FOR_SCALING.title),
        (OnlyThree, T.TOO_FEW.title),
        (TransposedDA, MISTAKES["dA_transposed"].title),
        (W0TransposedInDx, MISTAKES["dx_W0_not_transposed"].title),
        (BatchMean, MISTAKES["batch_mean"].title),
        (AttributesNotSaved, T.NOT_SAVED.title),
        (NoScalingInForward, MISTAKES["forgot_scaling"].title),
        (NumpyForward, T.NOT_A_TENSOR.title),
        (ChangesW0, T.CHANGED_INPUT.title),
        (lambda x, W0, A, B, scaling: x, T.NOT_A_FUNCTION.title),
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v)[:30],
)
def test_a_wrong_function_gets_its_named_message(cls, named, capsys):
    assert check_lora_function(cls) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet")
    assert named in out
    with pytest.raises(AssertionError, match="Not yet"):
        check_lora_function(cls, strict=True)


def test_the_stub_is_reported_as_not_implemented(capsys):
    assert check_lora_function(Stub) is False
    assert "is not implemented yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="not implemented yet") as info:
        check_lora_function(Stub, strict=True)
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_right_values_from_attributes_fail_only_on_save_for_backward(capsys):
    check_lora_function(AttributesNotSaved)
    out = capsys.readouterr().out
    assert "forward and backward compute the right values" in out
    assert "max abs error" not in out


def test_importing_the_exercises_does_not_import_torch():
    code = "import sys, loralab.exercises; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
