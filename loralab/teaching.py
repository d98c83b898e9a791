"""Helpers the tutorials share: committed predictions, stand-in banners and shipped figures.

A tutorial asks the learner to predict before running ("Predict, then run"). The learner writes
the guess into a variable, ``my_guess = None  # your prediction``, and the answer cell calls
`compare_prediction` with the measured value: it says whether the guess was close, and just
shows the answer when no guess was committed (``None``), so the notebook runs either way.

>>> compare_prediction(4, 3.998, explanation="8N / (2N + 8P) with P much smaller than N.")
Your guess: 4. Measured: 3.998. Close (within 10%).
  8N / (2N + 8P) with P much smaller than N.
True
>>> compare_prediction(None, "B", choices=("A", "B"))
You did not commit a guess (my_guess is None). The answer: B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from numbers import Real

__all__ = ["STAND_IN_BANNER", "compare_prediction", "figure", "stand_in_banner"]

#: The words every type-along prints when loralab's version runs in place of an unfinished cell.
STAND_IN_BANNER = "USING LORALAB'S VERSION"


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _show(value: object) -> str:
    if _is_number(value):
        return f"{float(value):.4g}"  # type: ignore[arg-type]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _same_choice(guess: object, answer: object) -> bool:
    if isinstance(guess, str) and isinstance(answer, str):
        return guess.strip().lower() == answer.strip().lower()
    return guess == answer


def compare_prediction(
    guess: object,
    measured: object,
    *,
    rtol: float = 0.1,
    atol: float = 0.0,
    choices: Sequence[object] | None = None,
    explanation: str = "",
    name: str = "my_guess",
) -> bool | None:
    """Print how a committed prediction compares with what the notebook measured.

    Parameters
    ----------
    guess : number, str, sequence, dict or None
        The learner's prediction; None when the learner did not write one.
    measured : number, str, sequence or dict
        The measured (or computed) answer, of the same kind as the expected guess.
    rtol, atol : float, default 0.1 and 0.0
        For numbers: the guess is close when ``|guess - measured| <= atol + rtol * |measured|``.
    choices : sequence, optional
        The allowed answers of a multiple-choice question; a guess outside them is refused.
    explanation : str, optional
        Why the answer is what it is, printed under the verdict.
    name : str, default "my_guess"
        The variable the learner writes the guess into, named in the messages.

    Returns
    -------
    bool or None
        True when the guess matches (numbers: within the tolerance; strings: equal ignoring case
        and surrounding spaces; sequences and dicts: entry by entry), False when it does not, None
        when no guess was committed.

    Raises
    ------
    ValueError
        ``guess`` is not one of ``choices``, or ``rtol``/``atol`` is negative or not finite.
    TypeError
        ``guess`` and ``measured`` are of kinds that cannot be compared (a number against a word).
    """
    for label, tol in (("rtol", rtol), ("atol", atol)):
        if not _is_number(tol) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"compare_prediction: {label} must be a number >= 0, got {tol!r}")
    note = f"\n  {explanation}" if explanation else ""
    if guess is None:
        print(f"You did not commit a guess ({name} is None). The answer: {_show(measured)}.{note}")
        return None
    if choices is not None and not any(_same_choice(guess, c) for c in choices):
        raise ValueError(
            f"compare_prediction: {name} = {guess!r} is not one of the choices "
            f"{', '.join(repr(c) for c in choices)}"
        )
    if _is_number(guess) != _is_number(measured):
        raise TypeError(
            f"compare_prediction: {name} = {guess!r} cannot be compared with the measured "
            f"{measured!r}: write a {'number' if _is_number(measured) else type(measured).__name__}"
        )
    if _is_number(guess):
        g, m = float(guess), float(measured)  # type: ignore[arg-type]
        hit = abs(g - m) <= atol + rtol * abs(m)
        if hit:
            verdict = f"Close (within {rtol:.0%})." if atol == 0 else "Close."
        elif g != 0 and m != 0 and (g > 0) == (m > 0):
            ratio = max(g / m, m / g)
            verdict = f"Off by a factor of {ratio:.3g} ({'too high' if g > m else 'too low'})."
        else:
            verdict = f"Off by {abs(g - m):.3g}."
    elif isinstance(guess, dict) and isinstance(measured, dict):
        wrong = [k for k in measured if not _same_choice(guess.get(k), measured[k])]
        extra = [k for k in guess if k not in measured]
        hit = not wrong and not extra
        verdict = (
            "Right." if hit else f"Not quite: look again at {', '.join(map(str, wrong + extra))}."
        )
    elif isinstance(guess, (list, tuple)) and isinstance(measured, (list, tuple)):
        hit = len(guess) == len(measured) and all(
            _same_choice(a, b) for a, b in zip(guess, measured, strict=True)
        )
        verdict = "Right." if hit else "Not quite: compare the two orders."
    else:
        hit = _same_choice(guess, measured)
        verdict = "Right." if hit else "Not this time."
    print(f"Your guess: {_show(guess)}. Measured: {_show(measured)}. {verdict}{note}")
    return hit


def stand_in_banner(
    label: str, *, done: bool, reason: str = "your cell above is not finished"
) -> str:
    """The line a type-along prints about one of the learner's cells: used, or stood in for.

    Until the learner's cell passes its check, the notebook runs loralab's version in its place;
    the banner says so, so that no number printed later is mistaken for a test of the learner's
    code.

    >>> print(stand_in_banner("step 1: your forward", done=True))
    step 1: your forward is used below
    >>> print(stand_in_banner("step 1: your forward", done=False))
    step 1: your forward: USING LORALAB'S VERSION (your cell above is not finished)
    """
    if done:
        return f"{label} is used below"
    return f"{label}: {STAND_IN_BANNER} ({reason})"


def figure(name: str) -> str:
    """The text of a figure that ships with loralab (``loralab/data/figures/NAME``), e.g. an SVG.

    Tutorials load their figures from the installed package, so that a downloaded notebook runs
    outside the repository: ``IPython.display.SVG(figure("lora_block.svg"))``.

    Raises
    ------
    FileNotFoundError
        No figure of that name ships with loralab; the message lists the ones that do.
    """
    folder = resources.files("loralab.data").joinpath("figures")
    path = folder.joinpath(name)
    if "/" in name or "\\" in name or not path.is_file():
        shipped = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise FileNotFoundError(
            f"figure({name!r}): no such figure ships with loralab; available: {', '.join(shipped)}"
        )
    return path.read_text(encoding="utf-8")
