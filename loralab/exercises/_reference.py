"""Private NumPy references and deterministic test inputs for the checks.

Self-contained on purpose: the checks must not change when the rest of loralab does. Shapes follow
PyTorch/PEFT: W0 is (out, in), A is (r, in), B is (out, r), x is (..., in).
"""

from __future__ import annotations

import numpy as np


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def lora_inputs(batch: tuple[int, ...], d_in: int, d_out: int, r: int, seed: int) -> dict:
    """x (*batch, in), W0 (out, in), A (r, in), B (out, r) nonzero, dy (*batch, out); float64."""
    g = rng(seed)
    return {
        "x": g.standard_normal((*batch, d_in)),
        "W0": g.standard_normal((d_out, d_in)) / np.sqrt(d_in),
        "A": g.standard_normal((r, d_in)) / np.sqrt(d_in),
        "B": g.standard_normal((d_out, r)),
        "dy": g.standard_normal((*batch, d_out)),
    }


def lora_forward(x, W0, A, B, scaling):
    """y = x W0^T + scaling * (x A^T) B^T, shape (..., out)."""
    return x @ W0.T + scaling * ((x @ A.T) @ B.T)


def lora_backward(dy, x, W0, A, B, scaling):
    """(dx, dA, dB) for y = x W0^T + scaling * x A^T B^T, summed over all leading dimensions."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dy @ W0 + scaling * ((dy @ B) @ A)
    dA = scaling * (B.T @ dy2.T) @ x2
    dB = scaling * dy2.T @ (x2 @ A.T)
    return dx, dA, dB


def lora_param_count(d: int, k: int, r: int) -> int:
    return r * (d + k)


def lora_model_param_count(shapes: dict, r: int, targets) -> tuple[int, int]:
    trainable = sum(lora_param_count(*shapes[name], r) for name in targets)
    base = sum(int(np.prod(shape)) for shape in shapes.values())
    return trainable, base + trainable


def matrix_with_singular_values(m: int, n: int, sigma, seed: int) -> np.ndarray:
    """A (m, n) matrix with exactly the singular values ``sigma`` (distinct, so W_r is unique)."""
    g = rng(seed)
    U, _ = np.linalg.qr(g.standard_normal((m, len(sigma))))
    V, _ = np.linalg.qr(g.standard_normal((n, len(sigma))))
    return (U * np.asarray(sigma)) @ V.T


def low_rank_approx(W, r):
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def merge(W0, A, B, scaling):
    return W0 + scaling * (B @ A)


def unmerge(W, A, B, scaling):
    return W - scaling * (B @ A)


def optimizer_problem(seed: int, steps: int) -> tuple[dict, list[dict], set]:
    """Parameters of one LoRA layer, a gradient for every parameter at every step, the trainable set.

    Frozen parameters get gradients too, so that a step which updates them is caught.
    """
    g = rng(seed)
    shapes = {"W0": (5, 7), "bias": (5,), "A": (3, 7), "B": (5, 3)}
    params = {name: g.standard_normal(shape) for name, shape in shapes.items()}
    grads = [{name: g.standard_normal(s) for name, s in shapes.items()} for _ in range(steps)]
    return params, grads, {"A", "B"}


def sgd_step(params, grads, trainable, lr):
    return {n: p - lr * grads[n] if n in trainable else p for n, p in params.items()}


def adam_step(params, grads, state, trainable, lr, betas, eps, t):
    """PyTorch's Adam (no weight decay, no amsgrad); ``state[name] = (m, v)``; t starts at 1."""
    b1, b2 = betas
    new_params, new_state = dict(params), {}
    for name in trainable:
        m, v = state[name]
        g = grads[name]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        new_params[name] = params[name] - lr * m_hat / (np.sqrt(v_hat) + eps)
        new_state[name] = (m, v)
    return new_params, new_state


def orthonormal_columns(d: int, n: int, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(rng(seed).standard_normal((d, n)))
    return Q


def subspace_similarity(U1, U2, i, j):
    """phi = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) (LoRA paper, Section 7.2)."""
    return float(np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))


def lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p):
    """(dx, dA, dB) with dropout on the LoRA path's input: x_d = x * keep / (1 - p).

    y = x W0^T + scaling * (x_d A^T) B^T, so dA and dB see x_d, and the LoRA path's part of dx
    is masked by the same keep / (1 - p); the frozen path saw the whole x.
    """
    xd = x * keep / (1 - p)
    _, dA, dB = lora_backward(dy, xd, W0, A, B, scaling)
    dx = dy @ W0 + (scaling * ((dy @ B) @ A)) * keep / (1 - p)
    return dx, dA, dB


def dropout_problem(batch: tuple[int, ...], d_in: int, d_out: int, r: int, seed: int) -> dict:
    """`lora_inputs` plus a 0/1 ``keep`` mask of x's shape (some of each) and p = 0.25."""
    inp = lora_inputs(batch, d_in, d_out, r, seed)
    keep = (rng(seed + 1000).random(inp["x"].shape) >= 0.25).astype(float)
    keep.flat[0], keep.flat[1] = 0.0, 1.0
    return {**inp, "keep": keep, "p": 0.25}


def dora_forward(x, W0, A, B, scaling, m):
    """y = (m / ||V||_row) * (x W0^T + scaling * (x A^T) B^T) with V = W0 + scaling * B A."""
    norm = np.linalg.norm(W0 + scaling * (B @ A), axis=1)
    return (m / norm) * lora_forward(x, W0, A, B, scaling)


def module_matches(module: str, targets) -> bool:
    """PEFT's rule for a list of target names: the module's name is t or ends with '.' + t."""
    return any(module == t or module.endswith("." + t) for t in targets)


def injection_model(d: int = 8, kv: int = 4, ff: int = 12, vocab: int = 11) -> dict:
    """Parameter shapes of a two-block transformer, named like a PyTorch state dict."""
    shapes = {"embed.weight": (vocab, d)}
    for i in range(2):
        layer = f"layers.{i}"
        shapes.update(
            {
                f"{layer}.attn.q.weight": (d, d),
                f"{layer}.attn.q.bias": (d,),
                f"{layer}.attn.k.weight": (kv, d),
                f"{layer}.attn.v.weight": (kv, d),
                f"{layer}.attn.o.weight": (d, d),
                f"{layer}.mlp.up.weight": (ff, d),
                f"{layer}.mlp.gate_up.weight": (ff, d),
                f"{layer}.mlp.down.weight": (d, ff),
                f"{layer}.norm.weight": (d,),
            }
        )
    shapes["head.weight"] = (vocab, d)
    return shapes


def adapted_modules(shapes: dict, targets, matches=module_matches) -> list[str]:
    """Modules with a 2-D ``.weight`` that ``matches(module, targets)`` selects, in order."""
    return [
        name[: -len(".weight")]
        for name, shape in shapes.items()
        if name.endswith(".weight")
        and len(shape) == 2
        and matches(name[: -len(".weight")], targets)
    ]
