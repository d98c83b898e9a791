"""What the checks share: the hints they add to a failure and the note of a square-layer probe.

Every check has the form ``check_x(student_fn, *, strict=False, time_limit=None, where=None) -> bool``.
It prints a verdict and returns True or False; with ``strict=True`` a wrong answer raises
``AssertionError`` carrying the same message. Each call of the student's function may run
``time_limit`` seconds (None: the default `TIME_LIMIT`, 5 s) before the check stops it and says so.
``where`` is the file name of the notebook the check is called from; a passing check's "Next:" line
uses it (`Exercise.next_step`).
"""

from __future__ import annotations

from loralab.exercises._mistakes import Mistake

SHAPE_HINT = (
    "Shapes: x is (..., in), W0 is (out, in), A is (r, in), B is (out, r). A shape error "
    "usually means a product in the wrong order or a missing transpose."
)
BATCH_HINT = (
    "It worked for 2-D x but not for the batched x. Write it with `@` acting on the last axis "
    "(x @ A.T), which works for any leading dimensions; for gradients, reshape to (-1, features) "
    "and sum over all rows."
)


def is_shape_error(exc: BaseException | None) -> bool:
    """True for the errors a wrong shape raises (a matmul or broadcast mismatch, a bad index):
    only those get `SHAPE_HINT`, not a NameError or a TypeError."""
    return isinstance(exc, (ValueError, IndexError))


def probe_note(mistake: Mistake, size: int, what: str) -> str:
    """The note added when a function that failed on a non-square layer runs on a square one
    (in = out = ``size``) and its ``what`` there matches ``mistake``."""
    return (
        f"On a square layer (in = out = {size}) your function does run, and its {what} there "
        f"shows a known mistake ({mistake.kind}): {mistake.title}. {mistake.explain}"
    )
