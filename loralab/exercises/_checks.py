"""The checks: run a student's function on fixed float64 inputs and explain any difference.

Every check has the form ``check_x(student_fn, *, strict=False, time_limit=None) -> bool``. It prints a
verdict and returns True or False; with ``strict=True`` a wrong answer raises ``AssertionError`` carrying
the same message. Each call of the student's function may run ``time_limit`` seconds (None: the default
`TIME_LIMIT`, 5 s) before the check stops it and says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises import _mistakes as mis
from loralab.exercises import _reference as ref
from loralab.exercises._feedback import (
    Failure,
    as_array,
    call_student,
    close,
    compare,
    describe,
    difference,
    match_mistake,
    mistake_note,
    positional_names,
    run_check,
)

_SHAPE_HINT = (
    "Shapes: x is (..., in), W0 is (out, in), A is (r, in), B is (out, r). A shape error "
    "usually means a product in the wrong order or a missing transpose."
)
_BATCH_HINT = (
    "It worked for 2-D x but not for the batched x. Write it with `@` acting on the last axis "
    "(x @ A.T), which works for any leading dimensions; for gradients, reshape to (-1, features) "
    "and sum over all rows."
)


def _name(fn: Callable, default: str) -> str:
    return getattr(fn, "__name__", default)


# ----------------------------------------------------------------------------------- forward


def check_lora_forward(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
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
        lambda: _forward(student_fn, _name(student_fn, key), config),
        strict=strict,
        time_limit=time_limit,
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
            if failure.raised is None or isinstance(failure.raised, NotImplementedError):
                raise
            hint = _BATCH_HINT if worked_2d else _square_probe(fn, name, config) or _SHAPE_HINT
            raise Failure(f"{failure}\n  {hint}", raised=failure.raised) from failure.raised
        args = (inp["x"], inp["W0"], inp["A"], inp["B"])
        expected = ref.lora_forward(*args, alpha / r)
        variants = mis.forward(*args, alpha / r, alpha, r)
        problem = difference(y, expected, what="y", variants=variants, case=case)
        if problem:
            raise Failure(f"{problem}\n  {case}" + (f"\n  {_BATCH_HINT}" if worked_2d else ""))
        worked_2d = True
    return ""


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
    return _probe_note(mistake, 6, "output") if mistake else None


# ----------------------------------------------------------------------------------- backward


def check_lora_backward(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
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
        lambda: _gradients(student_fn, _name(student_fn, "lora_backward"), dropout=False),
        strict=strict,
        time_limit=time_limit,
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
        batch_hint = f"\n  {_BATCH_HINT}" if passed and len(batch) > 1 else ""
        try:
            out = call_student(fn, name, args, arg_names, case)
        except Failure as failure:
            if failure.raised is None or isinstance(failure.raised, NotImplementedError):
                raise
            hint = batch_hint or ("\n  " + (_grad_probe(fn, name, dropout, wrong) or _SHAPE_HINT))
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
                "dA and dB have each other's values." + mistake_note(mis.MISTAKES["dA_dB_swapped"])
            )
        if problems:
            raise Failure("\n  ".join(problems) + note + f"\n  {case}" + batch_hint)
        if note:
            raise Failure(f"Your dx, dA and dB are all correct, but you returned 4 values.{note}")
        passed += 1
    return ""


def _once(problems) -> list[str]:
    """The problems, with a known-mistake note that repeats an earlier one left out."""
    seen, out = set(), []
    for problem in problems:
        head, sep, note = problem.partition("\n  This matches a known mistake")
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
    return _probe_note(mistake, d_in, "dx") if mistake else None


def _probe_note(mistake, size: int, what: str) -> str:
    return (
        f"On a square layer (in = out = {size}) your function does run, and its {what} there "
        f"shows a known mistake ({mistake.kind}): {mistake.title}. {mistake.explain}"
    )


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
            + mistake_note(mis.MISTAKES["dropout_new_mask"])
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
            return rest, where + mistake_note(mis.MISTAKES["computed_dW0"])
    return out, ""


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
    )


def _as_int(got, what: str, case: str) -> int:
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, np.integer)):
        if isinstance(got, (float, np.floating)) and float(got).is_integer():
            raise Failure(
                f"{what} is the float {got!r}: return an int (e.g. `int(...)`).\n  {case}"
            )
        raise Failure(f"{what} should be an int, got {type(got).__name__} {got!r}.\n  {case}")
    return int(got)


def _param_count(fn, model_fn) -> str:
    name = _name(fn, "lora_param_count")
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
    mname = _name(model_fn, "lora_model_param_count")
    for r, targets in (
        (4, ["attn.q.weight", "attn.v.weight"]),
        (2, ["mlp.up.weight", "mlp.down.weight"]),
    ):
        shapes = dict(_MODEL_SHAPES)
        case = describe(shapes=f"{len(shapes)} parameters", r=r, targets=targets)
        got = call_student(model_fn, mname, (shapes, r, targets), ("shapes", "r", "targets"), case)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failure(
                f"`{mname}` should return a pair (trainable, total), got {got!r}.\n  {case}"
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
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
) -> bool:
    """Check ``low_rank_approx(W, r) -> W_r``, the best rank-r approximation via the SVD.

    W = U diag(sigma) V^T; W_r = U[:, :r] diag(sigma[:r]) V[:, :r]^T has W's shape (m, n), rank r, and
    (Eckart–Young) ||W - W_r||_F^2 = sum_{i > r} sigma_i^2, the smallest possible.

    Recognised mistakes: kept the smallest singular values; left out sigma; columns of Vh instead
    of rows; kept r + 1 or r - 1 values.
    """
    return run_check(
        "low_rank_approx",
        lambda: _low_rank(student_fn, _name(student_fn, "low_rank_approx")),
        strict=strict,
        time_limit=time_limit,
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


# ------------------------------------------------------------------------------------ merge


def check_merge(
    student_merge: Callable,
    student_unmerge: Callable | None = None,
    *,
    strict: bool = False,
    time_limit: float | None = None,
) -> bool:
    """Check ``merge(W0, A, B, scaling) -> W`` and, if given, ``unmerge(W, A, B, scaling) -> W0``.

    W = W0 + scaling * B A (shape (out, in)); unmerge subtracts the same update. Neither may change
    its inputs in place. With both, the round trip unmerge(merge(W0)) must give W0 back.

    Recognised mistakes: forgot the scaling; used alpha instead of alpha / r; ΔW transposed; wrong
    sign; changed W0 in place.
    """
    return run_check(
        "merge",
        lambda: _merge(student_merge, student_unmerge),
        strict=strict,
        time_limit=time_limit,
    )


_MERGE_ARGS = ("W0", "A", "B", "scaling")
_UNMERGE_ARGS = ("W", "A", "B", "scaling")


def _merge(merge_fn, unmerge_fn) -> str:
    mname = _name(merge_fn, "merge")
    uname = _name(unmerge_fn, "unmerge") if unmerge_fn else "unmerge"
    worst = 0.0
    for d_in, d_out, r, scaling, seed in ((7, 5, 3, 5.0 / 3, 31), (4, 6, 2, 2.0, 32)):
        inp = ref.lora_inputs((1,), d_in, d_out, r, seed)
        W0, A, B = inp["W0"], inp["A"], inp["B"]
        case = describe(W0=W0, A=A, B=B, scaling=scaling)
        try:
            W = call_student(merge_fn, mname, (W0, A, B, scaling), _MERGE_ARGS, case)
        except Failure as failure:
            if failure.raised is None or isinstance(failure.raised, NotImplementedError):
                raise
            hint = _merge_probe(merge_fn) or _SHAPE_HINT
            raise Failure(f"{failure}\n  {hint}", raised=failure.raised) from failure.raised
        compare(
            W,
            ref.merge(W0, A, B, scaling),
            what="merge's W",
            case=case,
            variants=mis.merge(W0, A, B, scaling),
        )
        if unmerge_fn is None:
            continue
        W = ref.merge(W0, A, B, scaling)
        case = describe(W=W, A=A, B=B, scaling=scaling)
        got = call_student(unmerge_fn, uname, (W, A, B, scaling), _UNMERGE_ARGS, case)
        compare(got, W0, what="unmerge's W0", case=case, variants=mis.unmerge(W, A, B, scaling))
        merged = call_student(merge_fn, mname, (W0, A, B, scaling), _MERGE_ARGS, case)
        back = call_student(unmerge_fn, uname, (merged, A, B, scaling), _UNMERGE_ARGS, case)
        back = as_array(back, "unmerge(merge(W0))", W0.shape, case)
        worst = max(worst, float(np.max(np.abs(back - W0))))
    if unmerge_fn is None:
        return "Pass `unmerge` as the second argument to check it too."
    return f"The round trip unmerge(merge(W0)) gave W0 back to within {worst:.1e}."


def _merge_probe(merge_fn) -> str | None:
    """Run merge on a square W0, where a transposed ΔW still runs, and name the mistake."""
    inp = ref.lora_inputs((1,), 6, 6, 3, 33)
    args = (inp["W0"], inp["A"], inp["B"], 5.0 / 3)
    try:
        arr = np.asarray(
            call_student(merge_fn, _name(merge_fn, "merge"), args, _MERGE_ARGS, ""), dtype=float
        )
    except (Failure, TypeError, ValueError):
        return None
    mistake = match_mistake(arr, mis.merge(*args))
    return _probe_note(mistake, 6, "output") if mistake else None


# -------------------------------------------------------------------------------- optimizers


def check_optimizer_step(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
) -> bool:
    """Check one optimizer step that updates only the trainable parameters.

    Which optimizer is told by the parameter names. ``sgd_step(params, grads, trainable, lr)``
    returns a new dict: p - lr * g for names in ``trainable``, every other entry unchanged.
    ``adam_step(params, grads, state, trainable, lr, betas, eps, t)`` (any function with a
    ``state`` parameter) returns ``(new_params, new_state)``; ``state[name] = (m, v)`` for each
    trainable name (zeros before the first step), ``t`` is the 1-based step number, and the
    update is PyTorch's: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). ``params`` and ``grads`` map names
    to arrays; ``grads`` holds a gradient for every parameter, frozen ones included. Inputs must
    not be changed in place. Three steps are chained, each from the student's own previous output.

    Recognised mistakes: updated a frozen parameter; stepped up the gradient; forgot lr (SGD);
    no bias correction, eps inside the square root, no square root, t + 1, state not carried,
    bias-corrected m_hat and v_hat kept in the state instead of m and v (Adam).
    """
    names = positional_names(student_fn) or []
    key = "adam_step" if "state" in names else "sgd_step"
    return run_check(
        key,
        lambda: _optimizer(student_fn, _name(student_fn, key), key == "adam_step"),
        strict=strict,
        time_limit=time_limit,
    )


_LR, _BETAS, _EPS, _STEPS = 0.1, (0.8, 0.95), 1e-2, 3


def _step_args(adam, params, grads, state, trainable, t):
    if adam:
        args = (params, grads, state, trainable, _LR, _BETAS, _EPS, t)
        return args, ("params", "grads", "state", "trainable", "lr", "betas", "eps", "t")
    return (params, grads, trainable, _LR), ("params", "grads", "trainable", "lr")


def _trajectory(step_fn, adam, params, grads, trainable) -> list[tuple[dict, dict]]:
    """(parameters, state) after each step of a known (correct or mistaken) optimizer."""
    state = {n: (np.zeros_like(params[n]), np.zeros_like(params[n])) for n in trainable}
    out = []
    for t, g in enumerate(grads, start=1):
        args, _ = _step_args(adam, params, g, state, trainable, t)
        params, state = step_fn(*args) if adam else (step_fn(*args), state)
        out.append((params, state))
    return out


def _optimizer(fn, name, adam) -> str:
    params, grads, trainable = ref.optimizer_problem(41, _STEPS)
    expected = _trajectory(ref.adam_step if adam else ref.sgd_step, adam, params, grads, trainable)
    wrong = [
        (m, _trajectory(f, adam, params, grads, trainable))
        for m, f in (mis.adam_steps() if adam else mis.sgd_steps())
    ]
    frozen = sorted(set(params) - trainable)
    state = {n: (np.zeros_like(params[n]), np.zeros_like(params[n])) for n in trainable}
    for t, g in enumerate(grads, start=1):
        case = f"step t={t} of {_STEPS}, trainable {sorted(trainable)}, frozen {frozen}, lr={_LR}"
        if adam:
            case += f", betas={_BETAS}, eps={_EPS}"
        args, arg_names = _step_args(adam, params, g, state, trainable, t)
        result = call_student(fn, name, args, arg_names, case)
        new_params, state = _unpack(result, adam, name, params, trainable, case)
        changed = [n for n in frozen if not np.array_equal(np.asarray(new_params[n]), params[n])]
        if changed:
            raise Failure(
                f"After step {t}, the frozen parameter(s) {changed} changed."
                + mistake_note(mis.MISTAKES["updated_frozen"])
                + f"\n  {case}"
            )
        for n in sorted(trainable):
            variants = [(m, traj[t - 1][0][n]) for m, traj in wrong]
            what = f"params['{n}'] after step {t}"
            compare(new_params[n], expected[t - 1][0][n], what=what, case=case, variants=variants)
        if adam:
            _compare_state(state, t, trainable, expected, wrong, case)
        params = {n: np.asarray(p) for n, p in new_params.items()}
    return ""


def _compare_state(state, t, trainable, expected, wrong, case) -> None:
    """Adam's new state must hold the raw moments (m, v) of every trainable name."""
    for n in sorted(trainable):
        pair = state[n]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise Failure(f"new_state['{n}'] should be a pair (m, v), got {pair!r:.80}.\n  {case}")
        for k, moment in enumerate(("m", "v")):
            variants = [(m, traj[t - 1][1][n][k]) for m, traj in wrong]
            what = f"new_state['{n}'] {moment} after step {t}"
            compare(pair[k], expected[t - 1][1][n][k], what=what, case=case, variants=variants)


def _unpack(result, adam, name, params, trainable, case):
    if adam:
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise Failure(
                f"`{name}` should return a pair (new_params, new_state), got {type(result).__name__}.\n  {case}"
            )
        new_params, new_state = result
        if not isinstance(new_state, dict) or not set(trainable) <= set(new_state):
            raise Failure(
                f"new_state should be a dict with an (m, v) pair for each trainable name "
                f"{sorted(trainable)}, got {new_state!r:.80}.\n  {case}"
            )
    else:
        new_params, new_state = result, None
    if not isinstance(new_params, dict):
        raise Failure(
            f"new params should be a dict name -> array, got {type(new_params).__name__}.\n  {case}"
        )
    missing = sorted(set(params) - set(new_params))
    if missing:
        raise Failure(
            f"The new params lack {missing}: return every parameter, the frozen ones unchanged.\n  {case}"
        )
    return new_params, new_state


# ------------------------------------------------------------------------ subspace similarity


def check_subspace_similarity(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
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
        lambda: _subspace(student_fn, _name(student_fn, "subspace_similarity")),
        strict=strict,
        time_limit=time_limit,
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


# ---------------------------------------------------------------------------- initialisation


def check_lora_init(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
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
        lambda: _init(student_fn, _name(student_fn, "init_lora")),
        strict=strict,
        time_limit=time_limit,
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
            raise Failure(
                f"{what}." + mistake_note(mis.MISTAKES["init_global_rng"]) + f"\n  {case}"
            )
    inp = ref.lora_inputs((4,), d_in, d_out, r, 63)
    _, _, dB = ref.lora_backward(inp["dy"], inp["x"], inp["W0"], A, B, 2.0)
    return (
        f"With your A and B, ΔW = B A is exactly zero, while the first gradient of B, "
        f"scaling * dy^T (x A^T), has norm {np.linalg.norm(dB):.3g} (test inputs, scaling 2)."
    )


# ----------------------------------------------------------------------------------- dropout


def check_lora_dropout_backward(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
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
        lambda: _gradients(student_fn, _name(student_fn, "lora_dropout_backward"), dropout=True),
        strict=strict,
        time_limit=time_limit,
    )


# ---------------------------------------------------------------------------------- injection


def check_inject_lora(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
) -> bool:
    """Check ``inject_lora_by_name(params, targets, r, rng) -> (new_params, trainable)``.

    ``params`` maps names such as ``"layers.0.attn.q.weight"`` to arrays; a module's name is its
    weight's name without ``.weight``. Every module whose name equals a target or ends with
    ``"." + target`` (PEFT's rule for a list of targets) and has a 2-D weight W0 (out, in) gets
    ``f"{module}.lora_A"`` (r, in), random from ``rng``, and ``f"{module}.lora_B"`` (out, r),
    zero. ``new_params`` holds every original array unchanged plus the new ones (``params``
    itself is not changed); ``trainable`` (a set or list) names exactly the new ones.

    Recognised mistakes: targets matched as substrings, or compared with the whole name; base
    weights (or the adapted W0) left trainable; B not zero (and the initialisation mistakes).
    """
    return run_check(
        "inject_lora",
        lambda: _inject(student_fn, _name(student_fn, "inject_lora_by_name")),
        strict=strict,
        time_limit=time_limit,
    )


def _lora_names(modules) -> list[str]:
    return [f"{m}.lora_{f}" for m in modules for f in ("A", "B")]


def _inject(fn, name) -> str:
    shapes = ref.injection_model()
    for targets, r, seed in ((["q", "v"], 2, 71), (["o", "mlp.up"], 3, 72)):
        g = ref.rng(seed)
        params = {n: g.standard_normal(s) for n, s in shapes.items()}
        case = describe(
            params=f"{len(params)} arrays named like 'layers.0.attn.q.weight'", targets=targets, r=r
        )
        args = (params, targets, r, ref.rng(seed + 100))
        out = call_student(fn, name, args, ("params", "targets", "r", "rng"), case)
        new_params, trainable = _unpack_injection(out, name, case)
        modules = ref.adapted_modules(shapes, targets)
        _check_base_kept(params, new_params, case)
        added = sorted(set(new_params) - set(params))
        odd = [n for n in added if not n.endswith((".lora_A", ".lora_B"))]
        if odd:
            raise Failure(
                f"new_params has unexpected names {odd}: name the new arrays "
                f"'<module>.lora_A' and '<module>.lora_B', e.g. '{modules[0]}.lora_A'.\n  {case}"
            )
        got_modules = sorted({n.rsplit(".", 1)[0] for n in added})
        if set(added) != set(_lora_names(modules)):
            wrong = mis.injected_modules(shapes, targets)
            mistake = next((m for m, mods in wrong if sorted(mods) == got_modules), None)
            raise Failure(
                f"LoRA was added to {got_modules or 'no module'}; expected {modules}."
                + (mistake_note(mistake) if mistake else "")
                + f"\n  {case}"
            )
        for module in modules:
            _check_pair(new_params, module, shapes[f"{module}.weight"], r, case)
        expected = set(_lora_names(modules))
        if trainable != expected:
            sets = mis.trainable_sets(shapes, modules, expected)
            mistake = next((m for m, t in sets if trainable == t), None)
            extra, missing = sorted(trainable - expected), sorted(expected - trainable)
            raise Failure(
                f"trainable is wrong: {len(extra)} name(s) too many {extra[:4]}, "
                f"{len(missing)} missing {missing[:4]}."
                + (mistake_note(mistake) if mistake else "")
                + f"\n  {case}"
            )
    n_lora = sum(int(np.asarray(new_params[n]).size) for n in expected)
    n_all = sum(int(np.asarray(v).size) for v in new_params.values())
    return (
        f"Right after injection every B is zero, so the model computes what the base did; it "
        f"trains {n_lora:,} of its {n_all:,} numbers ({n_lora / n_all:.1%})."
    )


def _unpack_injection(out, name, case):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise Failure(
            f"`{name}` should return the pair (new_params, trainable), got "
            f"{type(out).__name__}.\n  {case}"
        )
    new_params, trainable = out
    if not isinstance(new_params, dict):
        raise Failure(f"new_params should be a dict, got {type(new_params).__name__}.\n  {case}")
    if not isinstance(trainable, (set, frozenset, list, tuple)) or not all(
        isinstance(n, str) for n in trainable
    ):
        raise Failure(
            f"trainable should be a set (or list) of names, got {trainable!r:.80}.\n  {case}"
        )
    return new_params, set(trainable)


def _check_base_kept(params, new_params, case) -> None:
    lost = sorted(set(params) - set(new_params))
    if lost:
        raise Failure(f"new_params lacks {lost[:4]}: keep every original array.\n  {case}")
    changed = [n for n in params if not np.array_equal(np.asarray(new_params[n]), params[n])]
    if changed:
        raise Failure(
            f"The base weights {changed[:4]} changed: injection adds A and B beside W0 and "
            f"leaves W0 exactly as it was.\n  {case}"
        )


def _check_pair(new_params, module, w_shape, r, case) -> None:
    out_f, in_f = w_shape
    A = as_array(new_params[f"{module}.lora_A"], f"{module}.lora_A", (r, in_f), case)
    B = as_array(new_params[f"{module}.lora_B"], f"{module}.lora_B", (out_f, r), case)
    if A.shape != (r, in_f) or B.shape != (out_f, r):
        raise Failure(
            f"{module}: A has shape {A.shape} and B {B.shape}; with W0 of shape (out, in) = "
            f"{w_shape}, A is (r, in) = {(r, in_f)} and B is (out, r) = {(out_f, r)}.\n  {case}"
        )
    mistake = mis.init(A, B, r)
    if mistake is mis.MISTAKES["init_both_random"] or mistake is mis.MISTAKES["init_roles_swapped"]:
        mistake = mis.MISTAKES["inject_B_not_zero"]
    if mistake is not None:
        raise Failure(
            f"{module}: A and B are not a LoRA start." + mistake_note(mistake) + f"\n  {case}"
        )


# --------------------------------------------------------------------------------------- DoRA


def check_dora_forward(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
) -> bool:
    """Check ``dora_forward(x, W0, A, B, scaling, m) -> y`` (DoRA, Liu et al., 2024).

    With V = W0 + scaling * B A (out, in) and ||V||_row the norm of each row (shape (out,)), DoRA's
    weight is m * V / ||V||_row, so y = (m / ||V||_row) * (x W0^T + scaling * (x A^T) B^T) of
    shape (..., out); m (out,) is the trained magnitude (here not equal to ||V||_row).

    Recognised mistakes: the norm over the wrong axis, of W0 alone, of the whole matrix, or left
    out; the magnitude applied to the LoRA path only; m and the norms broadcast along the inputs
    (found on a square layer); the scaling forgotten.
    """
    return run_check(
        "dora_forward",
        lambda: _dora(student_fn, _name(student_fn, "dora_forward")),
        strict=strict,
        time_limit=time_limit,
    )


_DORA_ARGS = ("x", "W0", "A", "B", "scaling", "m")


def _dora_args(batch, d_in, d_out, seed):
    inp = ref.lora_inputs(batch, d_in, d_out, 3, seed)
    scaling = 2.0
    norm = np.linalg.norm(inp["W0"] + scaling * (inp["B"] @ inp["A"]), axis=1)
    m = norm * (0.5 + ref.rng(seed + 1).random(d_out))  # trained: no longer the norms
    return (inp["x"], inp["W0"], inp["A"], inp["B"], scaling, m)


def _dora(fn, name) -> str:
    passed = False
    for batch, seed in (((3,), 81), ((2, 4), 82)):
        args = _dora_args(batch, 7, 5, seed)
        case = describe(**dict(zip(_DORA_ARGS, args, strict=True)))
        batch_hint = f"\n  {_BATCH_HINT}" if passed else ""
        try:
            y = call_student(fn, name, args, _DORA_ARGS, case)
        except Failure as failure:
            if failure.raised is None or isinstance(failure.raised, NotImplementedError):
                raise
            hint = batch_hint or "\n  " + (_dora_probe(fn, name) or _SHAPE_HINT)
            raise Failure(f"{failure}{hint}", raised=failure.raised) from None
        problem = difference(
            y, ref.dora_forward(*args), what="y", variants=mis.dora(*args), case=case
        )
        if problem:
            raise Failure(f"{problem}\n  {case}{batch_hint}")
        passed = True
    # At DoRA's initialisation (B = 0, m = ||W0||_row) the layer is exactly the pretrained one.
    x, W0, A, B, scaling, _ = args
    start = (x, W0, A, np.zeros_like(B), scaling, np.linalg.norm(W0, axis=1))
    y0 = as_array(
        call_student(fn, name, start, _DORA_ARGS, case), "y", (*x.shape[:-1], W0.shape[0]), case
    )
    gap = float(np.max(np.abs(y0 - x @ W0.T)))
    return (
        f"At DoRA's initialisation (B = 0, m = ||W0||_row) your layer gives x W0^T to within "
        f"{gap:.1e}: it starts as the pretrained layer, as LoRA does."
    )


def _dora_probe(fn, name) -> str | None:
    """Run on a square layer, where norms over the wrong axis or broadcast m still run."""
    args = _dora_args((4,), 6, 6, 83)
    try:
        y = np.asarray(call_student(fn, name, args, _DORA_ARGS, ""), dtype=float)
    except (Failure, TypeError, ValueError):
        return None
    mistake = match_mistake(y, mis.dora(*args))
    return _probe_note(mistake, 6, "output") if mistake else None
