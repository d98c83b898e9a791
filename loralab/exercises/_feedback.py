"""Calling a student's function safely and turning what comes back into a friendly verdict.

A check body raises `Failure` with the whole message; `run_check` prints it (or the success
note), returns True/False, and raises ``AssertionError`` with the same text when ``strict=True``.

Every call of a student's function goes through `call_student`, which gives it at most
``time_limit`` seconds (an endless loop becomes a verdict, not a hung notebook) and turns an
exception, a call of ``sys.exit()`` or an input changed in place into a message. The student's
function gets read-only copies of the check's arrays, so an in-place edit fails at the very line
that makes it, in whichever of the student's functions it is.
"""

from __future__ import annotations

import copy
import inspect
import re
import signal
import sysconfig
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from loralab._validate import positive_number
from loralab.exercises._catalogue import EXERCISES
from loralab.exercises._mistakes import Mistake

RTOL = 1e-8
ATOL = 1e-10

#: Default seconds one call of a student's function may run before the check stops it.
TIME_LIMIT = 5.0
# The limit of the check now running (set by `run_check`, read by `call_student`).
_time_limit: ContextVar[float] = ContextVar("loralab_exercise_time_limit", default=TIME_LIMIT)


class Failure(Exception):
    """A check found something wrong; ``str(failure)`` is the message shown to the student."""

    def __init__(self, message: str, *, raised: BaseException | None = None):
        super().__init__(message)
        self.raised = raised


def number(value, digits: int = 6) -> str:
    """``value`` (a Python or NumPy number) as plain text: ``0.0863``, never ``np.float64(0.0863)``."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    return str(value)


def plain_repr(value, limit: int = 80) -> str:
    """``repr(value)`` with NumPy scalars as Python numbers (``3``, not ``np.int64(3)``), in
    tuples, lists and dicts too; cut to ``limit`` characters."""

    def plain(v):
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, (tuple, list)):
            return type(v)(plain(x) for x in v)
        if isinstance(v, dict):
            return {plain(k): plain(x) for k, x in v.items()}
        return v

    try:
        text = repr(plain(value))
    except Exception:  # an odd object of the student's: its own repr
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def got_and_expected(got, expected) -> tuple[str, str]:
    """Both numbers with as few significant digits (6 to 17) as show that they differ."""
    for digits in (6, 9, 12, 17):
        a, b = number(got, digits), number(expected, digits)
        if a != b:
            break
    return a, b


def low_precision_note(arr: np.ndarray, what: str) -> str:
    """A sentence naming a float32 (or float16) result: the checks compare in float64."""
    if arr.dtype.kind != "f" or arr.dtype.itemsize >= 8:
        return ""
    return (
        f" {what} is {arr.dtype} (about {np.finfo(arr.dtype).precision} significant digits), while "
        "the check expects float64: keep the float64 inputs in float64 (look for an `astype`, a "
        "float32 constant or array in the computation)."
    )


def describe(**arrays) -> str:
    """One line naming the inputs of a test case, e.g. ``x (2, 4, 7), W0 (5, 7), scaling=1.667``."""
    parts = []
    for name, value in arrays.items():
        if isinstance(value, np.ndarray):
            parts.append(f"{name} {tuple(value.shape)}")
        elif isinstance(value, (float, np.floating)):
            parts.append(f"{name}={float(value):.4g}")
        elif isinstance(value, np.integer):
            parts.append(f"{name}={int(value)}")
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


def function_name(fn: Callable, default: str) -> str:
    """The name the student gave ``fn`` (``default`` for a lambda-less callable without one)."""
    return getattr(fn, "__name__", default)


_STDLIB = sysconfig.get_paths()["stdlib"]


def _student_frame(exc: BaseException):
    """The last frame of the student's own code in the traceback (not numpy internals), or None."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "site-packages" not in f.filename and not f.filename.startswith((_STDLIB, "<frozen"))
    ]
    # Every module that calls a student's function is named *_checks.py (or is this one).
    frames = [f for f in frames if not f.filename.endswith(("_feedback.py", "_checks.py"))]
    return frames[-1] if frames else None


def _where(exc: BaseException) -> str:
    """Where in the student's own code ``exc`` was raised, as a sentence ("" when unknown)."""
    frame = _student_frame(exc)
    if frame is None:
        return ""
    line = f": `{frame.line.strip()}`" if frame.line else ""
    return f"\n  It happened in `{frame.name}`, line {frame.lineno}{line}."


def check_time_limit(time_limit: object, where: str) -> float:
    """``time_limit`` as seconds (None means `TIME_LIMIT`); a positive finite number, else an error
    that starts with ``where`` (the check's name)."""
    if time_limit is None:
        return TIME_LIMIT
    return float(positive_number("time_limit", time_limit, where))


class _TimeUp(BaseException):
    """Raised inside a student's function when its time is up.

    A BaseException, so that an ``except Exception`` in the student's code does not swallow it.
    """


def _on_alarm(_signum, _frame):
    raise _TimeUp


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise `_TimeUp` in the body after ``seconds`` (SIGALRM; the main thread on POSIX only).

    Elsewhere (another thread, Windows) there is no way to stop a Python function from outside
    short of a process, so the body runs without a limit. An alarm already set by the caller
    (pytest-timeout, say) is put back afterwards with its remaining time, as is its handler.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            if outer > 0:
                left = outer - (time.monotonic() - start)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))


def call_student(fn: Callable, name: str, args: Sequence, arg_names: Sequence[str], case: str):
    """Call ``fn(*args)`` for at most the check's time limit.

    An exception, a call of ``sys.exit()``, running out of time or an input changed in place
    becomes a `Failure` whose message says which.
    """
    return call_student_traced(fn, name, args, arg_names, case, trace_memory=False)[0]


def call_student_traced(
    fn: Callable,
    name: str,
    args: Sequence,
    arg_names: Sequence[str],
    case: str,
    *,
    trace_memory: bool = True,
) -> tuple[object, int | None]:
    """`call_student`, and the peak bytes the call allocated (NumPy arrays included).

    The peak is None when it cannot be measured (``tracemalloc`` already runs, say, in the
    student's own code) or was not asked for.
    """
    before = [copy.deepcopy(a) for a in args]
    given = [_read_only_copy(a) for a in args]
    seconds = _time_limit.get()
    trace = trace_memory and not tracemalloc.is_tracing()
    peak = None
    try:
        with _alarm(seconds):
            if trace:
                tracemalloc.start()
            try:
                out = fn(*given)
                if trace:
                    peak = tracemalloc.get_traced_memory()[1]
            finally:
                if trace:
                    tracemalloc.stop()
    except _TimeUp as exc:
        raise Failure(
            f"`{name}` did not return within {seconds:g} s, so the check stopped it.{_where(exc)}\n"
            "  Look for a loop that never ends (a `while` whose condition stays true). If it is "
            "only slow, give it more time: call the check with `time_limit=60` (seconds), or "
            "`loralab grade --time-limit 60`."
            f"\n  {case}"
        ) from None
    except SystemExit as exc:
        raise Failure(
            f"Your `{name}` called exit (`sys.exit()`, `exit()` or `quit()`).{_where(exc)}\n"
            "  That would stop the whole program (in a notebook: the kernel). A function hands "
            "back its result with `return`; to report a problem, `raise` an exception."
            f"\n  {case}"
        ) from None
    except NotImplementedError as exc:
        raise Failure(
            f"`{name}` is not implemented yet: replace the line `raise NotImplementedError` with "
            "your code, run that cell, then run this check again.",
            raised=exc,
        ) from exc
    except Exception as exc:
        if isinstance(exc, ValueError) and "read-only" in str(exc):
            # not `raised`: the checks add hints on shapes to raised errors, and this is none
            raise Failure(_in_place_message(exc, name, arg_names, case)) from exc
        hint = exception_hint(exc)
        raise Failure(
            f"Your `{name}` raised {type(exc).__name__}: {exc}{_where(exc)}\n  {case}"
            + (f"\n  {hint}" if hint else ""),
            raised=exc,
        ) from exc
    for arg_name, old, new in zip(arg_names, before, given, strict=True):
        if not _same(old, new):
            raise Failure(
                f"Your `{name}` changed its argument `{arg_name}` in place. The caller still needs "
                f"the original `{arg_name}`: compute a new array (e.g. `out = {arg_name} + ...`) "
                f"instead of `{arg_name} += ...` or `{arg_name}[...] = ...`.\n  {case}"
            )
    return out, peak


def _read_only_copy(value):
    """``value`` with every array in it (also inside dicts, lists, tuples) a read-only copy."""
    if isinstance(value, np.ndarray):
        out = value.copy()
        out.flags.writeable = False
        return out
    if isinstance(value, dict):
        return {k: _read_only_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_read_only_copy(v) for v in value)
    return value


def _in_place_message(exc: BaseException, name: str, arg_names: Sequence[str], case: str) -> str:
    """The message for a write into one of the (read-only) input arrays."""
    frame = _student_frame(exc)
    culprit = frame.name if frame is not None else name
    called = f" (called by your `{name}`)" if culprit != name else ""
    line = frame.line.strip() if frame is not None and frame.line else ""
    arg = next(
        (a for a in arg_names if re.match(rf"\s*{re.escape(a)}\b\s*(\[|[-+*/@%]|//|\*\*|=)", line)),
        None,
    )
    what = f"its argument `{arg}`" if arg else "one of its input arrays"
    arg = arg or (arg_names[0] if arg_names else "x")
    return (
        f"Your `{culprit}`{called} changed {what} in place.{_where(exc)}\n"
        f"  The caller still needs the original: compute a new array (e.g. `out = {arg} + ...`) "
        f"instead of `{arg} += ...` or `{arg}[...] = ...`.\n  {case}"
    )


def exception_hint(exc: BaseException) -> str | None:
    """A sentence on what an exception of this kind usually means (None: no general advice).

    Shape errors (ValueError, IndexError) get their hint from the check, which knows the shapes.
    """
    hints = {
        NameError: "A NameError means a name that does not exist when the function runs: a typo, "
        "a variable defined only in another function or in a cell not run yet, or a missing "
        "import (`import numpy as np`).",
        AttributeError: "An AttributeError means an attribute or method that the object does not "
        "have: check the spelling, and what type the value really is (print `type(...)`).",
        ZeroDivisionError: "A division by zero: check what the denominator is for these inputs.",
    }
    for kind, hint in hints.items():
        if isinstance(exc, kind):
            return hint
    return None


def _same(a, b) -> bool:
    if isinstance(a, np.random.Generator):  # drawing from the rng it was given is its job
        return True
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


# How every known-mistake note starts (`_layer_checks` looks for it to drop a repeated note).
MISTAKE_NOTE = "\n  This matches a known mistake"


def mistake_note(mistake: Mistake) -> str:
    """The line added to a message when the student's answer is ``mistake``'s wrong answer."""
    return f"{MISTAKE_NOTE} ({mistake.kind}): {mistake.title}. {mistake.explain}"


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


_NAN_HINT = (
    "NaN (not a number) comes from 0/0, inf - inf, the square root or log of a negative "
    "number, or an array made with np.empty and never filled."
)
_INF_HINT = (
    "inf (an overflow or a division by zero) comes from dividing by a number that is zero, or "
    "from values that grow without bound, e.g. a power or exp of a large number."
)


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
        msg = f"{what} contains {arr[bad]} at index {bad} (expected {number(expected[bad])}). "
        msg += _NAN_HINT if np.isnan(arr[bad]) else _INF_HINT
    else:
        err = np.abs(arr - expected)
        at = np.unravel_index(int(np.argmax(err)), err.shape)
        idx = tuple(int(i) for i in at)
        got_text, expected_text = got_and_expected(arr[at], expected[at])
        msg = (
            f"{what} has the right shape {arr.shape} but wrong values: max abs error "
            f"{number(err[at], 3)} at index {idx} (got {got_text}, expected {expected_text})."
        )
        msg += low_precision_note(arr, f"Your {what}")
    return msg + (mistake_note(mistake) if mistake else "")


def check_where(where: object, check: str) -> str | None:
    """``where`` (the calling notebook's file name) as given, or a TypeError naming the check."""
    if where is not None and not isinstance(where, str):
        raise TypeError(
            f"{check}: where must be a notebook's file name (str) or None, got where={where!r}"
        )
    return where


def run_check(
    key: str,
    body: Callable[[], str],
    *,
    strict: bool,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Run a check body; print the verdict; return True/False or raise in strict mode.

    ``body`` returns an extra line for the success message or raises `Failure`. Each call of
    the student's function in it may take ``time_limit`` seconds (None: `TIME_LIMIT`).
    ``where`` names the notebook the check is called from, for the "Next:" line
    (`Exercise.next_step`).
    """
    exercise = EXERCISES[key]
    check_where(where, f"check_{key}")
    token = _time_limit.set(check_time_limit(time_limit, f"check_{key}"))
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
    finally:
        _time_limit.reset(token)
    message = f"Correct: {exercise.title}. {exercise.proved}"
    if detail:
        message += f"\n  {detail}"
    message += f"\n  Next: {exercise.next_step(where)}"
    print(message)
    return True
