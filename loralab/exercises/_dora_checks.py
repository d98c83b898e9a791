"""The check of DoRA's forward (Liu et al., 2024): LoRA's adapted weight split into a
direction and a trained magnitude (exercise 13)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises import _reference as ref
from loralab.exercises import _wrong_answers as mis
from loralab.exercises._feedback import (
    Failure,
    as_array,
    call_student,
    describe,
    difference,
    function_name,
    match_mistake,
    run_check,
)
from loralab.exercises._hints import BATCH_HINT, SHAPE_HINT, is_shape_error, probe_note

# --------------------------------------------------------------------------------------- DoRA


def check_dora_forward(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
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
        lambda: _dora(student_fn, function_name(student_fn, "dora_forward")),
        strict=strict,
        time_limit=time_limit,
        where=where,
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
        batch_hint = f"\n  {BATCH_HINT}" if passed else ""
        try:
            y = call_student(fn, name, args, _DORA_ARGS, case)
        except Failure as failure:
            if not is_shape_error(failure.raised):
                raise
            hint = batch_hint or "\n  " + (_dora_probe(fn, name) or SHAPE_HINT)
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
    return probe_note(mistake, 6, "output") if mistake else None
