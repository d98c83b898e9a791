"""Checks of the LoRA layer itself: its forward, its backward, its start (A random, B = 0) and
dropout on its LoRA path (exercises 1-3, 10 and 11)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises import _reference as ref
from loralab.exercises import _wrong_answers as mis
from loralab.exercises._feedback import (
    MISTAKE_NOTE,
    Failure,
    as_array,
    call_student,
    call_student_traced,
    close,
    describe,
    difference,
    function_name,
    match_mistake,
    mistake_note,
    positional_names,
    run_check,
)
from loralab.exercises._hints import BATCH_HINT, SHAPE_HINT, is_shape_error, probe_note
from loralab.exercises._mistakes import MISTAKES

# ----------------------------------------------------------------------------------- forward


def check_lora_forward(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``lora_forward(x, W0, A, B, scaling) -> y``.

    y = x W0^T + scaling * (x A^T) B^T with x of shape (..., in), W0 (out, in), A (r, in),
    B (out, r); y has shape (..., out). A function whose positional parameters include ``alpha``
    and ``r``, i.e. ``lora_forward_from_config(x, W0, A, B, alpha, r)``, is called that way
    instead and must use scaling = alpha / r.

    Recognised mistakes: forgot the scaling; alpha, alpha // r, r / alpha or rsLoRA's
    alpha / sqrt(r) instead of alpha / r; scaling applied twice, divided by r again, or applied to
    the frozen path too; B and A swapped or transposed; W0 not transposed; the update added to x
    instead of W0 x; a wrong output shape (e.g. batch dimensions flattened).
    """
    names = positional_names(student_fn) or []
    config = "alpha" in names and "r" in names
    key = "lora_forward_from_config" if config else "lora_forward"
    return run_check(
        key,
        lambda: _forward(student_fn, function_name(student_fn, key), config),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _forward_call(fn, name, config, inp, alpha, r):
    x, W0, A, B = inp["x"], inp["W0"], inp["A"], inp["B"]
    if config:
        args, arg_names = (x, W0, A, B, alpha, r), ("x", "W0", "A", "B", "alpha", "r")
        case = describe(x=x, W0=W0, A=A, B=B, alpha=alpha, r=r)
    else:
        args, arg_names = (x, W0, A, B, alpha / r), ("x", "W0", "A", "B", "scaling")
        case = describe(x=x, W0=W0, A=A, B=B, scaling=alpha / r)
    return call_student(fn, name, args, arg_names, case), case


# alpha = 16, r = 3: alpha / r, alpha // r, r / alpha, alpha / sqrt(r), alpha and 1 all differ.
_ALPHA, _R = 16, 3


def _forward(fn, name, config) -> str:
    alpha, r = _ALPHA, _R
    worked_2d = False
    for batch, seed in (((3,), 1), ((2, 4), 2)):
        inp = ref.lora_inputs(batch, 7, 5, r, seed)
        try:
            y, case = _forward_call(fn, name, config, inp, alpha, r)
        except Failure as failure:
            if not is_shape_error(failure.raised):
                raise
            hint = BATCH_HINT if worked_2d else _square_probe(fn, name, config) or SHAPE_HINT
            raise Failure(f"{failure}\n  {hint}", raised=failure.raised) from failure.raised
        args = (inp["x"], inp["W0"], inp["A"], inp["B"])
        expected = ref.lora_forward(*args, alpha / r)
        variants = mis.forward(*args, alpha / r, alpha, r)
        problem = difference(y, expected, what="y", variants=variants, case=case)
        if problem:
            raise Failure(f"{problem}\n  {case}" + (f"\n  {BATCH_HINT}" if worked_2d else ""))
        worked_2d = True
    return "" if config else _memory_note(fn, name, backward=False)


# A wide layer on which one (out, in) float64 matrix (12.6 MB) dwarfs all that LoRA's forward and
# backward need (under 0.2 MB): the peak memory of a call shows whether it formed one.
_WIDE_OUT, _WIDE_IN, _WIDE_R = 1024, 1536, 2


def _memory_note(fn, name, *, backward: bool) -> str:
    """A line saying whether ``fn`` formed an (out, in) matrix (the product B A, dW0 = dy^T x), measured
    by its peak memory on a wide layer; "" when the peak cannot be measured."""
    inp = ref.lora_inputs((4,), _WIDE_IN, _WIDE_OUT, _WIDE_R, 5)
    arrays = {
        k: inp[k] for k in (("dy", "x", "W0", "A", "B") if backward else ("x", "W0", "A", "B"))
    }
    args = (*arrays.values(), 2.0)
    arg_names = (*arrays, "scaling")
    case = describe(**dict(zip(arg_names, args, strict=True)))
    try:
        _, peak = call_student_traced(fn, name, args, arg_names, case)
    except Failure:  # e.g. a loop too slow for the wide layer: the answer was right, claim nothing
        return ""
    if peak is None:
        return ""
    size = _WIDE_OUT * _WIDE_IN * 8
    layer = f"on a layer with out = {_WIDE_OUT}, in = {_WIDE_IN}, your function's memory peaked at"
    measured = f"{peak / 1e6:.2f} MB, against {size / 1e6:.1f} MB for one (out, in) matrix"
    if peak < size / 4:
        if backward:
            return (
                f"And it computed no dW0: {layer} {measured}. The frozen W0 needs no gradient, "
                "which is where LoRA saves its memory."
            )
        return (
            f"And it never formed the (out, in) product B A (ΔW = scaling * B A): {layer} {measured}; the only "
            "thing between the two products is x A^T, r numbers per row."
        )
    if backward:
        return (
            f"Your gradients are right, but {layer} {measured}: it formed one, such as "
            "dW0 = dy^T x. The frozen W0 needs no gradient: leave dW0 out, which is where LoRA "
            "saves its memory."
        )
    return (
        f"Your output is right, but {layer} {measured}: it formed one, such as the product B A or "
        "W0 + scaling * B A. LoRA's forward never needs it: (x @ A.T) @ B.T keeps the "
        "intermediate at r numbers per row."
    )


def _square_probe(fn, name, config) -> str | None:
    """Run on a square layer (in = out), where swapped or untransposed products still run."""
    alpha, r = _ALPHA, _R
    inp = ref.lora_inputs((4,), 6, 6, r, 3)
    try:
        y, _ = _forward_call(fn, name, config, inp, alpha, r)
        arr = np.asarray(y, dtype=float)
    except (Failure, TypeError, ValueError):
        return None
    args = (inp["x"], inp["W0"], inp["A"], inp["B"])
    mistake = match_mistake(arr, mis.forward(*args, alpha / r, alpha, r))
    return probe_note(mistake, 6, "output") if mistake else None


# ----------------------------------------------------------------------------------- backward


def check_lora_backward(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``lora_backward(dy, x, W0, A, B, scaling) -> (dx, dA, dB)``.

    For y = x W0^T + scaling * x A^T B^T and upstream gradient dy (..., out), summed over all
    leading dimensions: dx = dy W0 + scaling * (dy B) A of shape (..., in);
    dA = scaling * B^T dy^T x of shape (r, in); dB = scaling * dy^T (x A^T) of shape (out, r).

    Cases: a non-square layer (in = 7, out = 5), a square one (in = out = 6, where dy W0^T also
    runs, with wrong values) and a batched x (2, 4, 7); a function that fails on the non-square
    layer is run on the square one to name its mistake.

    Recognised mistakes: scaling missing in dA, dB or dx; dx without the LoRA path; dx without
    the frozen path dy W0 (frozen weights do not block gradients); W0^T instead of W0 in dx;
    dA and dB swapped or transposed; averaged over the batch; a 4-tuple that also holds dW0 (the
    values may be right, but W0 is frozen, so the check fails and says dW0 was not needed).
    """
    return run_check(
        "lora_backward",
        lambda: _gradients(student_fn, function_name(student_fn, "lora_backward"), dropout=False),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


_GRAD_ARGS = ("dy", "x", "W0", "A", "B", "scaling")
_DROPOUT_ARGS = (*_GRAD_ARGS, "keep", "p")
# (batch, in, out, seed): a non-square layer, a square one (where dy W0^T runs too, with wrong
# values), and a batched x.
_GRAD_CASES = (((3,), 7, 5, 11), ((4,), 6, 6, 13), ((2, 4), 7, 5, 12))


def _grad_args(batch, d_in, d_out, seed, dropout):
    scaling = 16 / 3
    if dropout:
        inp = ref.dropout_problem(batch, d_in, d_out, 3, seed)
        extra = (inp["keep"], inp["p"])
    else:
        inp, extra = ref.lora_inputs(batch, d_in, d_out, 3, seed), ()
    return (inp["dy"], inp["x"], inp["W0"], inp["A"], inp["B"], scaling, *extra)


def _gradients(fn, name, dropout) -> str:
    """Check a function returning (dx, dA, dB) on every case of `_GRAD_CASES`."""
    arg_names = _DROPOUT_ARGS if dropout else _GRAD_ARGS
    reference = ref.lora_dropout_backward if dropout else ref.lora_backward
    wrong = mis.dropout_backward if dropout else mis.backward
    passed = 0
    for batch, d_in, d_out, seed in _GRAD_CASES:
        args = _grad_args(batch, d_in, d_out, seed, dropout)
        case = describe(**dict(zip(arg_names, args, strict=True)))
        batch_hint = f"\n  {BATCH_HINT}" if passed and len(batch) > 1 else ""
        try:
            out = call_student(fn, name, args, arg_names, case)
        except Failure as failure:
            if not is_shape_error(failure.raised):
                raise
            hint = batch_hint or ("\n  " + (_grad_probe(fn, name, dropout, wrong) or SHAPE_HINT))
            raise Failure(f"{failure}{hint}", raised=failure.raised) from None
        if not isinstance(out, (tuple, list)):
            raise Failure(f"`{name}` should return a tuple (dx, dA, dB), got {type(out).__name__}.")
        if dropout and passed == 0:
            _same_twice(fn, name, args, arg_names, case, out)
        note = ""
        if len(out) == 4:
            out, note = _strip_dW0(out, args)
        if len(out) != 3:
            raise Failure(
                f"`{name}` returned {len(out)} values; expected 3: (dx, dA, dB).\n  {case}"
            )
        expected = reference(*args)
        variants = wrong(*args)
        problems = [
            difference(got, exp, what=what, variants=var, case=case)
            for got, exp, what, var in zip(out, expected, ("dx", "dA", "dB"), variants, strict=True)
        ]
        problems = _once(p for p in problems if p)
        if close_pair(out[1:], expected[:0:-1]):
            problems = [p for p in problems if "dx" in p.split(" has ")[0]]
            problems.append(
                "dA and dB have each other's values." + mistake_note(MISTAKES["dA_dB_swapped"])
            )
        if problems:
            raise Failure("\n  ".join(problems) + note + f"\n  {case}" + batch_hint)
        if note:
            raise Failure(f"Your dx, dA and dB are all correct, but you returned 4 values.{note}")
        passed += 1
    return "" if dropout else _memory_note(fn, name, backward=True)


def _once(problems) -> list[str]:
    """The problems, with a known-mistake note that repeats an earlier one left out."""
    seen, out = set(), []
    for problem in problems:
        head, sep, note = problem.partition(MISTAKE_NOTE)
        out.append(head if sep and note in seen else problem)
        if sep:
            seen.add(note)
    return out


def _grad_probe(fn, name, dropout, wrong) -> str | None:
    """Run on the square case (in = out = 6), where dy W0^T runs too, and name the mistake."""
    batch, d_in, d_out, seed = _GRAD_CASES[1]
    args = _grad_args(batch, d_in, d_out, seed, dropout)
    arg_names = _DROPOUT_ARGS if dropout else _GRAD_ARGS
    try:
        out = call_student(fn, name, args, arg_names, "")
        dx = np.asarray(out[0], dtype=float)
    except (Failure, TypeError, ValueError, IndexError, KeyError):
        return None
    mistake = match_mistake(dx, wrong(*args)[0])
    return probe_note(mistake, d_in, "dx") if mistake else None


def _same_twice(fn, name, args, arg_names, case, first) -> None:
    """A second call on the same inputs must give the same arrays (no fresh random mask)."""
    again = call_student(fn, name, args, arg_names, case)
    try:
        same = len(again) == len(first) and all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, first, strict=True)
        )
    except (TypeError, ValueError):
        return
    if not same:
        raise Failure(
            "Two calls with the same inputs gave different results."
            + mistake_note(MISTAKES["dropout_new_mask"])
            + f"\n  {case}"
        )


def close_pair(got, expected) -> bool:
    """True when every item of ``got`` is an array close to the matching item of ``expected``."""
    arrays = [np.asarray(g) if isinstance(g, np.ndarray) else None for g in got]
    return all(a is not None and close(a, e) for a, e in zip(arrays, expected, strict=True))


def _strip_dW0(out, args):
    dy, x = args[0], args[1]
    dW0 = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    for k, item in enumerate(out):
        arr = np.asarray(item) if isinstance(item, np.ndarray) else None
        if arr is not None and close(arr, dW0):
            rest = [v for i, v in enumerate(out) if i != k]
            where = f" You returned dW0 as item {k} of 4."
            return rest, where + mistake_note(MISTAKES["computed_dW0"])
    return out, ""


# ---------------------------------------------------------------------------- initialisation


def check_lora_init(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``init_lora(in_features, out_features, r, rng) -> (A, B)``.

    A of shape (r, in) is drawn from the generator ``rng`` (rank r, finite); B of shape (out, r)
    is all zero (LoRA paper, Section 4.1). Then ΔW = B A = 0, so the adapted layer starts as the
    pretrained one, and the first gradient dB = scaling * dy^T (x A^T) is nonzero, so training
    moves. The same rng must give the same A, different rngs different A.

    Recognised mistakes: A and B both zero (no gradient ever); both random (ΔW is noise at the
    start); A zero and B random (roles swapped); A of rank below r; A not drawn from ``rng``.
    """
    return run_check(
        "lora_init",
        lambda: _init(student_fn, function_name(student_fn, "init_lora")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


_INIT_ARGS = ("in_features", "out_features", "r", "rng")


def _init_pair(fn, name, d_in, d_out, r, seed):
    case = describe(in_features=d_in, out_features=d_out, r=r) + f", rng=default_rng({seed})"
    out = call_student(fn, name, (d_in, d_out, r, ref.rng(seed)), _INIT_ARGS, case)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise Failure(
            f"`{name}` should return the pair (A, B), got {type(out).__name__}.\n  {case}"
        )
    A = as_array(out[0], "A", (r, d_in), case)
    B = as_array(out[1], "B", (d_out, r), case)
    if A.shape != (r, d_in) or B.shape != (d_out, r):
        swapped = A.shape == (d_out, r) and B.shape == (r, d_in)
        raise Failure(
            f"wrong shapes: A {A.shape} and B {B.shape}; expected A (r, in) = {(r, d_in)} and "
            f"B (out, r) = {(d_out, r)}."
            + (" You returned (B, A): return (A, B)." if swapped else "")
            + f"\n  {case}"
        )
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
        raise Failure(f"A or B holds NaN or inf.\n  {case}")
    return A, B, case


def _init(fn, name) -> str:
    for d_in, d_out, r, seed in ((7, 5, 3, 61), (16, 16, 4, 62)):
        A, B, case = _init_pair(fn, name, d_in, d_out, r, seed)
        mistake = mis.init(A, B, r)
        if mistake is not None:
            raise Failure(
                f"A has {np.count_nonzero(A)} nonzero entries of {A.size} and B "
                f"{np.count_nonzero(B)} of {B.size}; rank(A) = {np.linalg.matrix_rank(A)} "
                f"(expected {r})." + mistake_note(mistake) + f"\n  {case}"
            )
        A_again, _, _ = _init_pair(fn, name, d_in, d_out, r, seed)
        A_other, _, _ = _init_pair(fn, name, d_in, d_out, r, seed + 1)
        if not np.array_equal(A, A_again) or np.array_equal(A, A_other):
            what = (
                "Two generators with the same seed gave different A"
                if not np.array_equal(A, A_again)
                else "Generators with different seeds gave the same A"
            )
            raise Failure(f"{what}." + mistake_note(MISTAKES["init_global_rng"]) + f"\n  {case}")
    inp = ref.lora_inputs((4,), d_in, d_out, r, 63)
    _, _, dB = ref.lora_backward(inp["dy"], inp["x"], inp["W0"], A, B, 2.0)
    return (
        f"With your A and B, ΔW = scaling * B A is exactly zero, while the first gradient of B, "
        f"scaling * dy^T (x A^T), has norm {np.linalg.norm(dB):.3g} (test inputs, scaling 2)."
    )


# ----------------------------------------------------------------------------------- dropout


def check_lora_dropout_backward(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p) -> (dx, dA, dB)``.

    Dropout on the LoRA path's input, as PEFT's ``lora_dropout``: with the forward's 0/1 mask
    ``keep`` (x's shape) and drop probability p, x_d = x * keep / (1 - p) and
    y = x W0^T + scaling * (x_d A^T) B^T. Summed over the batch:
    dx = dy W0 + (scaling * (dy B) A) * keep / (1 - p); dA = scaling * (dy B)^T x_d;
    dB = scaling * dy^T (x_d A^T). Same cases as `check_lora_backward`.

    Recognised mistakes: the mask missing in dx's LoRA path, or put on the frozen path too;
    no 1 / (1 - p); x instead of x_d in dA or dB; a fresh random mask (the result changes from
    call to call); and the plain backward's mistakes on dx, dA and dB.
    """
    return run_check(
        "lora_dropout_backward",
        lambda: _gradients(
            student_fn, function_name(student_fn, "lora_dropout_backward"), dropout=True
        ),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )
