"""The checks of the scale-out exercises (tutorial 13): a ring all-reduce and its bytes.

The student writes::

    ring_allreduce(grads, send) -> list of P arrays
    allreduce_bytes(layer_shapes, r, P, bytes_per_value) -> (full, lora)

``ring_allreduce``: ``grads`` holds P gradients (one per worker), each of shape (n,). Worker i
may talk only to its neighbour (i + 1) % P, through ``send(src, dst, values)``, which returns
what arrives (a copy). The ring all-reduce (Patarasuk and Yuan, 2009; what NCCL and gloo run):
split every gradient into P chunks (``np.array_split``); P - 1 steps of reduce-scatter, in which
each worker passes one chunk to its neighbour, who adds it to its own, until worker i holds the
whole sum of one chunk; then P - 1 steps of all-gather, in which the summed chunks travel once
around the ring. Every worker ends with the sum of all P gradients, and each has sent
2 (P - 1) / P of a gradient, whatever P is.

``allreduce_bytes``: the bytes each worker sends per step in that ring all-reduce, for full
fine-tuning (every weight: sum of out * in over ``layer_shapes``, each (out, in)) and for LoRA
of rank r on the same layers (r (out + in) each): 2 (P - 1) / P x numbers x bytes_per_value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises._feedback import (
    Failure,
    as_array,
    call_student,
    compare,
    function_name,
    mistake_note,
    run_check,
)
from loralab.exercises._mistakes import Mistake

__all__ = ["check_ring_allreduce", "check_allreduce_bytes", "ring_reference", "bytes_reference"]

NOT_SENT = Mistake(
    "ring_not_sent",
    "communication",
    "no values went through `send`",
    "On a real cluster worker i cannot read worker j's memory: every value that moves between "
    "workers must go through send(src, dst, values).",
)
WHOLE_VECTORS = Mistake(
    "ring_whole_vectors",
    "communication",
    "you passed whole gradients around the ring",
    "That sends (P - 1) n numbers per worker, growing with P. Split each gradient into P chunks "
    "(np.array_split) and pass one chunk per step: 2 (P - 1) / P of a gradient in all.",
)
NO_ALLGATHER = Mistake(
    "ring_no_allgather",
    "algorithm",
    "you stopped after the reduce-scatter",
    "After P - 1 reduce-scatter steps each worker holds the full sum of one chunk only. P - 1 "
    "more steps pass the summed chunks around the ring (all-gather) so that every worker has "
    "every summed chunk.",
)
BYTES_NO_TWO = Mistake(
    "bytes_no_two",
    "counting",
    "you counted only one of the two phases",
    "A ring all-reduce is a reduce-scatter and an all-gather, each (P - 1) / P of the numbers: "
    "2 (P - 1) / P in all.",
)
BYTES_P_NOT_P_MINUS_1 = Mistake(
    "bytes_p_not_p_minus_1",
    "counting",
    "you used P steps per phase instead of P - 1",
    "Each phase takes P - 1 steps of one chunk (1 / P of the numbers): a worker never sends "
    "the chunk it ends up owning.",
)
BYTES_NO_OVER_P = Mistake(
    "bytes_no_over_p",
    "counting",
    "you sent whole gradients in each step (no division by P)",
    "Each step sends one chunk, 1 / P of the numbers: 2 (P - 1) / P x numbers per worker.",
)
BYTES_LORA_DK = Mistake(
    "bytes_lora_dk",
    "counting",
    "you counted LoRA's numbers as r x out x in",
    "LoRA trains A (r, in) and B (out, r): r (out + in) numbers per layer, and only those are "
    "all-reduced.",
)
BYTES_NO_BYTES = Mistake(
    "bytes_no_bytes",
    "units",
    "you returned numbers, not bytes",
    "Multiply the count of numbers by bytes_per_value (4 for float32, 2 for bf16).",
)

_RING_ARGS = ("grads", "send")
_BYTES_ARGS = ("layer_shapes", "r", "P", "bytes_per_value")


class _Ring:
    """The simulated network: counts what each worker sends and refuses non-neighbours."""

    def __init__(self, P: int):
        self.P = P
        self.sent = np.zeros(P, dtype=np.int64)

    def send(self, src, dst, values):
        P = self.P
        if not (isinstance(src, (int, np.integer)) and isinstance(dst, (int, np.integer))):
            raise TypeError(
                f"send(src, dst, values): src and dst are worker numbers, got {src!r}, {dst!r}"
            )
        if not 0 <= src < P:
            raise ValueError(f"send: src={src} is not a worker (0 to {P - 1})")
        if dst != (src + 1) % P:
            raise ValueError(
                f"send: worker {src} may send only to its ring neighbour {(src + 1) % P}, "
                f"not to {dst}"
            )
        arr = np.array(values, dtype=np.float64, copy=True)
        self.sent[src] += arr.size
        return arr


def ring_reference(grads, send):
    """The ring all-reduce over ``send``: P - 1 reduce-scatter steps, then P - 1 all-gather steps.

    Worker i owns the summed chunk (i + 1) % P after the reduce-scatter; in each step every worker
    sends one chunk to its neighbour (all sends of a step before any is applied).
    """
    P = len(grads)
    chunks = [np.array_split(np.array(g, dtype=np.float64), P) for g in grads]
    for step in range(P - 1):
        sends = [(i, (i - step) % P) for i in range(P)]
        arrived = [send(i, (i + 1) % P, chunks[i][c]) for i, c in sends]
        for (i, c), values in zip(sends, arrived, strict=True):
            chunks[(i + 1) % P][c] = chunks[(i + 1) % P][c] + values
    for step in range(P - 1):
        sends = [(i, (i + 1 - step) % P) for i in range(P)]
        arrived = [send(i, (i + 1) % P, chunks[i][c]) for i, c in sends]
        for (i, c), values in zip(sends, arrived, strict=True):
            chunks[(i + 1) % P][c] = values
    return [np.concatenate(c) for c in chunks]


def check_ring_allreduce(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``ring_allreduce(grads, send) -> list of P arrays`` (the ring all-reduce).

    ``grads`` is a list of P float64 arrays of shape (n,); every returned array must equal their
    sum, every value must move through ``send(src, dst, values)`` to the neighbour
    dst = (src + 1) % P, and the workers together must send exactly 2 (P - 1) n numbers
    (2 (P - 1) / P of a gradient each). Run with n a multiple of P and not, and with P = 1.

    Recognised mistakes: nothing sent through ``send``; whole gradients passed around; the
    all-gather phase missing.
    """
    return run_check(
        "ring_allreduce",
        lambda: _ring(student_fn, function_name(student_fn, "ring_allreduce")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _ring(fn, name) -> str:
    for P, n, seed in ((4, 12, 141), (3, 10, 142), (5, 7, 143), (1, 5, 144)):
        rng = np.random.default_rng(seed)
        grads = [rng.standard_normal(n) for _ in range(P)]
        ring = _Ring(P)
        case = f"test case: P={P} workers, gradients of shape ({n},)"

        def send(src, dst, values, ring=ring):  # a function: call_student compares arguments
            return ring.send(src, dst, values)

        out = call_student(fn, name, (grads, send), _RING_ARGS, case)
        if not isinstance(out, (list, tuple)) or len(out) != P:
            raise Failure(
                f"`{name}` should return a list of {P} arrays (one per worker), got "
                f"{type(out).__name__}{'' if not hasattr(out, '__len__') else f' of length {len(out)}'}."
                f"\n  {case}"
            )
        total = np.sum(grads, axis=0)
        if P > 1 and ring.sent.sum() == 0:
            raise Failure(f"{name}: {NOT_SENT.title}.{mistake_note(NOT_SENT)}\n  {case}")
        results = [as_array(o, f"the result of worker {i}", (n,), case) for i, o in enumerate(out)]
        chunks = np.array_split(np.arange(n), P)
        for i, got in enumerate(results):
            if got.shape == total.shape and not np.allclose(got, total, rtol=1e-10, atol=1e-12):
                right = [np.allclose(got[c], total[c]) for c in chunks]
                if sum(right) == 1:
                    raise Failure(
                        f"worker {i} holds the sum in one chunk only.{mistake_note(NO_ALLGATHER)}"
                        f"\n  {case}"
                    )
            compare(got, total, what=f"the result of worker {i}", case=case)
        want = 2 * (P - 1) * n
        if ring.sent.sum() != want:
            note = mistake_note(WHOLE_VECTORS) if ring.sent.sum() >= P * (P - 1) * n else ""
            raise Failure(
                f"Every worker has the right sum, but the workers sent {int(ring.sent.sum())} "
                f"numbers in all; a ring all-reduce sends 2 (P - 1) n = {want}.{note}\n  {case}"
            )
    return (
        "Every worker ended with the sum, talking only to its neighbour, and each sent "
        "2 (P - 1) / P of a gradient: the cost per worker stays flat as P grows."
    )


def bytes_reference(layer_shapes, r, P, bytes_per_value):
    """Bytes each worker sends per step: 2 (P - 1) / P x numbers x bytes, full and LoRA."""
    full = sum(out * inp for out, inp in layer_shapes)
    lora = sum(r * (out + inp) for out, inp in layer_shapes)
    factor = 2 * (P - 1) / P * bytes_per_value
    return full * factor, lora * factor


def _bytes_mistakes(layer_shapes, r, P, b):
    full = sum(o * i for o, i in layer_shapes)
    lora = sum(r * (o + i) for o, i in layer_shapes)
    return [
        (BYTES_NO_TWO, ((P - 1) / P * b * full, (P - 1) / P * b * lora)),
        (BYTES_P_NOT_P_MINUS_1, (2 * b * full, 2 * b * lora)),
        (BYTES_NO_OVER_P, (2 * (P - 1) * b * full, 2 * (P - 1) * b * lora)),
        (BYTES_LORA_DK, (2 * (P - 1) / P * b * full, 2 * (P - 1) / P * b * r * full)),
        (BYTES_NO_BYTES, (2 * (P - 1) / P * full, 2 * (P - 1) / P * lora)),
    ]


def check_allreduce_bytes(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``allreduce_bytes(layer_shapes, r, P, bytes_per_value) -> (full, lora)``.

    Both are the bytes one worker sends per training step in a ring all-reduce of the trainable
    gradients, 2 (P - 1) / P x numbers x bytes_per_value, with numbers = sum of out * in (full
    fine-tuning) or sum of r (out + in) (LoRA) over ``layer_shapes`` ((out, in) pairs).

    Recognised mistakes: one phase only; P for P - 1; no division by P; LoRA counted as r out in;
    numbers instead of bytes.
    """
    return run_check(
        "allreduce_bytes",
        lambda: _bytes(student_fn, function_name(student_fn, "allreduce_bytes")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _bytes(fn, name) -> str:
    cases = [
        ([(768, 768), (768, 768), (3072, 768)], 8, 4, 4),
        ([(4096, 4096), (1024, 4096)], 16, 8, 2),
    ]
    for shapes, r, P, b in cases:
        case = f"test case: layer_shapes={shapes}, r={r}, P={P}, bytes_per_value={b}"
        out = call_student(fn, name, (shapes, r, P, b), _BYTES_ARGS, case)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise Failure(
                f"`{name}` should return a pair (full, lora), got {type(out).__name__}.\n  {case}"
            )
        got = tuple(float(as_array(v, w, (), case)) for v, w in zip(out, ("full", "lora")))
        want = bytes_reference(shapes, r, P, b)
        if not np.allclose(got, want, rtol=1e-9):
            mistake = next(
                (m for m, v in _bytes_mistakes(shapes, r, P, b) if np.allclose(got, v, rtol=1e-9)),
                None,
            )
            note = mistake_note(mistake) if mistake else ""
            raise Failure(
                f"(full, lora) = ({got[0]:.6g}, {got[1]:.6g}) bytes, expected "
                f"({want[0]:.6g}, {want[1]:.6g}).{note}\n  {case}"
            )
    full, lora = bytes_reference(*cases[0][:2], *cases[0][2:])
    return (
        f"On the first case LoRA all-reduces {full / lora:.0f}x fewer bytes per step than full "
        "fine-tuning: the ratio is the trainable fraction, whatever P is."
    )
