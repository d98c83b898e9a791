"""The wrong answers each known mistake produces.

A check recognises a mistake by computing that mistake's wrong answer on the same inputs and comparing
it with what the student returned. Each function returns ``(Mistake, wrong answer)`` pairs.
"""

from __future__ import annotations

import numpy as np

from loralab.exercises import _reference as ref
from loralab.exercises._mistakes import MISTAKES, Mistake


def _try(fn):
    """The wrong answer, or None where that mistake could not even run on these shapes."""
    try:
        with np.errstate(all="ignore"):
            return fn()
    except (ValueError, IndexError, ZeroDivisionError):
        return None


def forward(x, W0, A, B, scaling, alpha, r):
    base, lora = x @ W0.T, (x @ A.T) @ B.T
    M = MISTAKES
    return [
        (M["forgot_scaling"], base + lora),
        (M["alpha_not_alpha_over_r"], base + alpha * lora),
        (M["scaling_twice"], base + scaling**2 * lora),
        (M["scaling_over_r"], base + scaling / r * lora),
        (M["ba_swapped"], _try(lambda: base + scaling * (x @ B @ A))),
        (M["w0_not_transposed"], _try(lambda: x @ W0 + scaling * lora)),
        (M["update_on_x"], _try(lambda: x + scaling * lora)),
        (M["alpha_floor_div_r"], base + (alpha // r) * lora),
        (M["r_over_alpha"], base + (r / alpha) * lora),
        (M["alpha_over_sqrt_r"], base + alpha / np.sqrt(r) * lora),
        (M["scaling_on_base"], scaling * (base + lora)),
    ]


def backward(dy, x, W0, A, B, scaling):
    dx, dA, dB = ref.lora_backward(dy, x, W0, A, B, scaling)
    n = int(np.prod(x.shape[:-1]))
    M = MISTAKES
    dx_variants = [
        (M["dx_without_lora"], dy @ W0),
        (M["dx_without_frozen_path"], scaling * ((dy @ B) @ A)),
        (M["dx_missing_scaling"], dy @ W0 + (dy @ B) @ A),
        (M["dx_W0_not_transposed"], _try(lambda: dy @ W0.T + scaling * ((dy @ B) @ A))),
    ]
    dA_variants = [
        (M["dA_missing_scaling"], dA / scaling),
        (M["dA_transposed"], dA.T),
        (M["dA_dB_swapped"], dB),
        (M["batch_mean"], dA / n),
    ]
    dB_variants = [
        (M["dB_missing_scaling"], dB / scaling),
        (M["dB_transposed"], dB.T),
        (M["dA_dB_swapped"], dA),
        (M["batch_mean"], dB / n),
    ]
    return dx_variants, dA_variants, dB_variants


def param_count(d, k, r):
    M = MISTAKES
    return [
        (M["count_full_matrix"], d * k),
        (M["count_with_w0"], d * k + r * (d + k)),
        (M["count_product"], r * d * k),
        (M["count_only_one_factor"], r * d),
        (M["count_only_one_factor"], r * k),
        (M["count_2rd"], 2 * r * d),
        (M["count_2rd"], 2 * r * k),
    ]


def model_count(shapes, r, targets):
    """Wrong (trainable, total) pairs."""
    trainable, total = ref.lora_model_param_count(shapes, r, targets)
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    all_trainable, _ = ref.lora_model_param_count(shapes, r, matrices)
    full = sum(int(np.prod(shapes[n])) for n in targets)
    biases = sum(int(np.prod(s)) for s in shapes.values() if len(s) == 1)
    M = MISTAKES
    return [
        (M["model_biases_trainable"], (trainable + biases, total)),
        (M["model_all_matrices"], (all_trainable, total - trainable + all_trainable)),
        (M["model_trainable_is_total"], (total, total)),
        (M["model_total_without_lora"], (trainable, total - trainable)),
        (M["count_full_matrix"], (full, total - trainable + full)),
    ]


def low_rank(W, r):
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    Uf, _, Vhf = np.linalg.svd(W)
    M = MISTAKES
    return [
        (M["svd_smallest"], (U[:, -r:] * S[-r:]) @ Vh[-r:]),
        (M["svd_no_sigma"], U[:, :r] @ Vh[:r]),
        (M["svd_vh_columns"], _try(lambda: (Uf[:, :r] * S[:r]) @ Vhf[:, :r].T)),
        (M["svd_off_by_one"], ref.low_rank_approx(W, r + 1)),
        (M["svd_off_by_one"], ref.low_rank_approx(W, r - 1)),
    ]


def merge(W0, A, B, scaling):
    M = MISTAKES
    return [
        (M["forgot_scaling"], W0 + B @ A),
        (M["merge_transposed"], _try(lambda: W0 + scaling * (A.T @ B.T))),
        (M["merge_sign"], W0 - scaling * (B @ A)),
        (M["alpha_not_alpha_over_r"], W0 + scaling * A.shape[0] * (B @ A)),
    ]


def unmerge(W, A, B, scaling):
    M = MISTAKES
    return [
        (M["forgot_scaling"], W - B @ A),
        (M["merge_transposed"], _try(lambda: W - scaling * (A.T @ B.T))),
        (M["merge_sign"], W + scaling * (B @ A)),
    ]


def _sgd(variant):
    def step(params, grads, trainable, lr):
        names = params if variant == "updated_frozen" else trainable
        sign = 1 if variant == "gradient_ascent" else -1
        rate = 1.0 if variant == "forgot_lr" else lr
        return {n: p + sign * rate * grads[n] if n in names else p for n, p in params.items()}

    return step


def sgd_steps():
    return [(MISTAKES[k], _sgd(k)) for k in ("updated_frozen", "gradient_ascent", "forgot_lr")]


def _adam(variant):
    def step(params, grads, state, trainable, lr, betas, eps, t):
        b1, b2 = betas
        names = params if variant == "updated_frozen" else trainable
        new_params, new_state = dict(params), {}
        for name in names:
            m, v = state.get(name, (0.0, 0.0))
            if variant == "adam_state_ignored":
                m, v = 0.0, 0.0
            g = grads[name]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            tt = t + 1 if variant == "adam_t_plus_one" else t
            m_hat, v_hat = m / (1 - b1**tt), v / (1 - b2**tt)
            if variant == "adam_no_bias_correction":
                m_hat, v_hat = m, v
            denom = np.sqrt(v_hat) + eps
            if variant == "adam_eps_inside_sqrt":
                denom = np.sqrt(v_hat + eps)
            elif variant == "adam_no_sqrt":
                denom = v_hat + eps
            sign = 1 if variant == "gradient_ascent" else -1
            new_params[name] = params[name] + sign * lr * m_hat / denom
            new_state[name] = (m_hat, v_hat) if variant == "adam_state_bias_corrected" else (m, v)
        return new_params, new_state

    return step


def adam_steps():
    keys = (
        "updated_frozen",
        "gradient_ascent",
        "adam_no_bias_correction",
        "adam_eps_inside_sqrt",
        "adam_no_sqrt",
        "adam_t_plus_one",
        "adam_state_ignored",
        "adam_state_bias_corrected",
    )
    return [(MISTAKES[k], _adam(k)) for k in keys]


def subspace(U1, U2, i, j):
    inner = np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2
    M = MISTAKES
    return [
        (M["phi_not_squared"], np.sqrt(inner) / min(i, j)),
        (M["phi_wrong_normaliser"], inner / max(i, j)),
        (M["phi_wrong_normaliser"], inner / (i * j)),
        (M["phi_wrong_normaliser"], inner),
        (M["phi_not_sliced"], np.linalg.norm(U1.T @ U2) ** 2 / min(i, j)),
        (M["phi_rows"], _try(lambda: np.linalg.norm(U1[:i].T @ U2[:j]) ** 2 / min(i, j))),
    ]


def init(A, B, r: int) -> Mistake | None:
    """The initialisation mistake that the arrays A (r, in) and B (out, r) show, if any."""
    a_zero, b_zero = not np.any(A), not np.any(B)
    M = MISTAKES
    if a_zero and b_zero:
        return M["init_both_zero"]
    if a_zero:
        return M["init_roles_swapped"]
    if not b_zero:
        return M["init_both_random"]
    if np.linalg.matrix_rank(A) < r:
        return M["init_A_low_rank"]
    return None


def dropout_backward(dy, x, W0, A, B, scaling, keep, p):
    """Wrong (dx, dA, dB) triples, one list per output."""
    dx, dA, dB = ref.lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p)
    branch = scaling * ((dy @ B) @ A)
    _, dA_x, dB_x = ref.lora_backward(dy, x, W0, A, B, scaling)
    _, dA_k, dB_k = ref.lora_backward(dy, x * keep, W0, A, B, scaling)
    M = MISTAKES
    dx_variants = [
        (M["dropout_dx_unmasked"], dy @ W0 + branch),
        (M["dropout_on_frozen_path"], (dy @ W0 + branch) * keep / (1 - p)),
        (M["dropout_no_rescale"], dy @ W0 + branch * keep),
        (M["dx_without_frozen_path"], branch * keep / (1 - p)),
        (M["dx_without_lora"], dy @ W0),
    ]
    dA_variants = [
        (M["dropout_dA_dB_unmasked"], dA_x),
        (M["dropout_no_rescale"], dA_k),
        (M["dA_missing_scaling"], dA / scaling),
        (M["dA_transposed"], dA.T),
    ]
    dB_variants = [
        (M["dropout_dA_dB_unmasked"], dB_x),
        (M["dropout_no_rescale"], dB_k),
        (M["dB_missing_scaling"], dB / scaling),
        (M["dB_transposed"], dB.T),
    ]
    return dx_variants, dA_variants, dB_variants


def _substring(module, targets):
    return any(t in module for t in targets)


def _no_dot(module, targets):
    return any(module.endswith(t) for t in targets)


def _exact(module, targets):
    return module in targets


def injected_modules(shapes, targets):
    """Wrong sets of adapted modules, each with the mistake that selects it."""
    M = MISTAKES
    return [
        (M["inject_substring"], ref.adapted_modules(shapes, targets, _substring)),
        (M["inject_endswith_no_dot"], ref.adapted_modules(shapes, targets, _no_dot)),
        (M["inject_exact_name"], ref.adapted_modules(shapes, targets, _exact)),
    ]


def trainable_sets(shapes, modules, lora_names):
    """Wrong `trainable` sets, each with its mistake."""
    M = MISTAKES
    return [
        (M["inject_not_frozen"], set(shapes) | set(lora_names)),
        (M["inject_target_trainable"], {f"{m}.weight" for m in modules} | set(lora_names)),
    ]


def dora(x, W0, A, B, scaling, m):
    V = W0 + scaling * (B @ A)
    z = ref.lora_forward(x, W0, A, B, scaling)
    M = MISTAKES
    return [
        (M["dora_norm_axis"], _try(lambda: (m / np.linalg.norm(V, axis=0)) * z)),
        (M["dora_norm_of_W0"], (m / np.linalg.norm(W0, axis=1)) * z),
        (M["dora_not_normalised"], m * z),
        (M["dora_frobenius"], (m / np.linalg.norm(V)) * z),
        (
            M["dora_magnitude_on_update_only"],
            x @ W0.T + (m / np.linalg.norm(V, axis=1)) * (z - x @ W0.T),
        ),
        (M["dora_broadcast"], _try(lambda: x @ (m * V / np.linalg.norm(V, axis=1)).T)),
        (M["forgot_scaling"], ref.dora_forward(x, W0, A, B, 1.0, m)),
    ]
