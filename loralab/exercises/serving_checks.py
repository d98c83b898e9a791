"""The checks of the serving exercises (tutorial 12): a mixed batch and PEFT's ``cat`` combination.

The student writes::

    mixed_forward(x, W0, As, Bs, scalings, adapter_ids) -> y
    cat_combine(As, Bs, scalings, weights) -> (A, B)

``mixed_forward``: x (N, in), W0 (out, in); K adapters, adapter k with ``As[k]`` (r_k, in),
``Bs[k]`` (out, r_k) and ``scalings[k]`` = alpha_k / r_k (the ranks may differ, as PEFT allows);
``adapter_ids`` (N,) ints, row i through adapter ``adapter_ids[i]`` or, for -1, the base alone.
Then y (N, out) has row i = x_i W0^T + s_k (x_i A_k^T) B_k^T with k = adapter_ids[i]: one base
product for the whole batch and one small product pair per adapter, on that adapter's rows only
(what `loralab.lora.mixed_batch` and PEFT's ``adapter_names`` forward compute).

``cat_combine``: the new adapter PEFT's ``add_weighted_adapter(..., combination_type="cat")``
makes: A (sum r_k, in) and B (out, sum r_k) stacked from the adapters, with scaling 1 (PEFT sets
the new adapter's alpha to its rank), so that B A = sum_k w_k s_k B_k A_k exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises._feedback import (
    Failure,
    as_array,
    call_student,
    compare,
    describe,
    function_name,
    match_mistake,
    mistake_note,
    run_check,
)
from loralab.exercises._mistakes import Mistake

__all__ = ["check_mixed_forward", "check_cat_combine", "mixed_reference", "cat_reference"]

ALL_ADAPTERS = Mistake(
    "mixed_all_adapters",
    "routing",
    "every row went through every adapter",
    "Row i takes only adapter adapter_ids[i]: select its rows with a mask (rows = adapter_ids == k) "
    "and add s_k (x[rows] A_k^T) B_k^T to y[rows] alone.",
)
BASE_WRAPS = Mistake(
    "mixed_base_wraps",
    "routing",
    "the base rows (-1) went through the last adapter",
    "In Python, As[-1] is the last adapter: -1 means 'no adapter', so leave those rows at "
    "x W0^T and loop over k in range(len(As)) instead of indexing with the ids.",
)
FIRST_ONLY = Mistake(
    "mixed_first_only",
    "routing",
    "every adapter row went through the first adapter",
    "Each adapter k has its own A_k, B_k and s_k: use the ones of adapter_ids[i] for row i.",
)
NO_SCALINGS = Mistake(
    "mixed_no_scalings",
    "scaling",
    "you forgot the scalings",
    "Adapter k's update is s_k (x A_k^T) B_k^T: multiply by scalings[k].",
)
ONE_SCALING = Mistake(
    "mixed_one_scaling",
    "scaling",
    "you used the first adapter's scaling for every adapter",
    "Each adapter has its own s_k = alpha_k / r_k (the ranks differ here): use scalings[k].",
)
NO_BASE = Mistake(
    "mixed_no_base",
    "frozen path",
    "the adapter rows lost the base product x W0^T",
    "Every row gets the frozen layer's x W0^T; an adapter adds its update to it.",
)
CAT_NO_SCALINGS = Mistake(
    "cat_no_scalings",
    "scaling",
    "you left out the scalings s_k",
    "The combined adapter has scaling 1, so each adapter's own s_k = alpha_k / r_k must go into "
    "the stacked matrices: stack w_k s_k A_k (PEFT's choice) and B_k.",
)
CAT_NO_WEIGHTS = Mistake(
    "cat_no_weights",
    "weights",
    "you left out the weights w_k",
    "The combination is sum_k w_k s_k B_k A_k: multiply each A_k by w_k s_k.",
)
CAT_WEIGHT_TWICE = Mistake(
    "cat_weight_twice",
    "weights",
    "you put w_k s_k on both A_k and B_k, so the product has (w_k s_k)^2",
    "B A multiplies the factors: put w_k s_k on one of them (PEFT: on A), or sqrt(w_k s_k) on each.",
)
CAT_ADDED = Mistake(
    "cat_added",
    "stacking",
    "you added the A's and the B's (PEFT's 'linear') instead of stacking them",
    "(sum_i B_i)(sum_j A_j) holds cross terms B_i A_j that no adapter learned. Stacking, "
    "A = [A_1; A_2] (np.concatenate(..., axis=0)) and B = [B_1, B_2] (axis=1), gives "
    "B A = B_1 A_1 + B_2 A_2 exactly, at rank r_1 + r_2.",
)

_MIXED_ARGS = ("x", "W0", "As", "Bs", "scalings", "adapter_ids")
_CAT_ARGS = ("As", "Bs", "scalings", "weights")


def _adapters(d_in, d_out, ranks, seed):
    rng = np.random.default_rng(seed)
    As = [rng.standard_normal((r, d_in)) for r in ranks]
    Bs = [rng.standard_normal((d_out, r)) for r in ranks]
    scalings = [float(8 / r) for r in ranks]  # alpha = 8 for every adapter: s differs with r
    return As, Bs, scalings


def mixed_reference(x, W0, As, Bs, scalings, adapter_ids):
    """The float64 statement of the exercise (the loop over adapters, masks on the rows)."""
    y = x @ W0.T
    for k, (A, B, s) in enumerate(zip(As, Bs, scalings, strict=True)):
        rows = adapter_ids == k
        y[rows] += s * ((x[rows] @ A.T) @ B.T)
    return y


def cat_reference(As, Bs, scalings, weights):
    """PEFT's ``cat``: A = [w_k s_k A_k] stacked on axis 0, B = [B_k] on axis 1 (scaling 1)."""
    A = np.concatenate([w * s * Ak for w, s, Ak in zip(weights, scalings, As, strict=True)], axis=0)
    return A, np.concatenate(Bs, axis=1)


def _mixed_mistakes(x, W0, As, Bs, scalings, ids):
    base = x @ W0.T

    def routed(pick, scale, with_base=True):
        y = base.copy() if with_base else np.zeros_like(base)
        for i, k in enumerate(ids):
            if k == -1 and pick(k) == -1:
                if not with_base:
                    y[i] = base[i]
                continue
            j = pick(k)
            y[i] += scale(j) * (x[i] @ As[j].T) @ Bs[j].T
        return y

    everything = base + sum(s * (x @ A.T) @ B.T for A, B, s in zip(As, Bs, scalings))
    return [
        (ALL_ADAPTERS, everything),
        (BASE_WRAPS, routed(lambda k: k if k >= 0 else len(As) - 1, lambda j: scalings[j])),
        (FIRST_ONLY, routed(lambda k: 0 if k >= 0 else -1, lambda j: scalings[0])),
        (NO_SCALINGS, routed(lambda k: k, lambda j: 1.0)),
        (ONE_SCALING, routed(lambda k: k, lambda j: scalings[0])),
        (NO_BASE, routed(lambda k: k, lambda j: scalings[j], with_base=False)),
    ]


def check_mixed_forward(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``mixed_forward(x, W0, As, Bs, scalings, adapter_ids) -> y`` (one batch, K adapters).

    Row i of y (N, out) is x_i W0^T + s_k (x_i A_k^T) B_k^T with k = adapter_ids[i], or x_i W0^T
    when adapter_ids[i] == -1. Run on adapters of ranks 2, 3 and 1 (so the scalings differ),
    a batch that holds base rows, and one adapter that no row asks for.

    Recognised mistakes: every adapter on every row; -1 read as the last adapter; the first
    adapter for every row; the scalings forgotten or the first one used for all; the base product
    left out of the adapter rows.
    """
    return run_check(
        "mixed_forward",
        lambda: _mixed(student_fn, function_name(student_fn, "mixed_forward")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _mixed(fn, name) -> str:
    cases = [
        (7, 5, [2, 3, 1], [0, -1, 2, 1, 1, -1, 0], 121),
        (9, 6, [4, 2, 3, 1], [3, 3, -1, 0, 1, 0, -1, 3, 1, 0], 122),  # adapter 2: no rows
    ]
    for d_in, d_out, ranks, ids, seed in cases:
        rng = np.random.default_rng(seed)
        As, Bs, scalings = _adapters(d_in, d_out, ranks, seed)
        x = rng.standard_normal((len(ids), d_in))
        W0 = rng.standard_normal((d_out, d_in))
        adapter_ids = np.array(ids)
        args = (x, W0, As, Bs, scalings, adapter_ids)
        case = describe(x=x, W0=W0, adapter_ids=adapter_ids) + f", ranks {ranks}"
        y = call_student(fn, name, args, _MIXED_ARGS, case)
        expected = mixed_reference(*args)
        compare(y, expected, what="y", case=case, variants=_mixed_mistakes(*args))
    return (
        "Each row got the base product and its own adapter's update, with adapters of different "
        "ranks in one batch; rows marked -1 got the base alone."
    )


def _cat_mistakes(As, Bs, scalings, weights):
    ws = [w * s for w, s in zip(weights, scalings, strict=True)]

    def product(a_scale, b_scale):
        A = np.concatenate([f * A for f, A in zip(a_scale, As)], axis=0)
        B = np.concatenate([f * B for f, B in zip(b_scale, Bs)], axis=1)
        return B @ A

    ones = [1.0] * len(As)
    variants = [
        (CAT_NO_SCALINGS, product(weights, ones)),
        (CAT_NO_WEIGHTS, product(scalings, ones)),
        (CAT_WEIGHT_TWICE, product(ws, ws)),
    ]
    if len({A.shape for A in As}) == 1:
        variants.append(
            (CAT_ADDED, sum(f * B for f, B in zip(ws, Bs)) @ sum(A for A in As)),
        )
        roots = [np.sqrt(abs(f)) for f in ws]
        variants.append(
            (
                CAT_ADDED,
                sum(f * B for f, B in zip(roots, Bs)) @ sum(f * A for f, A in zip(roots, As)),
            )
        )
    return variants


def check_cat_combine(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``cat_combine(As, Bs, scalings, weights) -> (A, B)`` (PEFT's ``cat`` combination).

    A has shape (sum r_k, in), B (out, sum r_k), and B A = sum_k w_k s_k B_k A_k: the combined
    adapter, whose scaling is 1, is exactly the weighted sum of the updates ΔW_k = s_k B_k A_k.

    Recognised mistakes: the scalings or the weights left out; w_k s_k on both factors; the A's
    and B's added (PEFT's "linear", with cross terms) instead of stacked.
    """
    return run_check(
        "cat_combine",
        lambda: _cat(student_fn, function_name(student_fn, "cat_combine")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _cat(fn, name) -> str:
    cases = [(7, 5, [3, 3], [0.5, 0.5], 131), (6, 8, [2, 4, 1], [0.7, -0.3, 1.5], 132)]
    for d_in, d_out, ranks, weights, seed in cases:
        As, Bs, scalings = _adapters(d_in, d_out, ranks, seed)
        args = (As, Bs, scalings, list(weights))
        case = f"test case: {len(ranks)} adapters of ranks {ranks}, in={d_in}, out={d_out}, weights {weights}"
        out = call_student(fn, name, args, _CAT_ARGS, case)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise Failure(
                f"`{name}` should return a pair (A, B), got {type(out).__name__}.\n  {case}"
            )
        rank = sum(ranks)
        A = as_array(out[0], "A", (rank, d_in), case)
        B = as_array(out[1], "B", (d_out, rank), case)
        for what, arr, shape in (("A", A, (rank, d_in)), ("B", B, (d_out, rank))):
            if arr.shape != shape:
                note = ""
                if A.ndim == B.ndim == 2 and A.shape[0] == B.shape[1] and A.shape[1] == d_in:
                    mistake = match_mistake(B @ A, _cat_mistakes(*args))
                    note = mistake_note(mistake) if mistake else ""
                raise Failure(
                    f"wrong shape: {what} has shape {arr.shape}, expected {shape} (the ranks "
                    f"{ranks} add up to {rank}: stack the A's along axis 0 and the B's along "
                    f"axis 1).{note}\n  {case}"
                )
        target = sum(w * s * (Bk @ Ak) for w, s, Ak, Bk in zip(weights, scalings, As, Bs))
        compare(B @ A, target, what="B @ A", case=case, variants=_cat_mistakes(*args))
    return (
        "B A equals the weighted sum of the updates exactly, at rank sum r_k: PEFT stores it with "
        "alpha = r, so the combined adapter's scaling is 1."
    )
