"""Checks of what LoRA costs and what low rank means: parameter counts, the truncated SVD and
the LoRA paper's subspace similarity (exercises 4, 5 and 9)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises import _reference as ref
from loralab.exercises import _wrong_answers as mis
from loralab.exercises._feedback import (
    Failure,
    call_student,
    compare,
    describe,
    difference,
    function_name,
    mistake_note,
    plain_repr,
    run_check,
)

# ----------------------------------------------------------------------------------- counting


_MODEL_SHAPES = {
    "embed.weight": (50, 16),
    "attn.q.weight": (16, 16),
    "attn.q.bias": (16,),
    "attn.k.weight": (16, 16),
    "attn.v.weight": (16, 16),
    "attn.o.weight": (16, 16),
    "mlp.up.weight": (40, 16),
    "mlp.up.bias": (40,),
    "mlp.down.weight": (16, 40),
}


def check_param_count(
    student_fn: Callable,
    student_model_fn: Callable | None = None,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``lora_param_count(d, k, r) -> int`` and, if given, the whole-model count.

    For W0 of shape (d, k), LoRA trains B (d, r) and A (r, k): r (d + k) parameters.
    ``student_model_fn`` is ``lora_model_param_count(shapes, r, targets) -> (trainable, total)``:
    ``shapes`` maps every parameter name of a model to its shape (2-D weights (out, in), 1-D
    biases), ``targets`` lists the names of the 2-D weights that get a LoRA pair of rank r;
    ``trainable`` counts the LoRA parameters, ``total`` the frozen base ones plus the LoRA ones.

    Recognised mistakes: counted the full d x k matrix; counted W0 too; r d k; only one factor;
    2 r d for a non-square matrix; adapted every matrix instead of the targets; frozen base or
    its biases counted as trainable; a total without the LoRA parameters.
    """
    return run_check(
        "param_count",
        lambda: _param_count(student_fn, student_model_fn),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _as_int(got, what: str, case: str) -> int:
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, np.integer)):
        if isinstance(got, (float, np.floating)) and float(got).is_integer():
            raise Failure(
                f"{what} is the float {float(got)!r}: return an int (e.g. `int(...)`).\n  {case}"
            )
        raise Failure(
            f"{what} should be an int, got {type(got).__name__} {plain_repr(got)}.\n  {case}"
        )
    return int(got)


def _param_count(fn, model_fn) -> str:
    name = function_name(fn, "lora_param_count")
    for d, k, r in ((5, 7, 3), (7, 5, 1), (768, 768, 8), (4096, 11008, 16)):
        case = describe(d=d, k=k, r=r)
        got = _as_int(call_student(fn, name, (d, k, r), ("d", "k", "r"), case), "the count", case)
        expected = ref.lora_param_count(d, k, r)
        if got != expected:
            mistake = next((m for m, v in mis.param_count(d, k, r) if v == got), None)
            note = mistake_note(mistake) if mistake else ""
            raise Failure(f"`{name}({d}, {k}, {r})` returned {got}, expected {expected}.{note}")
    d = k = 4096
    case = describe(d=d, k=k, r=8)
    n = _as_int(call_student(fn, name, (d, k, 8), ("d", "k", "r"), case), "the count", case)
    detail = f"A {d} x {k} matrix with r = 8 trains {n:,} numbers instead of {d * k:,} ({n / (d * k):.2%})."
    if model_fn is None:
        return detail + " Pass `lora_model_param_count` as the second argument to check it too."
    mname = function_name(model_fn, "lora_model_param_count")
    for r, targets in (
        (4, ["attn.q.weight", "attn.v.weight"]),
        (2, ["mlp.up.weight", "mlp.down.weight"]),
    ):
        shapes = dict(_MODEL_SHAPES)
        case = describe(shapes=f"{len(shapes)} parameters", r=r, targets=targets)
        got = call_student(model_fn, mname, (shapes, r, targets), ("shapes", "r", "targets"), case)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failure(
                f"`{mname}` should return a pair (trainable, total), got {plain_repr(got)}.\n  {case}"
            )
        got = tuple(_as_int(v, w, case) for v, w in zip(got, ("trainable", "total"), strict=True))
        expected = ref.lora_model_param_count(shapes, r, targets)
        if got != expected:
            mistake = next((m for m, v in mis.model_count(shapes, r, targets) if v == got), None)
            note = mistake_note(mistake) if mistake else ""
            raise Failure(
                f"`{mname}` returned (trainable, total) = {got}, expected {expected}.{note}\n  {case}"
            )
    trainable, total = got
    return detail + f" In the small model, LoRA trains {trainable / total:.2%} of all parameters."


# --------------------------------------------------------------------------------- low rank


def check_low_rank_approx(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``low_rank_approx(W, r) -> W_r``, the best rank-r approximation via the SVD.

    W = U diag(sigma) V^T; W_r = U[:, :r] diag(sigma[:r]) V[:, :r]^T has W's shape (m, n), rank r, and
    (Eckart–Young) ||W - W_r||_F^2 = sum_{i > r} sigma_i^2, the smallest possible.

    Recognised mistakes: kept the smallest singular values; left out sigma; columns of Vh instead
    of rows; kept r + 1 or r - 1 values.
    """
    return run_check(
        "low_rank_approx",
        lambda: _low_rank(student_fn, function_name(student_fn, "low_rank_approx")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _low_rank(fn, name) -> str:
    cases = (
        ((9, 6), (6.0, 5.0, 4.0, 3.0, 2.0, 1.0), 2, 21),
        ((5, 8), (5.0, 3.0, 2.0, 1.5, 0.5), 3, 22),
    )
    for (m, n), sigma, r, seed in cases:
        W = ref.matrix_with_singular_values(m, n, sigma, seed)
        case = describe(W=W, r=r) + f", singular values {sigma}"
        got = call_student(fn, name, (W, r), ("W", "r"), case)
        expected = ref.low_rank_approx(W, r)
        problem = difference(got, expected, what="W_r", variants=mis.low_rank(W, r), case=case)
        if problem:
            arr = np.asarray(got, dtype=float)
            if arr.shape == W.shape and np.all(np.isfinite(arr)):
                err2 = float(np.sum((W - arr) ** 2))
                best = float(np.sum(np.square(sigma[r:])))
                rank = int(np.linalg.matrix_rank(arr))
                problem += (
                    f"\n  Its rank is {rank} (expected {r}) and ||W - W_r||_F^2 = {err2:.6g}, while the "
                    f"Eckart–Young minimum, the sum of the discarded sigma^2, is {best:.6g}."
                )
            raise Failure(f"{problem}\n  {case}")
    err2 = float(np.sum((W - np.asarray(got)) ** 2))
    return (
        f"On the {m} x {n} test matrix with r = {r}: ||W - W_r||_F^2 = {err2:.6g} "
        f"= sum of the discarded sigma^2 = {float(np.sum(np.square(sigma[r:]))):.6g}."
    )


# ------------------------------------------------------------------------ subspace similarity


def check_subspace_similarity(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``subspace_similarity(U1, U2, i, j) -> float`` (LoRA paper, Section 7.2).

    U1 (d, r1) and U2 (d, r2) have orthonormal columns ordered by importance (e.g. the right-singular
    vectors of two learned A matrices: ``Vh.T`` from ``np.linalg.svd(A)``). With U1_i = U1[:, :i] and
    U2_j = U2[:, :j]: phi = ||U1_i^T U2_j||_F^2 / min(i, j), a number in [0, 1].

    Recognised mistakes: norm not squared; divided by max(i, j), i j or nothing; all columns used
    instead of the first i and j; rows instead of columns.
    """
    return run_check(
        "subspace_similarity",
        lambda: _subspace(student_fn, function_name(student_fn, "subspace_similarity")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _subspace(fn, name) -> str:
    U1 = ref.orthonormal_columns(10, 4, 51)
    U2 = ref.orthonormal_columns(10, 6, 52)
    Q = ref.orthonormal_columns(10, 8, 53)
    cases = [
        (U1, U2, 3, 3),
        (U1, U2, 2, 5),
        (U1, U2, 4, 1),
        (U1, U1, 3, 3),
        (Q[:, :4], Q[:, 4:], 2, 3),
    ]
    got_values = []
    for a, b, i, j in cases:
        case = describe(U1=a, U2=b, i=i, j=j)
        got = call_student(fn, name, (a, b, i, j), ("U1", "U2", "i", "j"), case)
        expected = np.asarray(ref.subspace_similarity(a, b, i, j))
        compare(got, expected, what="phi", case=case, variants=mis.subspace(a, b, i, j))
        got_values.append(float(np.asarray(got)))
    return f"Same subspace: phi = {got_values[3]:.3f}; orthogonal subspaces: phi = {got_values[4]:.3f}."
