"""Checks of what happens around the layer in training and deployment: merging ΔW = scaling * B A
into W0 and back, and optimizer steps that move only the trainable parameters (exercises 6-8)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises import _reference as ref
from loralab.exercises import _wrong_answers as mis
from loralab.exercises._feedback import (
    Failure,
    as_array,
    call_student,
    compare,
    describe,
    function_name,
    match_mistake,
    mistake_note,
    plain_repr,
    positional_names,
    run_check,
)
from loralab.exercises._hints import SHAPE_HINT, is_shape_error, probe_note
from loralab.exercises._mistakes import MISTAKES

# ------------------------------------------------------------------------------------ merge


def check_merge(
    student_merge: Callable,
    student_unmerge: Callable | None = None,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
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
        where=where,
    )


_MERGE_ARGS = ("W0", "A", "B", "scaling")
_UNMERGE_ARGS = ("W", "A", "B", "scaling")


def _merge(merge_fn, unmerge_fn) -> str:
    mname = function_name(merge_fn, "merge")
    uname = function_name(unmerge_fn, "unmerge") if unmerge_fn else "unmerge"
    worst = 0.0
    for d_in, d_out, r, scaling, seed in ((7, 5, 3, 5.0 / 3, 31), (4, 6, 2, 2.0, 32)):
        inp = ref.lora_inputs((1,), d_in, d_out, r, seed)
        W0, A, B = inp["W0"], inp["A"], inp["B"]
        case = describe(W0=W0, A=A, B=B, scaling=scaling)
        try:
            W = call_student(merge_fn, mname, (W0, A, B, scaling), _MERGE_ARGS, case)
        except Failure as failure:
            if not is_shape_error(failure.raised):
                raise
            hint = _merge_probe(merge_fn) or SHAPE_HINT
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
            call_student(merge_fn, function_name(merge_fn, "merge"), args, _MERGE_ARGS, ""),
            dtype=float,
        )
    except (Failure, TypeError, ValueError):
        return None
    mistake = match_mistake(arr, mis.merge(*args))
    return probe_note(mistake, 6, "output") if mistake else None


# -------------------------------------------------------------------------------- optimizers


def check_optimizer_step(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
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
        lambda: _optimizer(student_fn, function_name(student_fn, key), key == "adam_step"),
        strict=strict,
        time_limit=time_limit,
        where=where,
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
                + mistake_note(MISTAKES["updated_frozen"])
                + f"\n  {case}"
            )
        for n in sorted(trainable):
            variants = [(m, traj[t - 1][0][n]) for m, traj in wrong]
            what = f"params['{n}'] after step {t}"
            compare(new_params[n], expected[t - 1][0][n], what=what, case=case, variants=variants)
        if adam:
            _compare_state(state, t, trainable, expected, wrong, case)
            extra = sorted(set(state) - set(trainable), key=str)
            if extra:
                raise Failure(
                    f"new_state also holds {extra}: Adam keeps (m, v) only for the parameters "
                    "it trains. For a frozen weight they would be two more arrays of its size, "
                    f"the optimizer memory that LoRA saves.\n  {case}"
                )
        params = {n: np.asarray(p) for n, p in new_params.items()}
    return ""


def _compare_state(state, t, trainable, expected, wrong, case) -> None:
    """Adam's new state must hold the raw moments (m, v) of every trainable name."""
    for n in sorted(trainable):
        pair = state[n]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise Failure(
                f"new_state['{n}'] should be a pair (m, v), got {plain_repr(pair)}.\n  {case}"
            )
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
                f"{sorted(trainable)}, got {plain_repr(new_state)}.\n  {case}"
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
