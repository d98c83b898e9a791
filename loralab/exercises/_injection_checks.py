"""The check of injecting LoRA into a model by module name, as PEFT's ``target_modules`` does
(exercise 12)."""

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
    function_name,
    mistake_note,
    plain_repr,
    run_check,
)
from loralab.exercises._mistakes import MISTAKES

# ---------------------------------------------------------------------------------- injection


def check_inject_lora(
    student_fn: Callable,
    *,
    strict: bool = False,
    time_limit: float | None = None,
    where: str | None = None,
) -> bool:
    """Check ``inject_lora_by_name(params, targets, r, rng) -> (new_params, trainable)``.

    ``params`` maps names such as ``"layers.0.attn.q.weight"`` to arrays; a module's name is its
    weight's name without ``.weight``. Every module whose name equals a target or ends with
    ``"." + target`` (PEFT's rule for a list of targets) and has a 2-D weight W0 (out, in) gets
    ``f"{module}.lora_A"`` (r, in), random from ``rng``, and ``f"{module}.lora_B"`` (out, r),
    zero. ``new_params`` holds every original array unchanged plus the new ones (``params``
    itself is not changed); ``trainable`` (a set or list) names exactly the new ones.

    Recognised mistakes: targets matched as substrings, as name endings without the '.' before
    them ('up' selecting 'mlp.gate_up'), or compared with the whole name; base
    weights (or the adapted W0) left trainable; B not zero (and the initialisation mistakes).
    """
    return run_check(
        "inject_lora",
        lambda: _inject(student_fn, function_name(student_fn, "inject_lora_by_name")),
        strict=strict,
        time_limit=time_limit,
        where=where,
    )


def _lora_names(modules) -> list[str]:
    return [f"{m}.lora_{f}" for m in modules for f in ("A", "B")]


def _inject(fn, name) -> str:
    shapes = ref.injection_model()
    # "attn.v" is a target with a dot; "up" must not select "mlp.gate_up", nor "o" "mlp.down".
    for targets, r, seed in ((["q", "attn.v"], 2, 71), (["o", "up"], 3, 72)):
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
        expected = set(_lora_names(modules))
        if set(added) != expected:
            wrong = mis.injected_modules(shapes, targets)
            mistake = next((m for m, mods in wrong if sorted(mods) == got_modules), None)
            raise Failure(
                f"LoRA was added to {got_modules or 'no module'}; expected {modules}."
                + (mistake_note(mistake) if mistake else "")
                + f"\n  {case}"
            )
        for module in modules:
            _check_pair(new_params, module, shapes[f"{module}.weight"], r, case)
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
            f"trainable should be a set (or list) of names, got {plain_repr(trainable)}.\n  {case}"
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
    if mistake is MISTAKES["init_both_random"] or mistake is MISTAKES["init_roles_swapped"]:
        mistake = MISTAKES["inject_B_not_zero"]
    if mistake is not None:
        raise Failure(
            f"{module}: A and B are not a LoRA start." + mistake_note(mistake) + f"\n  {case}"
        )
