"""The check of the twin exercise (tutorial 7): the LoRA layer as a ``torch.autograd.Function``.

The student writes::

    class LoRAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, W0, A, B, scaling): ...  # y = x W0^T + scaling * (x A^T) B^T
        @staticmethod
        def backward(ctx, dy): ...  # (dx, None, dA, dB, None)

with x (..., in), W0 (out, in) frozen, A (r, in), B (out, r) and scaling = alpha / r a Python
number. ``forward`` keeps what ``backward`` needs with ``ctx.save_for_backward``; ``backward``
returns one value per input of ``forward``, in order: dx (..., in), None for the frozen W0,
dA (r, in), dB (out, r) summed over every leading dimension, and None for the number scaling.
The check compares both with loralab's own `loralab.lora.ops.lora_forward` / ``lora_backward``
in float64. torch is imported when the check runs, never when loralab is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from loralab.exercises import _wrong_answers as mis
from loralab.exercises._feedback import (
    Failure,
    call_student,
    describe,
    difference,
    mistake_note,
    run_check,
)
from loralab.exercises._hints import BATCH_HINT, SHAPE_HINT
from loralab.exercises._mistakes import Mistake
from loralab.exercises._reference import lora_inputs
from loralab.lora import ops

__all__ = ["check_lora_function"]

NOT_A_FUNCTION = Mistake(
    "fn_not_autograd_function",
    "autograd.Function",
    "LoRAFunction is not a subclass of torch.autograd.Function",
    "Write `class LoRAFunction(torch.autograd.Function):` with two static methods, "
    "`forward(ctx, x, W0, A, B, scaling)` and `backward(ctx, dy)`, and call it as "
    "`LoRAFunction.apply(x, W0, A, B, scaling)`.",
)
NOT_A_TENSOR = Mistake(
    "fn_not_a_tensor",
    "autograd.Function",
    "a value that is not a torch tensor",
    "Autograd works on torch tensors: compute with torch operations (`@`, `.T`, `.reshape`) on "
    "the tensors you are given; a NumPy array (`.numpy()`) leaves autograd's graph.",
)
TOO_FEW = Mistake(
    "fn_too_few_gradients",
    "autograd.Function",
    "backward returned (dx, dA, dB) only",
    "backward returns one value per input of forward, in the same order: "
    "(dx, dW0, dA, dB, dscaling), with None where no gradient is needed: "
    "`return dx, None, dA, dB, None`.",
)
GRAD_FOR_W0 = Mistake(
    "fn_grad_for_W0",
    "frozen weights",
    "backward returned a gradient for the frozen W0",
    "W0 does not require a gradient (`ctx.needs_input_grad[1]` is False), so return None in its "
    "place: computing dW0 = dy^T x costs an (out, in) matrix and N * out * in multiply-adds, "
    "exactly what LoRA saves, and autograd throws it away.",
)
GRAD_FOR_SCALING = Mistake(
    "fn_grad_for_scaling",
    "autograd.Function",
    "backward returned a gradient for scaling, a Python number",
    "scaling is a float, not a tensor, so it has no gradient: return None in its place "
    "(PyTorch refuses anything else there).",
)
NOT_SAVED = Mistake(
    "fn_no_save_for_backward",
    "autograd.Function",
    "forward kept its tensors as attributes of ctx instead of ctx.save_for_backward",
    "Save the tensors backward needs with `ctx.save_for_backward(x, W0, A, B)` and read them back "
    "with `x, W0, A, B = ctx.saved_tensors` (a number such as scaling may be an attribute: "
    "`ctx.scaling = scaling`). save_for_backward lets autograd refuse a backward whose saved "
    "tensors were changed in place since the forward, and frees them when the backward is done; "
    "`ctx.x = x` does neither.",
)
CHANGED_INPUT = Mistake(
    "fn_changed_input",
    "autograd.Function",
    "an input tensor was changed in place",
    "forward and backward must not modify their inputs (`x += ...`, `A.mul_(...)`): compute new "
    "tensors instead. Inside forward autograd is switched off, so nothing stops such an edit.",
)

# scaling = alpha / r with alpha = 16, r = 3: alpha, alpha // r, r / alpha and 1 all differ.
_ALPHA, _R = 16, 3
# (batch, in, out, seed): a square layer first, where W0 and W0^T both run and the wrong one is
# named by its values; then a non-square one and a batched x.
_CASES = (((4,), 6, 6, 13), ((3,), 7, 5, 11), ((2, 4), 7, 5, 12))


def check_lora_function(
    student_cls: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``LoRAFunction``, a ``torch.autograd.Function`` computing a LoRA layer.

    ``LoRAFunction.apply(x, W0, A, B, scaling)`` must return y = x W0^T + scaling * (x A^T) B^T,
    shape (..., out), and its backward (dx, None, dA, dB, None) with dx = dy W0 + scaling (dy B) A,
    dA = scaling (dy B)^T x and dB = scaling dy^T (x A^T), summed over the batch. Run in float64
    on a square layer (in = out = 6), a non-square one (in = 7, out = 5) and a batched x (2, 4, 7),
    r = 3, scaling = 16 / 3, W0 not requiring a gradient; compared with `loralab.lora.ops`.

    Recognised mistakes: not a torch.autograd.Function; a NumPy array instead of a tensor; the
    forward's mistakes (scaling, transposes, ...); backward returning only (dx, dA, dB), a
    gradient for the frozen W0 or for scaling; the backward's mistakes on dx, dA and dB (scaling
    missing, W0^T, transposes, batch mean, ...); tensors kept as ``ctx`` attributes instead of
    ``ctx.save_for_backward``; an input changed in place.
    """
    return run_check(
        "lora_function",
        lambda: _check(student_cls, getattr(student_cls, "__name__", "LoRAFunction")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _check(cls, name: str) -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - the exercise notebook imports torch first
        raise Failure(
            'This exercise needs PyTorch: run `pip install -e ".[torch]"` in your clone of the '
            "loralab repository (or install its wheel with `[torch]`), then restart the kernel."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise Failure(f"You passed {type(cls).__name__} {cls!r}." + mistake_note(NOT_A_FUNCTION))
    passed = 0
    not_saved = False
    for batch, d_in, d_out, seed in _CASES:
        inp = lora_inputs(batch, d_in, d_out, _R, seed)
        scaling = _ALPHA / _R
        arrays = {k: inp[k] for k in ("x", "W0", "A", "B")}
        case = describe(**arrays, scaling=scaling)
        hint = f"\n  {BATCH_HINT}" if passed and len(batch) > 1 else f"\n  {SHAPE_HINT}"
        x, W0, A, B = (torch.tensor(inp[k], requires_grad=k != "W0") for k in arrays)
        dy = torch.tensor(inp["dy"])

        y = _run(partial(cls.apply, x, W0, A, B, scaling), f"{name}.forward", case, hint)
        _changed((x, W0, A, B), arrays, "forward", case)
        args = (inp["x"], inp["W0"], inp["A"], inp["B"])
        expected = ops.lora_forward(*args[:2], None, *args[2:], scaling)[0]
        _compare(y, expected, "y", mis.forward(*args, scaling, _ALPHA, _R), case)
        if y.grad_fn is None:
            raise Failure(
                f"y has no grad_fn: autograd did not record {name}. Call it as "
                f"`{name}.apply(x, W0, A, B, scaling)` and return a tensor computed from its inputs."
                f"\n  {case}"
            )
        not_saved = not_saved or len(y.grad_fn.saved_tensors) == 0

        grads = _run(partial(y.grad_fn.apply, dy), f"{name}.backward", case, hint)
        _changed((x, W0, A, B), arrays, "backward", case)
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        if len(grads) == 3:
            raise Failure(f"backward returned 3 values.{mistake_note(TOO_FEW)}\n  {case}")
        if len(grads) != 5:
            raise Failure(
                f"backward returned {len(grads)} value(s); expected 5, one per input of forward: "
                f"(dx, None, dA, dB, None).\n  {case}"
            )
        if grads[1] is not None:
            raise Failure(f"backward's second value is not None.{mistake_note(GRAD_FOR_W0)}")
        if grads[4] is not None:
            raise Failure(f"backward's last value is not None.{mistake_note(GRAD_FOR_SCALING)}")
        dy_np = inp["dy"]
        _, cache = ops.lora_forward(*args[:2], None, *args[2:], scaling)
        dx, dA, dB, _ = ops.lora_backward(dy_np, cache)
        variants = mis.backward(dy_np, *args, scaling)
        problems = [
            _difference(got, exp, what, var)
            for got, exp, what, var in zip(
                (grads[0], grads[2], grads[3]), (dx, dA, dB), ("dx", "dA", "dB"), variants
            )
        ]
        problems = [p for p in problems if p]
        if problems:
            raise Failure("\n  ".join(problems) + f"\n  {case}" + (hint if passed else ""))
        try:  # the same backward, run by autograd itself
            torch.autograd.grad(y, (x, A, B), dy)
        except Exception as exc:
            raise Failure(
                f"Your values are right, but autograd refused them: {type(exc).__name__}: {exc}"
                f"\n  {case}"
            ) from exc
        passed += 1
    if not_saved:
        raise Failure(
            "forward and backward compute the right values, but forward saved no tensors."
            + mistake_note(NOT_SAVED)
        )
    return (
        "autograd now calls your backward: the same gradients as loralab's hand-derived "
        "lora_backward, and none for the frozen W0."
    )


def _run(call: Callable, name: str, case: str, hint: str):
    """Call ``call()`` through `call_student`; add the shape hint to an exception it raises."""
    try:
        return call_student(call, name, (), (), case)
    except Failure as failure:
        if failure.raised is None or isinstance(failure.raised, NotImplementedError):
            raise
        raise Failure(f"{failure}{hint}", raised=failure.raised) from None


def _changed(tensors, arrays: dict, where: str, case: str) -> None:
    """A `Failure` when ``where`` (forward or backward) changed one of the input tensors."""
    for (arg, original), tensor in zip(arrays.items(), tensors, strict=True):
        if not np.array_equal(tensor.detach().numpy(), original):
            raise Failure(
                f"After {where}, `{arg}` is not what it was.{mistake_note(CHANGED_INPUT)}\n  {case}"
            )


def _as_numpy(value, what: str) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise Failure(f"{what} is of type {type(value).__name__}.{mistake_note(NOT_A_TENSOR)}")
    return value.detach().cpu().numpy()


def _difference(got, expected, what: str, variants) -> str | None:
    if got is None:
        return f"{what} is None, but {what[1:]} needs a gradient."
    return difference(_as_numpy(got, what), expected, what=what, variants=variants)


def _compare(got, expected, what: str, variants, case: str) -> None:
    problem = difference(_as_numpy(got, what), expected, what=what, variants=variants)
    if problem:
        raise Failure(f"{problem}\n  {case}")
