"""The check of exercise 14: blockwise NF4 quantization and dequantization (QLoRA, Section 3).

The student writes::

    nf4_quantize(W, block_size) -> (codes, absmax)
    nf4_dequantize(codes, absmax, shape, block_size) -> W_hat

with ``W`` float64 whose size is a multiple of ``block_size``, blocks taken from ``W.reshape(-1)``,
``codes`` one integer in [0, 16) per value (``W``'s shape or flat), ``absmax`` of shape (n_blocks,),
and ``NF4_VALUES[codes] * absmax`` (each value's own block) reshaped to ``shape`` as ``W_hat``.
The reference below is the float64 statement of that; `loralab.quant.quantize` is the float32,
bitsandbytes-exact version.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises._feedback import (
    Failure,
    as_array,
    call_student,
    describe,
    function_name,
    got_and_expected,
    low_precision_note,
    mistake_note,
    number,
    run_check,
)
from loralab.exercises._mistakes import Mistake
from loralab.quant import INT4_VALUES, NF4_VALUES

__all__ = ["check_nf4_quantization"]

LEVELS = NF4_VALUES.astype(np.float64)

ONE_ABSMAX = Mistake(
    "nf4_one_absmax",
    "blocks",
    "you used one absmax for the whole tensor",
    "Blockwise means one absmax per block of `block_size` consecutive values of W.reshape(-1): "
    "reshape to (-1, block_size) and take np.abs(...).max(axis=1). One outlier then spoils only "
    "its own block.",
)
NOT_NORMALISED = Mistake(
    "nf4_not_normalised",
    "scaling",
    "you did not divide by absmax before looking for the nearest level",
    "The NF4 levels lie in [-1, 1]; weights do not. Divide each block by its absmax first "
    "(W_block / absmax), then find the nearest level.",
)
FLOOR = Mistake(
    "nf4_floor",
    "rounding",
    "you rounded down (the largest level not above the value) instead of to the nearest level",
    "Take the level at the smallest distance: np.abs(x[..., None] - NF4_VALUES).argmin(axis=-1). "
    "np.searchsorted alone finds a neighbour, not the nearest one.",
)
UNIFORM = Mistake(
    "nf4_uniform",
    "levels",
    "you used evenly spaced (int4) levels instead of the NF4 levels",
    "NF4's 16 levels are normal quantiles, dense near 0 where most weights are: use NF4_VALUES "
    "(from loralab.quant), not np.linspace(-1, 1, 16) or k / 7.",
)
NO_ABSMAX = Mistake(
    "nf4_no_absmax",
    "scaling",
    "you dequantized without multiplying by the absmax",
    "NF4_VALUES[codes] lies in [-1, 1]; multiply each value by its block's absmax to undo the "
    "division: NF4_VALUES[codes].reshape(-1, block_size) * absmax[:, None].",
)
TILED = Mistake(
    "nf4_tiled",
    "blocks",
    "you spread the absmax over the values in the wrong order (np.tile instead of np.repeat)",
    "Value i belongs to block i // block_size: np.repeat(absmax, block_size) gives each block's "
    "absmax to its own values; np.tile cycles through the blocks.",
)


def _nearest(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    return np.abs(x[..., None] - levels).argmin(axis=-1)


def reference_quantize(W: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (W.size,) and absmax (n_blocks,): the nearest NF4 level of each value / its absmax."""
    blocks = W.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    return _nearest(blocks / absmax[:, None], LEVELS).reshape(-1), absmax


def reference_dequantize(codes, absmax, shape, block_size) -> np.ndarray:
    """``NF4_VALUES[codes] * absmax`` block by block, reshaped to ``shape``."""
    values = LEVELS[np.asarray(codes).reshape(-1)].reshape(-1, block_size)
    return (values * absmax[:, None]).reshape(shape)


def _code_variants(W: np.ndarray, block_size: int) -> list[tuple[Mistake, np.ndarray]]:
    blocks = W.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / absmax[:, None]
    below = np.clip(np.searchsorted(LEVELS, scaled, side="right") - 1, 0, 15)
    uniform = np.linspace(-1, 1, 16)
    return [
        (ONE_ABSMAX, _nearest(W / np.abs(W).max(), LEVELS)),
        (NOT_NORMALISED, _nearest(blocks, LEVELS)),
        (FLOOR, below),
        (UNIFORM, _nearest(scaled, uniform)),
        (UNIFORM, np.rint(scaled * 7) + 7),
        (UNIFORM, _nearest(scaled, INT4_VALUES.astype(np.float64))),
    ]


def _inputs(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    # rows of very different scales, so one absmax for everything is visibly wrong
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 0, (shape[0],) + (1,) * (len(shape) - 1))
    return rng.standard_normal(shape) * scales


def check_nf4_quantization(
    student_quantize: Callable,
    student_dequantize: Callable | None = None,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``nf4_quantize(W, block_size)`` and, if given, ``nf4_dequantize(codes, absmax, shape, block_size)``.

    Recognised mistakes: one absmax for the whole tensor; no division by absmax before rounding;
    rounding down instead of to the nearest level; evenly spaced (int4) levels instead of NF4's;
    dequantizing without the absmax; the absmax spread with np.tile instead of np.repeat.
    """
    return run_check(
        "nf4_quantization",
        lambda: _check(student_quantize, student_dequantize),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _codes_message(got: np.ndarray, expected: np.ndarray, W, block_size, case: str) -> str:
    wrong = np.flatnonzero(got != expected)
    i = int(wrong[0])
    msg = (
        f"nf4_quantize's codes are wrong for {wrong.size} of {expected.size} values; the first is "
        f"value {i} (W.reshape(-1)[{i}] = {number(W.reshape(-1)[i])}, block {i // block_size}): "
        f"got code {number(got[i])}, expected {number(expected[i])} "
        f"(level {number(LEVELS[expected[i]], 4)})."
    )
    for mistake, variant in _code_variants(W, block_size):
        if np.array_equal(got, np.asarray(variant).reshape(-1)):
            return msg + mistake_note(mistake)
    return msg


def _check(quantize_fn: Callable, dequantize_fn: Callable | None) -> str:
    qname = function_name(quantize_fn, "nf4_quantize")
    dname = function_name(dequantize_fn, "nf4_dequantize")
    worst = 0.0
    for shape, block_size, seed in (((6, 32), 16, 41), ((3, 4, 16), 64, 42)):
        W = _inputs(seed, shape)
        case = describe(W=W) + f", block_size={block_size}"
        out = call_student(quantize_fn, qname, (W, block_size), ("W", "block_size"), case)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Failure(
                f"{qname} should return a pair (codes, absmax), got {type(out).__name__}.\n  {case}"
            )
        codes_ref, absmax_ref = reference_quantize(W, block_size)
        absmax = as_array(out[1], "absmax", absmax_ref.shape, case)
        if absmax.size == 1:
            raise Failure(
                f"absmax has one value ({float(absmax.reshape(-1)[0]):.6g}); expected one per "
                f"block, shape {absmax_ref.shape}.{mistake_note(ONE_ABSMAX)}\n  {case}"
            )
        if absmax.shape != absmax_ref.shape or not np.allclose(absmax, absmax_ref, rtol=1e-12):
            msg = (
                f"absmax should be the largest |value| of each block, shape {absmax_ref.shape}: "
                f"got shape {absmax.shape}, values {np.round(absmax.reshape(-1)[:4], 6)}..., "
                f"expected {np.round(absmax_ref[:4], 6)}...."
            )
            if np.allclose(absmax, np.abs(W).max(), rtol=1e-12):
                msg += mistake_note(ONE_ABSMAX)
            raise Failure(f"{msg}\n  {case}")
        codes = as_array(out[0], "codes", W.shape, case)
        if codes.size != W.size:
            raise Failure(
                f"codes should hold one code per value ({W.size}), got shape {codes.shape}.\n  {case}"
            )
        codes = codes.reshape(-1)
        if not np.array_equal(codes, codes_ref):
            raise Failure(_codes_message(codes, codes_ref, W, block_size, case) + f"\n  {case}")
        if dequantize_fn is None:
            continue
        args = (codes_ref.copy(), absmax_ref.copy(), W.shape, block_size)
        case = (
            describe(codes=codes_ref, absmax=absmax_ref)
            + f", shape={W.shape}, block_size={block_size}"
        )
        got = call_student(
            dequantize_fn, dname, args, ("codes", "absmax", "shape", "block_size"), case
        )
        expected = reference_dequantize(codes_ref, absmax_ref, W.shape, block_size)
        got = as_array(got, "nf4_dequantize's W_hat", expected.shape, case)
        if got.shape != expected.shape:
            raise Failure(
                f"nf4_dequantize should return shape {expected.shape} (the `shape` argument), "
                f"got {got.shape}.\n  {case}"
            )
        if not np.allclose(got, expected, rtol=1e-12, atol=1e-15):
            values = LEVELS[codes_ref]
            variants = [
                (NO_ABSMAX, values.reshape(W.shape)),
                (TILED, (values * np.tile(absmax_ref, block_size)[: values.size]).reshape(W.shape)),
            ]
            err = np.abs(got - expected)
            at = np.unravel_index(int(np.argmax(err)), expected.shape)
            got_text, expected_text = got_and_expected(got[at], expected[at])
            msg = (
                f"nf4_dequantize's W_hat has wrong values: max abs error {number(err[at], 3)} at "
                f"index {tuple(int(i) for i in at)} (got {got_text}, expected {expected_text})."
            ) + low_precision_note(got, "Your W_hat")
            if got.dtype == np.float32:
                msg += " (`NF4_VALUES` itself is float32: `NF4_VALUES.astype(np.float64)` is not.)"
            for mistake, variant in variants:
                if np.allclose(got, variant, rtol=1e-12, atol=1e-15):
                    msg += mistake_note(mistake)
                    break
            raise Failure(f"{msg}\n  {case}")
        worst = max(
            worst,
            float(np.max(np.abs(got - W) / np.repeat(absmax_ref, block_size).reshape(W.shape))),
        )
    if dequantize_fn is None:
        return "Pass `nf4_dequantize` as the second argument to check it too."
    return (
        f"Round trip: the largest error is {worst:.3f} x its block's absmax, within half of NF4's "
        f"widest gap ({np.diff(LEVELS).max() / 2:.3f})."
    )
