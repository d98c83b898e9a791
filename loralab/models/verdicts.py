"""Three-way verdicts on a paper's claim from a few seeds: "agrees", "within noise" or "DISAGREES".

Tutorials 09 and 10 repeat papers' comparisons in miniature, a few seeds per configuration. A
comparison is called only when the gap between the means is larger than ``k`` standard errors of
that gap (``k = 2`` by default, roughly a 95% two-sided interval for a normal gap); otherwise the
verdict is "within noise", which is neither a confirmation nor a refutation. The thresholds a
tutorial compares against are its own choices, not the papers'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["AGREES", "WITHIN_NOISE", "DISAGREES", "VERDICTS", "lower", "above", "negate"]

#: The difference is past the noise, in the direction the claim says.
AGREES = "agrees"
#: The difference is smaller than the noise: the claim is neither confirmed nor refuted.
WITHIN_NOISE = "within noise"
#: The difference is past the noise, against the claim.
DISAGREES = "DISAGREES"
VERDICTS = (AGREES, WITHIN_NOISE, DISAGREES)


def _values(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) < 2 or not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name}: expected at least 2 finite values (one per seed) in a 1-D sequence, "
            f"got {array.tolist() if array.size < 10 else f'shape {array.shape}'}"
        )
    return array


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def _call(gap: float, noise: float) -> str:
    return AGREES if gap > noise else DISAGREES if gap < -noise else WITHIN_NOISE


def lower(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    paired: bool = False,
    k: float = 2.0,
) -> str:
    """Verdict on the claim "a is lower than b", from per-seed values.

    The gap is ``mean(b) - mean(a)``; its standard error is ``hypot(se(a), se(b))`` with
    ``se(x) = std(x, ddof=1) / sqrt(len(x))``, or, with ``paired=True`` (``a[i]`` and ``b[i]``
    from the same seed: the same initialisation and batches), the standard error of the
    per-seed differences ``b - a``, which removes what the two runs of a seed share.

    Parameters
    ----------
    a, b : sequence of float, each of length >= 2 (equal lengths when ``paired``)
    paired : bool, default False
    k : float, default 2
        How many standard errors the gap must exceed.

    Returns
    -------
    str
        "agrees" if the gap exceeds ``k`` standard errors, "DISAGREES" if it is that large the
        other way, "within noise" otherwise.

    Examples
    --------
    >>> lower([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    'agrees'
    >>> lower([1.0, 1.5, 0.5], [1.1, 1.6, 0.6])
    'within noise'
    >>> lower([1.0, 1.5, 0.5], [1.1, 1.6, 0.6], paired=True)
    'agrees'
    """
    a, b = _values("a", a), _values("b", b)
    if paired:
        if len(a) != len(b):
            raise ValueError(
                f"lower(paired=True): a and b need one value per seed each, got {len(a)} and {len(b)}"
            )
        differences = b - a
        return _call(float(differences.mean()), k * _standard_error(differences))
    noise = k * float(np.hypot(_standard_error(a), _standard_error(b)))
    return _call(float(b.mean() - a.mean()), noise)


def above(values: Sequence[float] | np.ndarray, threshold: float, *, k: float = 2.0) -> str:
    """Verdict on the claim "the mean of values is above threshold", from per-seed values.

    Returns
    -------
    str
        "agrees" if ``mean - k se > threshold``, "DISAGREES" if ``mean + k se < threshold``,
        "within noise" otherwise (``se`` as in :func:`lower`).

    Examples
    --------
    >>> above([0.9, 0.8, 0.85], 0.5), above([0.1, 0.2, 0.15], 0.5), above([0.3, 0.9, 0.6], 0.5)
    ('agrees', 'DISAGREES', 'within noise')
    """
    array = _values("values", values)
    return _call(float(array.mean() - threshold), k * _standard_error(array))


def negate(verdict: str) -> str:
    """The verdict on the opposite claim: "agrees" and "DISAGREES" swap, "within noise" stays.

    For a claim of the form "a is *not* lower than b": ``negate(lower(a, b))``. A gap within the
    noise does not confirm "not lower" either; it stays "within noise".
    """
    if verdict not in VERDICTS:
        raise ValueError(f"negate: verdict must be one of {VERDICTS}, got {verdict!r}")
    return {AGREES: DISAGREES, DISAGREES: AGREES, WITHIN_NOISE: WITHIN_NOISE}[verdict]
