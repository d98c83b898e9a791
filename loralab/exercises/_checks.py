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

    Recognised mistakes: forgot the scaling; alpha instead of alpha / r; scaling applied twice or
    divided by r again; B and A swapped or transposed; W0 not transposed; the update added to x
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


def _forward(fn, name, config) -> str:
    alpha, r = 5.0, 3
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
    alpha, r = 5.0, 3
    inp = ref.lora_inputs((4,), 6, 6, r, 3)
    try:
        y, _ = _forward_call(fn, name, config, inp, alpha, r)
        arr = np.asarray(y, dtype=float)
    except (Failure, TypeError, ValueError):
        return None
    args = (inp["x"], inp["W0"], inp["A"], inp["B"])
    mistake = match_mistake(arr, mis.forward(*args, alpha / r, alpha, r))
    if mistake is None:
        return None
    return (
        "On a square layer (in = out = 6) your function does run, and its output there shows "
        f"a known mistake: {mistake.title}. {mistake.explain}"
    )


# ----------------------------------------------------------------------------------- backward


def check_lora_backward(
    student_fn: Callable, *, strict: bool = False, time_limit: float | None = None
) -> bool:
    """Check ``lora_backward(dy, x, W0, A, B, scaling) -> (dx, dA, dB)``.

    For y = x W0^T + scaling * x A^T B^T and upstream gradient dy (..., out), summed over all
    leading dimensions: dx = dy W0 + scaling * (dy B) A of shape (..., in);
    dA = scaling * B^T dy^T x of shape (r, in); dB = scaling * dy^T (x A^T) of shape (out, r).

    Recognised mistakes: scaling missing in dA, dB or dx; dx without the LoRA path; dA and dB
    swapped or transposed; averaged over the batch; a 4-tuple that also holds dW0 (the values
    may be right, but W0 is frozen, so the check fails and says dW0 was not needed).
    """
    return run_check(
        "lora_backward",
        lambda: _backward(student_fn, _name(student_fn, "lora_backward")),
        strict=strict,
        time_limit=time_limit,
    )


def _backward(fn, name) -> str:
    scaling = 5.0 / 3
    worked_2d = False
    for batch, seed in (((3,), 11), ((2, 4), 12)):
        inp = ref.lora_inputs(batch, 7, 5, 3, seed)
        args = (inp["dy"], inp["x"], inp["W0"], inp["A"], inp["B"], scaling)
        arg_names = ("dy", "x", "W0", "A", "B", "scaling")
        case = describe(dy=args[0], x=args[1], W0=args[2], A=args[3], B=args[4], scaling=scaling)
        try:
            out = call_student(fn, name, args, arg_names, case)
        except Failure as failure:
            if worked_2d and not isinstance(failure.raised, NotImplementedError):
                raise Failure(f"{failure}\n  {_BATCH_HINT}", raised=failure.raised) from None
            raise
        if not isinstance(out, (tuple, list)):
            raise Failure(f"`{name}` should return a tuple (dx, dA, dB), got {type(out).__name__}.")
        note = ""
        if len(out) == 4:
            out, note = _strip_dW0(out, args)
        if len(out) != 3:
            raise Failure(
                f"`{name}` returned {len(out)} values; expected 3: (dx, dA, dB).\n  {case}"
            )
        expected = ref.lora_backward(*args)
        variants = mis.backward(*args)
        problems = [
            difference(got, exp, what=what, variants=var, case=case)
            for got, exp, what, var in zip(out, expected, ("dx", "dA", "dB"), variants, strict=True)
        ]
        problems = [p for p in problems if p]
        if close_pair(out[1:], expected[:0:-1]):
            problems = [p for p in problems if "dx" in p.split(" has ")[0]]
            problems.append(
                "dA and dB have each other's values." + mistake_note(mis.MISTAKES["dA_dB_swapped"])
            )
        if problems:
            batch_hint = f"\n  {_BATCH_HINT}" if worked_2d else ""
            raise Failure("\n  ".join(problems) + note + f"\n  {case}" + batch_hint)
        if note:
            raise Failure(f"Your dx, dA and dB are all correct, but you returned 4 values.{note}")
        worked_2d = True
    return ""


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
    adapted every matrix instead of the targets; frozen base counted as trainable; a total
    without the LoRA parameters.
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
    if mistake is None:
        return None
    return (
        "On a square W0 (in = out = 6) your function does run, and its output there shows "
        f"a known mistake: {mistake.title}. {mistake.explain}"
    )


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
    no bias correction, eps inside the square root, no square root, t + 1, state not carried (Adam).
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


def _trajectory(step_fn, adam, params, grads, trainable) -> list[dict]:
    """The parameters after each step of a known (correct or mistaken) optimizer."""
    state = {n: (np.zeros_like(params[n]), np.zeros_like(params[n])) for n in trainable}
    out = []
    for t, g in enumerate(grads, start=1):
        args, _ = _step_args(adam, params, g, state, trainable, t)
        params, state = step_fn(*args) if adam else (step_fn(*args), state)
        out.append(params)
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
            variants = [(m, traj[t - 1][n]) for m, traj in wrong]
            what = f"params['{n}'] after step {t}"
            compare(new_params[n], expected[t - 1][n], what=what, case=case, variants=variants)
        params = {n: np.asarray(p) for n, p in new_params.items()}
    return ""


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
