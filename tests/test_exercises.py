"""The checks pass the reference solutions and catch every planted mistake by name."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loralab import exercises as ex
from loralab.exercises import EXERCISES, MISTAKES, _layer_checks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "tutorials" / "exercises"


def _load_solutions():
    spec = importlib.util.spec_from_file_location(
        "loralab_solutions", ROOT / "instructor" / "solutions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _load_solutions()
M = MISTAKES


def _args(key):
    """The student functions each exercise's check is called with."""
    return [getattr(S, name) for name in EXERCISES[key].functions]


# ------------------------------------------------------------------------ planted mistakes


def _fwd(update):
    return lambda x, W0, A, B, scaling: x @ W0.T + update(x, A, B, scaling)


def _lora(x, A, B):
    return (x @ A.T) @ B.T


def _bwd(change):
    def lora_backward(dy, x, W0, A, B, scaling):
        return change(
            *S.lora_backward(dy, x, W0, A, B, scaling), dy=dy, x=x, W0=W0, A=A, B=B, s=scaling
        )

    return lora_backward


def _dW0(dy, x):
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _rows(x):
    return int(np.prod(x.shape[:-1]))


def _svd(W):
    return np.linalg.svd(W, full_matrices=False)


def _sgd(*, frozen=False, sign=-1, use_lr=True):
    def sgd_step(params, grads, trainable, lr):
        rate = lr if use_lr else 1.0
        return {
            n: p + sign * rate * grads[n] if (frozen or n in trainable) else p
            for n, p in params.items()
        }

    return sgd_step


def _adam(
    *,
    frozen=False,
    sign=-1,
    correct=True,
    eps_in=False,
    root=True,
    shift=0,
    carry=True,
    store_hat=False,
):
    def adam_step(params, grads, state, trainable, lr, betas, eps, t):
        b1, b2 = betas
        out, new_state = dict(params), {}
        for n in params if frozen else trainable:
            m, v = state[n] if (carry and n in state) else (0.0, 0.0)
            m = b1 * m + (1 - b1) * grads[n]
            v = b2 * v + (1 - b2) * grads[n] ** 2
            tt = t + shift
            mh, vh = (m / (1 - b1**tt), v / (1 - b2**tt)) if correct else (m, v)
            denom = np.sqrt(vh + eps) if eps_in else (np.sqrt(vh) if root else vh) + eps
            out[n] = params[n] + sign * lr * mh / denom
            new_state[n] = (mh, vh) if store_hat else (m, v)
        return out, new_state

    return adam_step


def _drop(change):
    """A dropout backward built from the right pieces, then changed by ``change``."""

    def lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p):
        dx, dA, dB = S.lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p)
        return change(dx, dA, dB, dy=dy, x=x, W0=W0, A=A, B=B, s=scaling, mask=keep / (1 - p))

    return lora_dropout_backward


def _fresh_mask():
    seeds = itertools.count()

    def lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p):
        keep = (np.random.default_rng(next(seeds)).random(x.shape) >= p).astype(float)
        return S.lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p)

    return lora_dropout_backward


def _peft_match(module, targets):
    return any(module == t or module.endswith("." + t) for t in targets)


def _inject(*, match=None, trainable=None, B_random=False):
    """`inject_lora_by_name` with a different module matcher, trainable set or B."""

    def inject_lora_by_name(params, targets, r, rng):
        new_params, lora = dict(params), set()
        for name, W0 in params.items():
            module = name.removesuffix(".weight")
            chosen = (match or _peft_match)(module, targets)
            if name.endswith(".weight") and W0.ndim == 2 and chosen:
                out_f, in_f = W0.shape
                new_params[module + ".lora_A"] = rng.normal(size=(r, in_f))
                B = rng.normal(size=(out_f, r)) if B_random else np.zeros((out_f, r))
                new_params[module + ".lora_B"] = B
                lora |= {module + ".lora_A", module + ".lora_B"}
        return new_params, (trainable(params, lora) if trainable else lora)

    return inject_lora_by_name


def _dora(weight):
    """DoRA's forward with the weight built by ``weight(W0, V, m)`` (right: m / ||V||_row rows)."""
    return lambda x, W0, A, B, scaling, m: x @ weight(W0, W0 + scaling * (B @ A), m).T


_FIXED = np.random.default_rng(5)  # a generator of its own, ignoring the one passed in


def _unmerge_ok(W, A, B, scaling):
    return S.unmerge(W, A, B, scaling)


def _merge_in_place(W0, A, B, scaling):
    W0 += scaling * (B @ A)
    return W0


# (check, student functions, phrase the message must contain)
PLANTED = {
    "forgot_scaling": (ex.check_lora_forward, [_fwd(lambda x, A, B, s: _lora(x, A, B))]),
    "alpha_not_alpha_over_r": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, alpha, r: x @ W0.T + alpha * _lora(x, A, B)],
    ),
    "scaling_twice": (ex.check_lora_forward, [_fwd(lambda x, A, B, s: s * s * _lora(x, A, B))]),
    "scaling_over_r": (
        ex.check_lora_forward,
        [_fwd(lambda x, A, B, s: s / A.shape[0] * _lora(x, A, B))],
    ),
    "ba_swapped": (ex.check_lora_forward, [_fwd(lambda x, A, B, s: s * (x @ B @ A))]),
    "w0_not_transposed": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, scaling: x @ W0 + scaling * _lora(x, A, B)],
    ),
    "update_on_x": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, scaling: x + scaling * _lora(x, A, B)],
    ),
    "dA_missing_scaling": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, s, **_: (dx, dA / s, dB))],
    ),
    "dB_missing_scaling": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, s, **_: (dx, dA, dB / s))],
    ),
    "dx_missing_scaling": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, dy, W0, A, B, **_: (dy @ W0 + (dy @ B) @ A, dA, dB))],
    ),
    "dx_without_lora": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, dy, W0, **_: (dy @ W0, dA, dB))],
    ),
    "dA_dB_swapped": (ex.check_lora_backward, [_bwd(lambda dx, dA, dB, **_: (dx, dB, dA))]),
    "dA_transposed": (ex.check_lora_backward, [_bwd(lambda dx, dA, dB, **_: (dx, dA.T, dB))]),
    "dB_transposed": (ex.check_lora_backward, [_bwd(lambda dx, dA, dB, **_: (dx, dA, dB.T))]),
    "batch_mean": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, x, **_: (dx, dA / _rows(x), dB / _rows(x)))],
    ),
    "computed_dW0": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, dy, x, **_: (dx, dA, dB, _dW0(dy, x)))],
    ),
    "count_full_matrix": (ex.check_param_count, [lambda d, k, r: d * k]),
    "count_only_one_factor": (ex.check_param_count, [lambda d, k, r: r * d]),
    "count_product": (ex.check_param_count, [lambda d, k, r: r * d * k]),
    "count_with_w0": (ex.check_param_count, [lambda d, k, r: d * k + r * (d + k)]),
    "model_all_matrices": (
        ex.check_param_count,
        [
            S.lora_param_count,
            lambda shapes, r, targets: S.lora_model_param_count(
                shapes, r, [n for n, s in shapes.items() if len(s) == 2]
            ),
        ],
    ),
    "model_trainable_is_total": (
        ex.check_param_count,
        [
            S.lora_param_count,
            lambda shapes, r, targets: (S.lora_model_param_count(shapes, r, targets)[1],) * 2,
        ],
    ),
    "model_total_without_lora": (
        ex.check_param_count,
        [
            S.lora_param_count,
            lambda shapes, r, targets: (
                S.lora_model_param_count(shapes, r, targets)[0],
                sum(int(np.prod(s)) for s in shapes.values()),
            ),
        ],
    ),
    "svd_smallest": (
        ex.check_low_rank_approx,
        [lambda W, r: (lambda U, S_, Vh: (U[:, -r:] * S_[-r:]) @ Vh[-r:])(*_svd(W))],
    ),
    "svd_no_sigma": (
        ex.check_low_rank_approx,
        [lambda W, r: (lambda U, S_, Vh: U[:, :r] @ Vh[:r])(*_svd(W))],
    ),
    "svd_vh_columns": (
        ex.check_low_rank_approx,
        [lambda W, r: (lambda U, S_, Vh: (U[:, :r] * S_[:r]) @ Vh[:, :r].T)(*np.linalg.svd(W))],
    ),
    "svd_off_by_one": (ex.check_low_rank_approx, [lambda W, r: S.low_rank_approx(W, r + 1)]),
    "merge_transposed": (
        ex.check_merge,
        [lambda W0, A, B, scaling: W0 + scaling * (A.T @ B.T), _unmerge_ok],
    ),
    "merge_sign": (ex.check_merge, [S.merge, lambda W, A, B, scaling: W + scaling * (B @ A)]),
    "updated_frozen": (ex.check_optimizer_step, [_adam(frozen=True)]),
    "gradient_ascent": (ex.check_optimizer_step, [_sgd(sign=1)]),
    "forgot_lr": (ex.check_optimizer_step, [_sgd(use_lr=False)]),
    "adam_no_bias_correction": (ex.check_optimizer_step, [_adam(correct=False)]),
    "adam_eps_inside_sqrt": (ex.check_optimizer_step, [_adam(eps_in=True)]),
    "adam_no_sqrt": (ex.check_optimizer_step, [_adam(root=False)]),
    "adam_t_plus_one": (ex.check_optimizer_step, [_adam(shift=1)]),
    "adam_state_ignored": (ex.check_optimizer_step, [_adam(carry=False)]),
    "alpha_floor_div_r": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, alpha, r: x @ W0.T + (alpha // r) * _lora(x, A, B)],
    ),
    "r_over_alpha": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, alpha, r: x @ W0.T + (r / alpha) * _lora(x, A, B)],
    ),
    "alpha_over_sqrt_r": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, alpha, r: x @ W0.T + alpha / np.sqrt(r) * _lora(x, A, B)],
    ),
    "scaling_on_base": (
        ex.check_lora_forward,
        [lambda x, W0, A, B, scaling: scaling * (x @ W0.T + _lora(x, A, B))],
    ),
    "dx_without_frozen_path": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, dy, A, B, s, **_: (s * (dy @ B) @ A, dA, dB))],
    ),
    "dx_W0_not_transposed": (
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, dy, W0, A, B, s, **_: (dy @ W0.T + s * (dy @ B) @ A, dA, dB))],
    ),
    "count_2rd": (ex.check_param_count, [lambda d, k, r: 2 * r * d]),
    "model_biases_trainable": (
        ex.check_param_count,
        [
            S.lora_param_count,
            lambda shapes, r, targets: (
                S.lora_model_param_count(shapes, r, targets)[0]
                + sum(s[0] for s in shapes.values() if len(s) == 1),
                S.lora_model_param_count(shapes, r, targets)[1],
            ),
        ],
    ),
    "adam_state_bias_corrected": (ex.check_optimizer_step, [_adam(store_hat=True)]),
    "init_both_zero": (
        ex.check_lora_init,
        [lambda i, o, r, rng: (np.zeros((r, i)), np.zeros((o, r)))],
    ),
    "init_both_random": (
        ex.check_lora_init,
        [lambda i, o, r, rng: (rng.normal(size=(r, i)), rng.normal(size=(o, r)))],
    ),
    "init_roles_swapped": (
        ex.check_lora_init,
        [lambda i, o, r, rng: (np.zeros((r, i)), rng.normal(size=(o, r)))],
    ),
    "init_A_low_rank": (
        ex.check_lora_init,
        [lambda i, o, r, rng: (np.ones((r, i)), np.zeros((o, r)))],
    ),
    "init_global_rng": (
        ex.check_lora_init,
        [lambda i, o, r, rng: (_FIXED.normal(size=(r, i)), np.zeros((o, r)))],
    ),
    "dropout_dx_unmasked": (
        ex.check_lora_dropout_backward,
        [_drop(lambda dx, dA, dB, dy, W0, A, B, s, **_: (dy @ W0 + s * (dy @ B) @ A, dA, dB))],
    ),
    "dropout_on_frozen_path": (
        ex.check_lora_dropout_backward,
        [
            _drop(
                lambda dx, dA, dB, dy, W0, A, B, s, mask, **_: (
                    (dy @ W0 + s * (dy @ B) @ A) * mask,
                    dA,
                    dB,
                )
            )
        ],
    ),
    "dropout_no_rescale": (
        ex.check_lora_dropout_backward,
        [lambda dy, x, W0, A, B, s, keep, p: S.lora_dropout_backward(dy, x, W0, A, B, s, keep, 0)],
    ),
    "dropout_dA_dB_unmasked": (
        ex.check_lora_dropout_backward,
        [
            _drop(
                lambda dx, dA, dB, dy, x, W0, A, B, s, **_: (
                    dx,
                    *S.lora_backward(dy, x, W0, A, B, s)[1:],
                )
            )
        ],
    ),
    "dropout_new_mask": (ex.check_lora_dropout_backward, [_fresh_mask()]),
    "inject_substring": (
        ex.check_inject_lora,
        [_inject(match=lambda m, targets: any(t in m for t in targets))],
    ),
    "inject_endswith_no_dot": (
        ex.check_inject_lora,
        [_inject(match=lambda m, targets: any(m.endswith(t) for t in targets))],
    ),
    "inject_exact_name": (ex.check_inject_lora, [_inject(match=lambda m, targets: m in targets)]),
    "inject_not_frozen": (
        ex.check_inject_lora,
        [_inject(trainable=lambda params, lora: set(params) | lora)],
    ),
    "inject_target_trainable": (
        ex.check_inject_lora,
        [
            _inject(
                trainable=lambda params, lora: (
                    lora | {n.rsplit(".", 1)[0] + ".weight" for n in lora}
                )
            )
        ],
    ),
    "inject_B_not_zero": (ex.check_inject_lora, [_inject(B_random=True)]),
    "dora_norm_axis": (
        ex.check_dora_forward,
        [_dora(lambda W0, V, m: (m / np.linalg.norm(V, axis=0))[:, None] * V)],
    ),
    "dora_norm_of_W0": (
        ex.check_dora_forward,
        [_dora(lambda W0, V, m: (m / np.linalg.norm(W0, axis=1))[:, None] * V)],
    ),
    "dora_not_normalised": (ex.check_dora_forward, [_dora(lambda W0, V, m: m[:, None] * V)]),
    "dora_frobenius": (
        ex.check_dora_forward,
        [_dora(lambda W0, V, m: m[:, None] * V / np.linalg.norm(V))],
    ),
    "dora_magnitude_on_update_only": (
        ex.check_dora_forward,
        [_dora(lambda W0, V, m: W0 + (m / np.linalg.norm(V, axis=1))[:, None] * (V - W0))],
    ),
    "dora_broadcast": (
        ex.check_dora_forward,
        [_dora(lambda W0, V, m: m * V / np.linalg.norm(V, axis=1))],
    ),
    "phi_not_squared": (
        ex.check_subspace_similarity,
        [lambda U1, U2, i, j: np.linalg.norm(U1[:, :i].T @ U2[:, :j]) / min(i, j)],
    ),
    "phi_wrong_normaliser": (
        ex.check_subspace_similarity,
        [lambda U1, U2, i, j: np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / max(i, j)],
    ),
    "phi_not_sliced": (
        ex.check_subspace_similarity,
        [lambda U1, U2, i, j: np.linalg.norm(U1.T @ U2) ** 2 / min(i, j)],
    ),
    "phi_rows": (
        ex.check_subspace_similarity,
        [lambda U1, U2, i, j: np.linalg.norm(U1[:i].T @ U2[:j]) ** 2 / min(i, j)],
    ),
}

# More than one planted answer for some mistakes: other orders, other functions, other optimizers.
EXTRA = [
    (
        "computed_dW0",
        ex.check_lora_backward,
        [_bwd(lambda dx, dA, dB, dy, x, **_: (dx, _dW0(dy, x), dA, dB))],
    ),
    (
        "alpha_not_alpha_over_r",
        ex.check_lora_forward,
        [_fwd(lambda x, A, B, s: s * A.shape[0] * _lora(x, A, B))],
    ),
    ("forgot_scaling", ex.check_merge, [lambda W0, A, B, scaling: W0 + B @ A, _unmerge_ok]),
    ("forgot_scaling", ex.check_merge, [S.merge, lambda W, A, B, scaling: W - B @ A]),
    ("merge_sign", ex.check_merge, [lambda W0, A, B, scaling: W0 - scaling * (B @ A)]),
    ("updated_frozen", ex.check_optimizer_step, [_sgd(frozen=True)]),
    ("gradient_ascent", ex.check_optimizer_step, [_adam(sign=1)]),
    ("svd_off_by_one", ex.check_low_rank_approx, [lambda W, r: S.low_rank_approx(W, r - 1)]),
    (
        "phi_wrong_normaliser",
        ex.check_subspace_similarity,
        [lambda U1, U2, i, j: np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / (i * j)],
    ),
    ("count_only_one_factor", ex.check_param_count, [lambda d, k, r: r * k]),
    ("count_2rd", ex.check_param_count, [lambda d, k, r: 2 * r * k]),
    (
        "init_global_rng",
        ex.check_lora_init,
        [lambda i, o, r, rng: (np.random.default_rng(0).normal(size=(r, i)), np.zeros((o, r)))],
    ),
    (
        "init_both_zero",
        ex.check_inject_lora,
        [
            lambda params, targets, r, rng: (
                lambda new, lora: (
                    {**new, **{n: np.zeros_like(new[n]) for n in lora}},
                    lora,
                )
            )(*S.inject_lora_by_name(params, targets, r, rng))
        ],
    ),
    (
        "forgot_scaling",
        ex.check_dora_forward,
        [lambda x, W0, A, B, scaling, m: S.dora_forward(x, W0, A, B, 1.0, m)],
    ),
    (
        "dx_without_frozen_path",
        ex.check_lora_dropout_backward,
        [_drop(lambda dx, dA, dB, dy, W0, **_: (dx - dy @ W0, dA, dB))],
    ),
]

CASES = [(key, check, fns) for key, (check, fns) in PLANTED.items()] + EXTRA


def test_every_known_mistake_is_planted():
    assert set(PLANTED) == set(MISTAKES)


@pytest.mark.parametrize(
    ("key", "check", "fns"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_planted_mistake_is_caught_by_name(key, check, fns, capsys):
    assert check(*fns) is False
    printed = capsys.readouterr().out
    assert printed.startswith("Not yet")
    assert f"known mistake ({MISTAKES[key].kind}): {MISTAKES[key].title}" in printed
    with pytest.raises(AssertionError) as info:
        check(*fns, strict=True)
    assert MISTAKES[key].title in str(info.value)
    assert str(info.value) == capsys.readouterr().out.strip()


# ----------------------------------------------------------------------------- right answers


@pytest.mark.parametrize("key", list(EXERCISES))
def test_reference_solution_passes(key, capsys):
    check = getattr(ex, EXERCISES[key].check)
    assert check(*_args(key), strict=True) is True
    printed = capsys.readouterr().out
    assert printed.startswith(f"Correct: {EXERCISES[key].title}")
    assert "Next:" in printed


def test_next_exercise_is_named_in_order(capsys):
    ex.check_lora_backward(S.lora_backward)
    assert (
        "Next: exercise 4, `lora_param_count, lora_model_param_count`, in the exercise notebook "
        "exercises/04_counting_and_svd.ipynb." in (capsys.readouterr().out)
    )


@pytest.mark.parametrize(
    ("where", "said"),
    [
        # without `where` the file is always named: the check cannot know it is in that notebook
        (
            None,
            "Next: exercise 2, `lora_forward_from_config`, in the exercise notebook "
            "exercises/01_lora_forward.ipynb.",
        ),
        (
            "01_lora_forward.ipynb",
            "Next: exercise 2, `lora_forward_from_config`, further down this notebook.",
        ),
        ("some/folder/01_lora_forward.ipynb", "further down this notebook."),
        # a tutorial (no exercise in it): carry on there, the exercise is for later
        (
            "05b_build_lora_yourself.ipynb",
            "Next: carry on with this notebook. For practice "
            "later: exercise 2, `lora_forward_from_config`, in the exercise notebook "
            "exercises/01_lora_forward.ipynb.",
        ),
        ("03_lora_backward.ipynb", "in the exercise notebook exercises/01_lora_forward.ipynb."),
    ],
)
def test_the_next_step_knows_where_the_check_was_called_from(where, said, capsys):
    assert ex.check_lora_forward(S.lora_forward, where=where)
    out = capsys.readouterr().out
    assert said in out
    if where is None or "01_" not in where:
        assert "this notebook" not in out or where.startswith("05b")


def test_every_check_takes_where_and_refuses_a_non_string():
    for key, exercise in EXERCISES.items():
        check = getattr(ex, exercise.check)
        assert inspect.signature(check).parameters["where"].default is None, key
    with pytest.raises(TypeError, match="check_merge: where must be a notebook's file name"):
        ex.check_merge(S.merge, S.unmerge, where=3)


def test_the_forward_is_praised_for_not_forming_delta_w_only_when_it_did_not(capsys):
    assert ex.check_lora_forward(S.lora_forward)
    out = capsys.readouterr().out
    assert "never formed the (out, in) product B A (ΔW = scaling * B A)" in out

    def forms_delta_w(x, W0, A, B, scaling):
        return x @ (W0 + scaling * (B @ A)).T

    assert ex.check_lora_forward(forms_delta_w)  # right, so it passes ...
    out = capsys.readouterr().out
    assert "never formed" not in out and "ΔW" not in out.split("\n")[0]
    assert "it formed one, such as the product B A" in out  # ... and is told what it did


def test_the_backward_is_praised_for_skipping_dW0_only_when_it_did(capsys):
    assert ex.check_lora_backward(S.lora_backward)
    assert "And it computed no dW0" in capsys.readouterr().out

    def computes_dW0(dy, x, W0, A, B, scaling):
        dW0 = _dW0(dy, x)  # computed, never returned
        assert dW0.shape == W0.shape
        return S.lora_backward(dy, x, W0, A, B, scaling)

    assert ex.check_lora_backward(computes_dW0)
    out = capsys.readouterr().out
    assert "skipped dW0" not in out and "computed no dW0" not in out
    assert "it formed one, such as dW0 = dy^T x" in out


def test_a_right_forward_too_slow_for_the_wide_layer_still_passes_and_claims_nothing(capsys):
    def lora_forward(x, W0, A, B, scaling):
        if W0.shape[0] > 100:  # only the memory probe's wide layer
            time.sleep(5)
        return S.lora_forward(x, W0, A, B, scaling)

    assert ex.check_lora_forward(lora_forward, time_limit=0.3)
    out = capsys.readouterr().out
    assert "ΔW" not in out and "memory" not in out


def test_an_in_place_edit_in_a_helper_is_blamed_on_the_helper(capsys):
    def lora_forward(x, W0, A, B, scaling):
        x *= 1.0
        return S.lora_forward(x, W0, A, B, scaling)

    def lora_forward_from_config(x, W0, A, B, alpha, r):
        return lora_forward(x, W0, A, B, alpha / r)

    assert not ex.check_lora_forward(lora_forward_from_config)
    out = capsys.readouterr().out
    assert (
        "Your `lora_forward` (called by your `lora_forward_from_config`) changed its argument `x` in place."
        in out
    )
    assert "It happened in `lora_forward`" in out
    assert "shape error" not in out


def test_a_name_error_gets_its_own_hint_not_the_shape_hint(capsys):
    def lora_forward(x, W0, A, B, scaling):
        return x @ W0.T + scalng * ((x @ A.T) @ B.T)  # noqa: F821

    assert not ex.check_lora_forward(lora_forward)
    out = capsys.readouterr().out
    assert "raised NameError" in out and "A NameError means" in out
    assert "shape error" not in out


def test_a_shape_error_still_gets_the_shape_hint(capsys):
    assert not ex.check_lora_forward(lambda x, W0, A, B, scaling: x @ W0 + scaling * (x @ A.T))
    assert "A shape error usually means" in capsys.readouterr().out


def test_adam_state_for_frozen_parameters_is_refused(capsys):
    def adam_step(params, grads, state, trainable, lr, betas, eps, t):
        new_params, new_state = S.adam_step(params, grads, state, trainable, lr, betas, eps, t)
        return new_params, {**new_state, "W0": (0.0, 0.0)}

    assert not ex.check_optimizer_step(adam_step)
    assert "new_state also holds ['W0']" in capsys.readouterr().out


def test_numbers_in_messages_are_plain_and_show_the_difference(capsys):
    def lora_forward(x, W0, A, B, scaling):
        return S.lora_forward(x, W0, A, B, scaling) * (1 + 1e-7)

    assert not ex.check_lora_forward(lora_forward)
    out = capsys.readouterr().out
    got, expected = re.search(r"\(got (\S+), expected (\S+)\)", out).groups()
    assert got != expected and "np." not in out
    assert "test case: x (3, 7)" in out
    assert ex._feedback.describe(s=np.float64(0.5), n=np.int64(3)) == "test case: s=0.5, n=3"
    assert not ex.check_param_count(lambda d, k, r: np.float64(r * (d + k)))
    assert "the count is the float 36.0: return an int" in capsys.readouterr().out
    assert ex._feedback.plain_repr((np.int64(3), [np.float64(0.5)])) == "(3, [0.5])"


def test_a_correct_float32_forward_is_told_to_keep_float64(capsys):
    def lora_forward(x, W0, A, B, scaling):
        return S.lora_forward(x, W0, A, B, scaling).astype(np.float32)

    assert not ex.check_lora_forward(lora_forward)
    assert "float32" in capsys.readouterr().out


# ---------------------------------------------------------------------- kind failure messages


# the twin's answer is a class, not a function: tests/test_twin_exercise.py checks its stub
@pytest.mark.parametrize("key", [k for k in EXERCISES if k != "lora_function"])
def test_stub_gets_not_implemented_message(key, capsys):
    names = EXERCISES[key].functions
    stubs = []
    for name in names:
        src = S.solution_sources()[name].split(":", 1)[0] + ":\n    raise NotImplementedError\n"
        namespace = {}
        exec(src, namespace)  # a stub with the real signature, as in the notebook
        stubs.append(namespace[name])
    check = getattr(ex, EXERCISES[key].check)
    assert check(*stubs) is False
    assert "is not implemented yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="not implemented yet") as info:
        check(*stubs, strict=True)
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_exception_in_student_code_is_reported_not_raised(capsys):
    def lora_forward(x, W0, A, B, scaling):
        return {}["missing"]

    assert ex.check_lora_forward(lora_forward) is False
    out = capsys.readouterr().out
    assert "raised KeyError: 'missing'" in out
    assert "It happened in `lora_forward`" in out
    assert "x (3, 7), W0 (5, 7), A (3, 7), B (5, 3)" in out


def test_wrong_output_shape_is_named_with_both_shapes(capsys):
    def lora_forward(x, W0, A, B, scaling):
        return S.lora_forward(x, W0, A, B, scaling).reshape(-1, W0.shape[0])

    assert not ex.check_lora_forward(lora_forward)
    out = capsys.readouterr().out
    assert "wrong output shape: y has shape (8, 5), expected (2, 4, 5)" in out
    assert "worked for 2-D x but not for the batched x" in out


def test_value_error_names_max_error_and_index(capsys):
    def lora_forward(x, W0, A, B, scaling):
        y = S.lora_forward(x, W0, A, B, scaling)
        y[1, 2] += 0.5
        return y

    assert not ex.check_lora_forward(lora_forward)
    out = capsys.readouterr().out
    assert "max abs error 0.5 at index (1, 2)" in out
    assert "known mistake" not in out


def test_missing_return_is_named(capsys):
    def merge(W0, A, B, scaling):
        W0 + scaling * (B @ A)

    assert not ex.check_merge(merge)
    assert "did you forget the `return` statement?" in capsys.readouterr().out


def test_changing_an_input_in_place_is_caught(capsys):
    assert not ex.check_merge(_merge_in_place, _unmerge_ok)
    assert "changed its argument `W0` in place" in capsys.readouterr().out


def test_backward_batch_error_gets_batch_hint(capsys):
    def lora_backward(dy, x, W0, A, B, scaling):
        dx, dA, dB = S.lora_backward(dy, x, W0, A, B, scaling)
        return dx, scaling * B.T @ dy.T @ x, dB  # right for 2-D x only

    assert not ex.check_lora_backward(lora_backward)
    assert "not for the batched x" in capsys.readouterr().out


def test_param_count_wants_an_int(capsys):
    assert not ex.check_param_count(lambda d, k, r: float(r * (d + k)))
    assert "return an int" in capsys.readouterr().out


def test_adam_with_wrong_return_type_is_explained(capsys):
    assert not ex.check_optimizer_step(
        lambda params, grads, state, trainable, lr, betas, eps, t: params
    )
    assert "should return a pair (new_params, new_state)" in capsys.readouterr().out


# ------------------------------------------------------------------------------- notebooks


def _notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_hold_every_exercise_once_with_a_stub_and_no_outputs():
    seen = []
    for path in _notebooks():
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name
            if "exercise" in cell.get("metadata", {}).get("tags", []):
                meta = cell["metadata"]["loralab"]
                assert EXERCISES[meta["exercise"]].notebook == path.name
                assert list(EXERCISES[meta["exercise"]].functions) == meta["functions"]
                assert "raise NotImplementedError" in "".join(cell["source"])
                seen.append(meta["exercise"])
    assert seen == list(EXERCISES)


def test_each_notebook_file_is_numbered_by_its_first_exercise():
    """A student looking for exercise N finds it in the file numbered N, or the last one before it."""
    first = {}
    for number, exercise in enumerate(EXERCISES.values(), start=1):
        first.setdefault(exercise.notebook, number)
    for notebook, number in first.items():
        assert notebook.startswith(f"{number:02d}_"), (notebook, number)
    assert sorted(p.name for p in _notebooks()) == sorted(first)


def test_solutions_are_not_shipped_in_the_package():
    package = Path(ex.__file__).parent
    for path in package.glob("*.py"):
        assert "instructor" not in path.read_text(encoding="utf-8"), path.name
    assert not (package / "solutions.py").exists()


def test_an_answer_too_odd_to_compare_is_still_a_verdict(capsys):
    class Odd:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("no array here")

    assert ex.check_merge(lambda W0, A, B, scaling: Odd()) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet")
    assert "could not use what your function returned (RuntimeError: no array here)" in out


# ------------------------------------------------------------ functions that hang, exit or NaN


def _hangs(W0, A, B, scaling):
    while True:
        pass


def test_a_function_that_never_returns_is_stopped_with_a_message(capsys):
    start = time.perf_counter()
    assert ex.check_merge(_hangs, time_limit=0.3) is False
    assert time.perf_counter() - start < 5
    out = capsys.readouterr().out
    assert "`_hangs` did not return within 0.3 s" in out
    assert "time_limit=" in out  # says how to allow more time


def test_a_sleeping_function_is_stopped_too(capsys):
    def merge(W0, A, B, scaling):
        time.sleep(60)

    start = time.perf_counter()
    assert ex.check_merge(merge, time_limit=0.2) is False
    assert time.perf_counter() - start < 5
    assert "did not return within 0.2 s" in capsys.readouterr().out


def test_the_time_limit_has_a_default_of_a_few_seconds():
    assert 1 <= ex.TIME_LIMIT <= 10
    assert inspect.signature(ex.check_merge).parameters["time_limit"].default is None


@pytest.mark.parametrize(
    "limit, error",
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("5", TypeError),
        (True, TypeError),
        (None.__class__, TypeError),
    ],
)
def test_a_bad_time_limit_is_refused_by_name(limit, error):
    """A wrong type is a TypeError, a wrong value a ValueError; the message names the check."""
    with pytest.raises(
        error,
        match="^"
        + re.escape(f"check_merge: time_limit must be a positive number, got time_limit={limit!r}"),
    ):
        ex.check_merge(S.merge, time_limit=limit)


def test_the_time_limit_leaves_no_alarm_or_handler_behind(capsys):
    def handler(signum, frame):
        raise AssertionError("the outer alarm fired")

    old = signal.signal(signal.SIGALRM, handler)
    try:
        assert ex.check_merge(_hangs, time_limit=0.2) is False
        assert ex.check_merge(S.merge, S.unmerge, time_limit=0.2) is True
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, old)


def test_an_outer_alarm_is_kept(capsys):
    fired = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert ex.check_merge(S.merge, S.unmerge, time_limit=2) is True
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < remaining <= 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired == []


def test_off_the_main_thread_the_check_still_runs(capsys):
    results = []
    worker = threading.Thread(target=lambda: results.append(ex.check_merge(S.merge, S.unmerge)))
    worker.start()
    worker.join(30)
    assert results == [True]


@pytest.mark.parametrize("call", [sys.exit, lambda: sys.exit("bye"), exit, quit])
def test_sys_exit_in_student_code_is_caught_and_explained(call, capsys):
    def merge(W0, A, B, scaling):
        call()

    assert ex.check_merge(merge) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet")
    assert "`merge` called exit" in out
    assert "return" in out


def test_nan_from_a_low_rank_approx_gets_a_message_not_a_linalg_error(capsys):
    assert ex.check_low_rank_approx(lambda W, r: np.full(W.shape, np.nan)) is False
    out = capsys.readouterr().out
    assert "LinAlgError" not in out and "could not use" not in out
    assert "W_r contains nan at index (0, 0)" in out
    assert "NaN (not a number)" in out


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_results_are_explained_in_every_array_check(bad, capsys):
    def lora_forward(x, W0, A, B, scaling):
        return np.full((*x.shape[:-1], W0.shape[0]), bad)

    assert ex.check_lora_forward(lora_forward) is False
    out = capsys.readouterr().out
    assert f"y contains {bad} at index (0, 0)" in out
    assert ("NaN (not a number)" if np.isnan(bad) else "inf (an overflow") in out


# ------------------------------------------------------------------ the new mistakes' messages


def _printed(check, *fns, capsys):
    assert check(*fns) is False
    return capsys.readouterr().out


def test_dx_without_the_frozen_path_says_gradients_flow_through_frozen_weights(capsys):
    check, fns = PLANTED["dx_without_frozen_path"]
    out = _printed(check, *fns, capsys=capsys)
    assert "frozen weights do not block gradients" in out
    assert "no dW0 is computed" in out
    assert "still flows through W0 to x" in out
    assert "dx = dy W0 + scaling * (dy B) A" in out


def test_W0_transposed_in_dx_is_named_from_the_square_probe(capsys):
    check, fns = PLANTED["dx_W0_not_transposed"]
    out = _printed(check, *fns, capsys=capsys)
    assert "raised ValueError" in out  # the non-square layer shows that it is wrong at all
    assert "On a square layer (in = out = 6) your function does run" in out


def test_a_dx_right_only_on_square_layers_is_caught_on_the_non_square_one(capsys):
    def lora_backward(dy, x, W0, A, B, scaling):
        dx, dA, dB = S.lora_backward(dy, x, W0, A, B, scaling)
        return (dx if W0.shape[0] == W0.shape[1] else dx + 1.0), dA, dB

    out = _printed(ex.check_lora_backward, lora_backward, capsys=capsys)
    assert "dx has the right shape (3, 7) but wrong values" in out


def test_dora_broadcast_mistakes_are_named_from_the_square_probe(capsys):
    for key in ("dora_norm_axis", "dora_broadcast"):
        check, fns = PLANTED[key]
        assert "On a square layer (in = out = 6)" in _printed(check, *fns, capsys=capsys)


def test_adam_bias_corrected_state_is_caught_at_the_first_step(capsys):
    check, fns = PLANTED["adam_state_bias_corrected"]
    assert "new_state['A'] m after step 1" in _printed(check, *fns, capsys=capsys)


def test_catalogue_no_longer_says_the_scaling_acts_at_initialisation():
    proved = EXERCISES["lora_forward_from_config"].proved
    assert "does not change how strongly the update acts at initialisation" not in proved
    assert "B = 0" in proved and "Section 4.1" in proved


def test_the_forward_check_tells_the_scalings_apart():
    # every mistaken scaling must differ from alpha / r
    alpha, r = _layer_checks._ALPHA, _layer_checks._R
    scalings = [alpha / r, alpha // r, r / alpha, alpha / np.sqrt(r), alpha, 1.0, (alpha / r) ** 2]
    assert len({round(v, 9) for v in scalings}) == len(scalings)


@pytest.mark.parametrize(
    "name", ["04_counting_and_svd", "06_merge_and_optimizer", "09_subspace_similarity"]
)
def test_headers_describe_the_inputs_their_checks_use(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
    header = "".join(nb["cells"][0]["source"])
    assert "How these exercises work" in header
    assert "batch dimension" not in header  # none of these checks uses a batched x
    assert "in = 7, out = 5" not in header


def test_the_instructors_guide_states_how_many_exercises_there_are_once_and_rightly():
    # It said "fourteen" long after the catalogue had grown to 19.
    guide = (ROOT / "docs" / "guides" / "instructors.md").read_text(encoding="utf-8")
    assert re.findall(r"(\S+) classroom exercises", guide) == [str(len(EXERCISES))]
