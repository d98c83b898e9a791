"""Calling a student's function safely and turning what comes back into a friendly verdict.

A check body raises `Failure` with the whole message; `run_check` prints it (or the success
note), returns True/False, and raises ``AssertionError`` with the same text when ``strict=True``.
"""

from __future__ import annotations

import copy
import inspect
import traceback
from collections.abc import Callable, Sequence

import numpy as np

from loralab.exercises._catalogue import EXERCISES
from loralab.exercises._mistakes import Mistake

RTOL = 1e-8
ATOL = 1e-10


class Failure(Exception):
    """A check found something wrong; ``str(failure)`` is the message shown to the student."""

    def __init__(self, message: str, *, raised: BaseException | None = None):
        super().__init__(message)
        self.raised = raised


def describe(**arrays) -> str:
    """One line naming the inputs of a test case, e.g. ``x (2, 4, 7), W0 (5, 7), scaling=1.667``."""
    parts = []
    for name, value in arrays.items():
        if isinstance(value, np.ndarray):
            parts.append(f"{name} {tuple(value.shape)}")
        elif isinstance(value, float):
            parts.append(f"{name}={value:.4g}")
        else:
            parts.append(f"{name}={value!r}")
    return "test case: " + ", ".join(parts)


def positional_names(fn: Callable) -> list[str] | None:
    """Names of the positional parameters of ``fn``, or None when Python cannot tell."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def _where(exc: BaseException) -> str:
    """The last line of the student's own code in the traceback (not numpy internals)."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename
    ]
    frames = [f for f in frames if not f.filename.endswith(("_feedback.py", "_checks.py"))]
    if not frames:
        return ""
    frame = frames[-1]
    line = f": `{frame.line.strip()}`" if frame.line else ""
    return f"\n  It happened in `{frame.name}`, line {frame.lineno}{line}."


def call_student(fn: Callable, name: str, args: Sequence, arg_names: Sequence[str], case: str):
    """Call ``fn(*args)``; an exception or an input changed in place becomes a `Failure`."""
    before = [copy.deepcopy(a) for a in args]
    try:
        out = fn(*args)
    except NotImplementedError as exc:
        raise Failure(
            f"`{name}` is not implemented yet: replace the line `raise NotImplementedError` with "
            "your code, run that cell, then run this check again.",
            raised=exc,
        ) from exc
    except Exception as exc:
        raise Failure(
            f"Your `{name}` raised {type(exc).__name__}: {exc}{_where(exc)}\n  {case}",
            raised=exc,
        ) from exc
    for arg_name, old, new in zip(arg_names, before, args, strict=True):
        if not _same(old, new):
            raise Failure(
                f"Your `{name}` changed its argument `{arg_name}` in place. The caller still needs "
                f"the original `{arg_name}`: compute a new array (e.g. `out = {arg_name} + ...`) "
                f"instead of `{arg_name} += ...` or `{arg_name}[...] = ...`.\n  {case}"
            )
    return out


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def as_array(got, what: str, expected_shape: tuple[int, ...], case: str) -> np.ndarray:
    """Check that ``got`` is array-like with numbers in it; say what it is otherwise."""
    if got is None:
        raise Failure(f"{what} is None: did you forget the `return` statement?\n  {case}")
    if isinstance(got, (tuple, list)) and not expected_shape:
        raise Failure(f"{what} should be a single number, got a {type(got).__name__}.\n  {case}")
    try:
        arr = np.asarray(got)
    except ValueError:
        arr = np.asarray(None)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise Failure(
            f"{what} should be an array of numbers with shape {expected_shape}, "
            f"got {type(got).__name__}.\n  {case}"
        )
    return arr


def close(got: np.ndarray, expected: np.ndarray) -> bool:
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    return got.shape == expected.shape and np.allclose(got, expected, rtol=RTOL, atol=ATOL * scale)


def match_mistake(got: np.ndarray, variants: Sequence[tuple[Mistake, np.ndarray | None]]):
    """The first known mistake whose (computed) wrong answer equals ``got``, or None."""
    for mistake, variant in variants:
        if variant is not None and close(got, np.asarray(variant)):
            return mistake
    return None


def mistake_note(mistake: Mistake) -> str:
    return f"\n  This matches a known mistake: {mistake.title}. {mistake.explain}"


def compare(
    got,
    expected: np.ndarray,
    *,
    what: str,
    case: str,
    variants: Sequence[tuple[Mistake, np.ndarray | None]] = (),
) -> None:
    """Raise a `Failure` naming what differs (shape or values, where, by how much)."""
    problem = difference(got, expected, what=what, variants=variants, case=case)
    if problem:
        raise Failure(f"{problem}\n  {case}")


def difference(
    got,
    expected: np.ndarray,
    *,
    what: str,
    variants: Sequence[tuple[Mistake, np.ndarray | None]] = (),
    case: str = "",
) -> str | None:
    """The message for ``got`` against ``expected`` (None when they agree)."""
    arr = as_array(got, what, expected.shape, case)
    mistake = match_mistake(arr, variants)
    if arr.shape != expected.shape:
        msg = f"wrong output shape: {what} has shape {arr.shape}, expected {expected.shape}."
        if arr.size == expected.size and mistake is None:
            msg += (
                " It has the right number of entries, so the values may be right but arranged "
                "differently: check for a transpose or a reshape."
            )
        return msg + (mistake_note(mistake) if mistake else "")
    if close(arr, expected):
        return None
    if not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        msg = f"{what} contains {arr[bad]} at index {bad} (expected {expected[bad]:.6g})."
    else:
        err = np.abs(arr - expected)
        at = np.unravel_index(int(np.argmax(err)), err.shape)
        idx = tuple(int(i) for i in at)
        msg = (
            f"{what} has the right shape {arr.shape} but wrong values: max abs error "
            f"{err[at]:.3g} at index {idx} (got {arr[at]:.6g}, expected {expected[at]:.6g})."
        )
        if arr.dtype == np.float32 and np.allclose(arr, expected, rtol=1e-4, atol=1e-5):
            msg += " Your result is float32: keep the float64 inputs in float64."
    return msg + (mistake_note(mistake) if mistake else "")


def run_check(key: str, body: Callable[[], str], *, strict: bool) -> bool:
    """Run a check body; print the verdict; return True/False or raise in strict mode.

    ``body`` returns an extra line for the success message or raises `Failure`.
    """
    exercise = EXERCISES[key]
    try:
        detail = body()
    except Exception as exc:
        if isinstance(exc, Failure):
            failure = exc
        else:  # what came back was too odd for the check itself: still a verdict, not a crash
            failure = Failure(
                f"The check could not use what your function returned "
                f"({type(exc).__name__}: {exc}). Compare its return value with the docstring.",
                raised=exc,
            )
        message = f"Not yet: {exercise.title}\n  {failure}"
        print(message)
        if strict:
            raise AssertionError(message) from failure.raised
        return False
    message = f"Correct: {exercise.title}. {exercise.proved}"
    if detail:
        message += f"\n  {detail}"
    message += f"\n  Next: {exercise.next_step()}"
    print(message)
    return True
