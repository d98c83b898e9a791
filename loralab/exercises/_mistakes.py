"""The catalogue of known mistakes, and the wrong answers each one produces.

A check recognises a mistake by computing that mistake's wrong answer on the same inputs and comparing
it with what the student returned. ``MISTAKES[key].title`` is the phrase that appears in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loralab.exercises import _reference as ref


@dataclass(frozen=True)
class Mistake:
    key: str
    title: str
    explain: str


_LIST = [
    # forward
    Mistake(
        "forgot_scaling",
        "you forgot the scaling",
        "The update is scaling * B A x, not B A x: multiply the LoRA path by `scaling`.",
    ),
    Mistake(
        "alpha_not_alpha_over_r",
        "you used alpha instead of alpha / r",
        "The update is multiplied by scaling = alpha / r (LoRA paper, Section 4.1), not by alpha.",
    ),
    Mistake(
        "scaling_twice",
        "you applied the scaling twice",
        "Multiply the LoRA path by `scaling` once (scaling^2 is too much).",
    ),
    Mistake(
        "scaling_over_r",
        "you divided the scaling by r again",
        "The `scaling` argument already is alpha / r: use it as it is.",
    ),
    Mistake(
        "ba_swapped",
        "B and A are swapped or transposed",
        "A (r, in) acts first and B (out, r) second: y = x W0^T + scaling * (x A^T) B^T, "
        "i.e. ΔW = B A of shape (out, in), applied as x ΔW^T.",
    ),
    Mistake(
        "w0_not_transposed",
        "you forgot to transpose W0",
        "W0 has shape (out, in) (PyTorch's layout), so the base output is x @ W0.T.",
    ),
    Mistake(
        "update_on_x",
        "you added the update to x instead of to W0 x",
        "LoRA adds scaling * B A x to the frozen layer's output W0 x, not to its input: "
        "y = x W0^T + scaling * x A^T B^T.",
    ),
    # backward
    Mistake(
        "dA_missing_scaling",
        "the scaling is missing in dA",
        "y depends on A through scaling * B A x, so dA = scaling * B^T dy^T x.",
    ),
    Mistake(
        "dB_missing_scaling",
        "the scaling is missing in dB",
        "y depends on B through scaling * B A x, so dB = scaling * dy^T (x A^T).",
    ),
    Mistake(
        "dx_missing_scaling",
        "the scaling is missing in dx's LoRA path",
        "dx = dy W0 + scaling * dy B A.",
    ),
    Mistake(
        "dx_without_lora",
        "dx is missing the LoRA path",
        "x reaches y through W0 and through B A, so dx = dy W0 + scaling * (dy B) A.",
    ),
    Mistake(
        "dA_dB_swapped",
        "dA and dB are swapped",
        "Return them in the order (dx, dA, dB): dA has A's shape (r, in), dB has B's (out, r).",
    ),
    Mistake(
        "dA_transposed",
        "dA is transposed",
        "A gradient has the shape of its parameter: dA is (r, in) like A.",
    ),
    Mistake(
        "dB_transposed",
        "dB is transposed",
        "A gradient has the shape of its parameter: dB is (out, r) like B.",
    ),
    Mistake(
        "batch_mean",
        "you averaged over the batch instead of summing",
        "Every batch row contributes to the gradient of the shared A and B: sum, do not average.",
    ),
    Mistake(
        "computed_dW0",
        "you computed dW0, which is not needed",
        "W0 is frozen, so nothing uses its gradient; skipping the (out, in) product dy^T x is "
        "exactly the memory and compute LoRA saves. Return only (dx, dA, dB).",
    ),
    # counting
    Mistake(
        "count_full_matrix",
        "you counted the full d x k matrix",
        "That is full fine-tuning. LoRA trains B (d x r) and A (r x k): r (d + k) numbers.",
    ),
    Mistake(
        "count_only_one_factor",
        "you counted only one of the two factors",
        "LoRA trains both B (d x r) and A (r x k): r d + r k.",
    ),
    Mistake(
        "count_product",
        "you multiplied r, d and k",
        "B has d r entries and A has r k: add them, r (d + k).",
    ),
    Mistake(
        "count_with_w0",
        "you counted the frozen W0 as trainable",
        "W0 stays frozen; only B and A are trained.",
    ),
    Mistake(
        "model_all_matrices",
        "you adapted every matrix, not only the targets",
        "Only the weights named in `targets` get a LoRA pair.",
    ),
    Mistake(
        "model_trainable_is_total",
        "you counted the frozen base parameters as trainable",
        "The trainable count is the LoRA parameters only; the base model stays frozen.",
    ),
    Mistake(
        "model_total_without_lora",
        "your total leaves out the LoRA parameters",
        "The total is every base parameter plus the new LoRA ones.",
    ),
    # low-rank approximation
    Mistake(
        "svd_smallest",
        "you kept the r smallest singular values",
        "np.linalg.svd returns sigma in decreasing order; keep the first r.",
    ),
    Mistake(
        "svd_no_sigma",
        "you left out the singular values",
        "W_r = U_r diag(sigma_r) V_r^T: multiply by the first r singular values.",
    ),
    Mistake(
        "svd_vh_columns",
        "you took columns of Vh instead of rows",
        "np.linalg.svd returns Vh = V^T: the right singular vectors are its rows, Vh[:r].",
    ),
    Mistake(
        "svd_off_by_one",
        "you kept the wrong number of singular values",
        "Keep exactly r of them: U[:, :r], S[:r], Vh[:r].",
    ),
    # merge
    Mistake(
        "merge_transposed",
        "ΔW is transposed",
        "ΔW = B A has W0's shape (out, in); A^T B^T is its transpose.",
    ),
    Mistake(
        "merge_sign",
        "the sign is wrong",
        "merge adds the update, W = W0 + scaling * B A; unmerge subtracts it.",
    ),
    # optimizers
    Mistake(
        "updated_frozen",
        "you updated a frozen parameter",
        "Only the names in `trainable` may change; return the frozen ones exactly as they were.",
    ),
    Mistake(
        "gradient_ascent",
        "you stepped up the gradient",
        "To lower the loss, subtract: p - lr * (update).",
    ),
    Mistake(
        "forgot_lr",
        "you forgot the learning rate",
        "SGD moves each trainable parameter by lr * grad, not by grad.",
    ),
    Mistake(
        "adam_no_bias_correction",
        "you left out Adam's bias correction",
        "Divide m by (1 - beta1^t) and v by (1 - beta2^t) before the update.",
    ),
    Mistake(
        "adam_eps_inside_sqrt",
        "eps is inside the square root",
        "PyTorch's Adam divides by sqrt(v_hat) + eps, with eps outside the root.",
    ),
    Mistake(
        "adam_no_sqrt",
        "you forgot the square root of v_hat",
        "Adam divides by sqrt(v_hat) + eps, not by v_hat + eps.",
    ),
    Mistake(
        "adam_t_plus_one",
        "the bias correction used t + 1",
        "`t` already is the 1-based step number: use beta^t as it is.",
    ),
    Mistake(
        "adam_state_ignored",
        "you did not carry m and v over from `state`",
        "Start each step from `m, v = state[name]` and return the updated pair in the new state.",
    ),
    # subspace similarity
    Mistake(
        "phi_not_squared",
        "you did not square the Frobenius norm",
        "phi = ||U1_i^T U2_j||_F^2 / min(i, j): square the norm.",
    ),
    Mistake(
        "phi_wrong_normaliser",
        "you divided by the wrong thing",
        "Divide by min(i, j), the most that ||U1_i^T U2_j||_F^2 can be.",
    ),
    Mistake(
        "phi_not_sliced",
        "you used all the columns instead of the first i and j",
        "Take U1[:, :i] and U2[:, :j] (the top-i and top-j singular directions).",
    ),
    Mistake(
        "phi_rows",
        "you took rows instead of columns",
        "The singular directions are the columns: U1[:, :i], not U1[:i].",
    ),
]

#: Every known mistake by key.
MISTAKES: dict[str, Mistake] = {m.key: m for m in _LIST}


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
    ]


def backward(dy, x, W0, A, B, scaling):
    dx, dA, dB = ref.lora_backward(dy, x, W0, A, B, scaling)
    n = int(np.prod(x.shape[:-1]))
    M = MISTAKES
    dx_variants = [
        (M["dx_without_lora"], dy @ W0),
        (M["dx_missing_scaling"], dy @ W0 + (dy @ B) @ A),
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
    ]


def model_count(shapes, r, targets):
    """Wrong (trainable, total) pairs."""
    trainable, total = ref.lora_model_param_count(shapes, r, targets)
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    all_trainable, _ = ref.lora_model_param_count(shapes, r, matrices)
    full = sum(int(np.prod(shapes[n])) for n in targets)
    M = MISTAKES
    return [
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
            new_state[name] = (m, v)
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
