"""The catalogue of known mistakes: what each is called in a message and what is right instead.

``MISTAKES[key].title`` is the phrase that appears in the message; `_wrong_answers` computes the
wrong answer each mistake produces, by which a check recognises it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mistake:
    """A known mistake: ``kind`` groups it (scaling, shapes, gradient flow, ...), ``title`` names it
    in the message, ``explain`` says what is right instead."""

    key: str
    kind: str
    title: str
    explain: str


_LIST = [
    # forward
    Mistake(
        "forgot_scaling",
        "scaling",
        "you forgot the scaling",
        "The update is scaling * B A x, not B A x: multiply the LoRA path by `scaling`.",
    ),
    Mistake(
        "alpha_not_alpha_over_r",
        "scaling",
        "you used alpha instead of alpha / r",
        "The update is multiplied by scaling = alpha / r (LoRA paper, Section 4.1), not by alpha.",
    ),
    Mistake(
        "scaling_twice",
        "scaling",
        "you applied the scaling twice",
        "Multiply the LoRA path by `scaling` once (scaling^2 is too much).",
    ),
    Mistake(
        "scaling_over_r",
        "scaling",
        "you divided the scaling by r again",
        "The `scaling` argument already is alpha / r: use it as it is.",
    ),
    Mistake(
        "alpha_floor_div_r",
        "scaling",
        "you used alpha // r (floor division)",
        "`//` rounds down to a whole number (16 // 3 is 5, not 5.33): write scaling = alpha / r.",
    ),
    Mistake(
        "r_over_alpha",
        "scaling",
        "you used r / alpha, the reciprocal of the scaling",
        "The scaling is alpha / r (LoRA paper, Section 4.1): alpha on top, r below, so a larger "
        "r gives a smaller scaling when alpha is kept fixed.",
    ),
    Mistake(
        "alpha_over_sqrt_r",
        "scaling",
        "you used alpha / sqrt(r), rsLoRA's scaling, where LoRA's alpha / r was asked",
        "rsLoRA (Kalajdzievski, 2023; PEFT's use_rslora=True) scales by alpha / sqrt(r); plain "
        "LoRA (paper, Section 4.1) by alpha / r, and this exercise asks for plain LoRA.",
    ),
    Mistake(
        "scaling_on_base",
        "scaling",
        "you scaled the frozen path too",
        "Only the update is scaled: y = x W0^T + scaling * x A^T B^T. Scaling x W0^T as well "
        "changes the pretrained layer itself: at initialisation (B = 0) the output should be "
        "exactly the base model's, and with your formula it is scaling times it.",
    ),
    Mistake(
        "ba_swapped",
        "shapes",
        "B and A are swapped or transposed",
        "A (r, in) acts first and B (out, r) second: y = x W0^T + scaling * (x A^T) B^T, "
        "i.e. ΔW = scaling * B A of shape (out, in), applied as x ΔW^T.",
    ),
    Mistake(
        "w0_not_transposed",
        "shapes",
        "you forgot to transpose W0",
        "W0 has shape (out, in) (PyTorch's layout), so the base output is x @ W0.T.",
    ),
    Mistake(
        "update_on_x",
        "formula",
        "you added the update to x instead of to W0 x",
        "LoRA adds scaling * B A x to the frozen layer's output W0 x, not to its input: "
        "y = x W0^T + scaling * x A^T B^T.",
    ),
    # backward
    Mistake(
        "dA_missing_scaling",
        "scaling",
        "the scaling is missing in dA",
        "y depends on A through scaling * B A x, so dA = scaling * B^T dy^T x.",
    ),
    Mistake(
        "dB_missing_scaling",
        "scaling",
        "the scaling is missing in dB",
        "y depends on B through scaling * B A x, so dB = scaling * dy^T (x A^T).",
    ),
    Mistake(
        "dx_missing_scaling",
        "scaling",
        "the scaling is missing in dx's LoRA path",
        "dx = dy W0 + scaling * dy B A.",
    ),
    Mistake(
        "dx_without_lora",
        "gradient flow",
        "dx is missing the LoRA path",
        "x reaches y through W0 and through B A, so dx = dy W0 + scaling * (dy B) A.",
    ),
    Mistake(
        "dx_without_frozen_path",
        "gradient flow",
        "dx is missing the frozen path dy W0 (frozen weights do not block gradients)",
        "W0 being frozen means no dW0 is computed and W0 is never updated, but the gradient "
        "still flows through W0 to x: y = x W0^T + scaling * x A^T B^T, so "
        "dx = dy W0 + scaling * (dy B) A. Without dy W0 the layers below receive almost no "
        "gradient (at initialisation, where B = 0, none at all) and stop learning.",
    ),
    Mistake(
        "dx_W0_not_transposed",
        "shapes",
        "dx uses W0^T where W0 belongs",
        "y = x W0^T, so dx = dy W0: dy (..., out) times W0 (out, in) gives (..., in). "
        "dy W0^T only runs when in = out, and then gives wrong values.",
    ),
    Mistake(
        "dA_dB_swapped",
        "shapes",
        "dA and dB are swapped",
        "Return them in the order (dx, dA, dB): dA has A's shape (r, in), dB has B's (out, r).",
    ),
    Mistake(
        "dA_transposed",
        "shapes",
        "dA is transposed",
        "A gradient has the shape of its parameter: dA is (r, in) like A.",
    ),
    Mistake(
        "dB_transposed",
        "shapes",
        "dB is transposed",
        "A gradient has the shape of its parameter: dB is (out, r) like B.",
    ),
    Mistake(
        "batch_mean",
        "batch",
        "you averaged over the batch instead of summing",
        "Every batch row contributes to the gradient of the shared A and B: sum, do not average.",
    ),
    Mistake(
        "computed_dW0",
        "frozen weights",
        "you computed dW0, which is not needed",
        "W0 is frozen, so nothing uses its gradient; skipping the (out, in) product dy^T x is "
        "exactly the memory and compute LoRA saves. Return only (dx, dA, dB).",
    ),
    # counting
    Mistake(
        "count_full_matrix",
        "counting",
        "you counted the full d x k matrix",
        "That is full fine-tuning. LoRA trains B (d x r) and A (r x k): r (d + k) numbers.",
    ),
    Mistake(
        "count_only_one_factor",
        "counting",
        "you counted only one of the two factors",
        "LoRA trains both B (d x r) and A (r x k): r d + r k.",
    ),
    Mistake(
        "count_product",
        "counting",
        "you multiplied r, d and k",
        "B has d r entries and A has r k: add them, r (d + k).",
    ),
    Mistake(
        "count_with_w0",
        "counting",
        "you counted the frozen W0 as trainable",
        "W0 stays frozen; only B and A are trained.",
    ),
    Mistake(
        "model_all_matrices",
        "counting",
        "you adapted every matrix, not only the targets",
        "Only the weights named in `targets` get a LoRA pair.",
    ),
    Mistake(
        "model_trainable_is_total",
        "counting",
        "you counted the frozen base parameters as trainable",
        "The trainable count is the LoRA parameters only; the base model stays frozen.",
    ),
    Mistake(
        "model_total_without_lora",
        "counting",
        "your total leaves out the LoRA parameters",
        "The total is every base parameter plus the new LoRA ones.",
    ),
    Mistake(
        "count_2rd",
        "counting",
        "you counted 2 r d, as if the matrix were square",
        "B is (d x r) and A is (r x k): r d + r k = r (d + k). That equals 2 r d only when "
        "d = k; for a non-square matrix such as an MLP's (4096 x 11008) it does not.",
    ),
    Mistake(
        "model_biases_trainable",
        "counting",
        "you counted the biases as trainable",
        "With LoRA (PEFT's default bias='none') the biases stay frozen with W0: only the LoRA "
        "factors A and B are trained. Count the 1-D biases in the total, not in `trainable`.",
    ),
    # low-rank approximation
    Mistake(
        "svd_smallest",
        "SVD",
        "you kept the r smallest singular values",
        "np.linalg.svd returns sigma in decreasing order; keep the first r.",
    ),
    Mistake(
        "svd_no_sigma",
        "SVD",
        "you left out the singular values",
        "W_r = U_r diag(sigma_r) V_r^T: multiply by the first r singular values.",
    ),
    Mistake(
        "svd_vh_columns",
        "SVD",
        "you took columns of Vh instead of rows",
        "np.linalg.svd returns Vh = V^T: the right singular vectors are its rows, Vh[:r].",
    ),
    Mistake(
        "svd_off_by_one",
        "SVD",
        "you kept the wrong number of singular values",
        "Keep exactly r of them: U[:, :r], S[:r], Vh[:r].",
    ),
    # merge
    Mistake(
        "merge_transposed",
        "shapes",
        "ΔW is transposed",
        "ΔW = scaling * B A has W0's shape (out, in); A^T B^T is its transpose.",
    ),
    Mistake(
        "merge_sign",
        "sign",
        "the sign is wrong",
        "merge adds the update, W = W0 + scaling * B A; unmerge subtracts it.",
    ),
    # optimizers
    Mistake(
        "updated_frozen",
        "frozen weights",
        "you updated a frozen parameter",
        "Only the names in `trainable` may change; return the frozen ones exactly as they were.",
    ),
    Mistake(
        "gradient_ascent",
        "sign",
        "you stepped up the gradient",
        "To lower the loss, subtract: p - lr * (update).",
    ),
    Mistake(
        "forgot_lr",
        "optimizer",
        "you forgot the learning rate",
        "SGD moves each trainable parameter by lr * grad, not by grad.",
    ),
    Mistake(
        "adam_no_bias_correction",
        "optimizer",
        "you left out Adam's bias correction",
        "Divide m by (1 - beta1^t) and v by (1 - beta2^t) before the update.",
    ),
    Mistake(
        "adam_eps_inside_sqrt",
        "optimizer",
        "eps is inside the square root",
        "PyTorch's Adam divides by sqrt(v_hat) + eps, with eps outside the root.",
    ),
    Mistake(
        "adam_no_sqrt",
        "optimizer",
        "you forgot the square root of v_hat",
        "Adam divides by sqrt(v_hat) + eps, not by v_hat + eps.",
    ),
    Mistake(
        "adam_t_plus_one",
        "optimizer",
        "the bias correction used t + 1",
        "`t` already is the 1-based step number: use beta^t as it is.",
    ),
    Mistake(
        "adam_state_ignored",
        "optimizer state",
        "you did not carry m and v over from `state`",
        "Start each step from `m, v = state[name]` and return the updated pair in the new state.",
    ),
    Mistake(
        "adam_state_bias_corrected",
        "optimizer state",
        "you stored the bias-corrected m_hat and v_hat in the state",
        "The state keeps the raw moving averages m and v; m_hat = m / (1 - beta1^t) and "
        "v_hat = v / (1 - beta2^t) are recomputed from them at every step. Storing m_hat makes "
        "the next step correct it a second time (the first step still looks right).",
    ),
    # subspace similarity
    Mistake(
        "phi_not_squared",
        "subspace similarity",
        "you did not square the Frobenius norm",
        "phi = ||U1_i^T U2_j||_F^2 / min(i, j): square the norm.",
    ),
    Mistake(
        "phi_wrong_normaliser",
        "subspace similarity",
        "you divided by the wrong thing",
        "Divide by min(i, j), the most that ||U1_i^T U2_j||_F^2 can be.",
    ),
    Mistake(
        "phi_not_sliced",
        "subspace similarity",
        "you used all the columns instead of the first i and j",
        "Take U1[:, :i] and U2[:, :j] (the top-i and top-j singular directions).",
    ),
    Mistake(
        "phi_rows",
        "subspace similarity",
        "you took rows instead of columns",
        "The singular directions are the columns: U1[:, :i], not U1[:i].",
    ),
    # initialisation
    Mistake(
        "init_both_zero",
        "initialisation",
        "A and B are both zero",
        "Then dA = scaling * B^T dy^T x = 0 and dB = scaling * dy^T (x A^T) = 0: neither factor "
        "ever gets a gradient, and LoRA never learns (a stationary point it cannot leave). One "
        "factor must be random: A (LoRA paper, Section 4.1), so that B's gradient is nonzero.",
    ),
    Mistake(
        "init_both_random",
        "initialisation",
        "A and B are both random",
        "Then ΔW = scaling * B A is random noise from the first step: the adapted model no longer computes "
        "what the pretrained one does. With B = 0, ΔW = 0 and training starts exactly from the "
        "pretrained model (LoRA paper, Section 4.1).",
    ),
    Mistake(
        "init_roles_swapped",
        "initialisation",
        "A is zero and B is random (the roles are swapped)",
        "ΔW = B A is still zero, and A would get a gradient, but LoRA (paper, Section 4.1) and "
        "PEFT draw A at random and set B = 0; adapters and comparisons with PEFT assume that.",
    ),
    Mistake(
        "init_A_low_rank",
        "initialisation",
        "A does not have rank r (its rows are not independent random directions)",
        "Fill A with random numbers from `rng` (e.g. rng.normal(0, 1 / sqrt(in), (r, in))): "
        "constant or repeated rows give fewer than r directions, and the adapter can then learn "
        "only a lower-rank update.",
    ),
    Mistake(
        "init_global_rng",
        "initialisation",
        "A does not come from `rng`",
        "Draw A with the generator you are given (rng.normal, rng.uniform, ...), not np.random "
        "or a seed of your own: the same rng must give the same A (a reproducible run), and "
        "different rngs different A.",
    ),
    # dropout
    Mistake(
        "dropout_dx_unmasked",
        "dropout",
        "dx's LoRA path is missing the dropout mask",
        "The LoRA path saw x_d = x * keep / (1 - p), so its contribution to dx is "
        "(scaling * (dy B) A) * keep / (1 - p): dropped inputs get no gradient from it.",
    ),
    Mistake(
        "dropout_on_frozen_path",
        "dropout",
        "you applied the dropout mask to the frozen path's dx too",
        "Dropout sits only on the LoRA path's input (as in PEFT): the frozen path saw the whole "
        "x, so dx = dy W0 + (scaling * (dy B) A) * keep / (1 - p).",
    ),
    Mistake(
        "dropout_no_rescale",
        "dropout",
        "you left out dropout's 1 / (1 - p)",
        "Inverted dropout (PyTorch's) scales the kept inputs by 1 / (1 - p) so that their "
        "expected value is x; the backward multiplies by the same keep / (1 - p).",
    ),
    Mistake(
        "dropout_dA_dB_unmasked",
        "dropout",
        "dA or dB uses x instead of the dropped-out x_d",
        "A and B only ever saw x_d = x * keep / (1 - p): dA = scaling * (dy B)^T x_d and "
        "dB = scaling * dy^T (x_d A^T).",
    ),
    Mistake(
        "dropout_new_mask",
        "dropout",
        "your result changes from call to call (a new random mask in the backward)",
        "The backward must reuse the mask of the forward (the `keep` argument); drawing a fresh "
        "one computes the gradient of a different function.",
    ),
    # injection by name
    Mistake(
        "inject_substring",
        "injection",
        "you matched targets as substrings of the names",
        "`'o' in name` also matches 'mlp.down' and 'norm'. PEFT selects a module when its name "
        "equals the target or ends with '.' + target: name == t or name.endswith('.' + t).",
    ),
    Mistake(
        "inject_endswith_no_dot",
        "injection",
        "you matched names that end with the target, without the '.' before it",
        "`name.endswith('up')` also selects 'mlp.gate_up' (and the target 'q' would select "
        "'attn.xq'). A target names whole parts of the path: name == t or "
        "name.endswith('.' + t).",
    ),
    Mistake(
        "inject_exact_name",
        "injection",
        "you compared the whole name with the target, so nothing matched",
        "Names are full paths such as 'layers.0.attn.q'; the target 'q' selects every module "
        "whose name ends with '.q' (PEFT's rule: name == t or name.endswith('.' + t)).",
    ),
    Mistake(
        "inject_not_frozen",
        "injection",
        "the base weights are still trainable",
        "Freeze everything that was there before: `trainable` holds the new LoRA names only.",
    ),
    Mistake(
        "inject_target_trainable",
        "injection",
        "the adapted W0 is trainable too",
        "LoRA leaves even the adapted weight W0 frozen; only its A and B train.",
    ),
    Mistake(
        "inject_B_not_zero",
        "injection",
        "the injected B is not zero",
        "Right after injection the model must compute exactly what the base model did, which "
        "needs ΔW = scaling * B A = 0: B starts at zero, A random.",
    ),
    # DoRA
    Mistake(
        "dora_norm_axis",
        "DoRA",
        "you took the norm over the wrong axis",
        "DoRA normalises the weight vector of each output unit: in PyTorch's (out, in) layout "
        "that is each row, np.linalg.norm(V, axis=1), shape (out,) like m (PEFT: "
        "weight.norm(dim=1)). The DoRA paper's 'column-wise' norm means the same vectors in its "
        "transposed layout.",
    ),
    Mistake(
        "dora_norm_of_W0",
        "DoRA",
        "you divided by the norm of W0 instead of W0 + scaling * B A",
        "The direction is V / ||V|| with V = W0 + scaling * B A, the adapted weight: divide by "
        "||W0 + scaling * B A||_row. (The two agree only at initialisation, when B = 0.)",
    ),
    Mistake(
        "dora_not_normalised",
        "DoRA",
        "you did not divide by the norm",
        "DoRA's weight is m * V / ||V||_row: the direction V / ||V|| has unit rows, so m alone "
        "sets each row's length.",
    ),
    Mistake(
        "dora_frobenius",
        "DoRA",
        "you divided by the norm of the whole matrix",
        "Use one norm per output row, ||V||_row = np.linalg.norm(V, axis=1), not the "
        "Frobenius norm of V.",
    ),
    Mistake(
        "dora_magnitude_on_update_only",
        "DoRA",
        "you applied the magnitude to the LoRA path only",
        "m / ||V|| rescales the whole adapted weight V = W0 + scaling * B A: "
        "y = (m / ||V||_row) * (x W0^T + scaling * x A^T B^T).",
    ),
    Mistake(
        "dora_broadcast",
        "DoRA",
        "m and the norms scale columns instead of rows",
        "m and ||V||_row have shape (out,) and V is (out, in): write m[:, None] * V / "
        "norm[:, None] (or keepdims=True); `m * V` broadcasts along the last axis, the inputs.",
    ),
]

#: Every known mistake by key.
MISTAKES: dict[str, Mistake] = {m.key: m for m in _LIST}
