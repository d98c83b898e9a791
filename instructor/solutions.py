"""Reference solutions to the loralab exercises. For instructors: do not hand this file out.

It lives outside the ``loralab`` package, so students who install or import loralab do not get it.
Each function has exactly the name and signature of a stub in ``tutorials/exercises/``; its source
is swapped into the stub cell by the tests and by ``python instructor/solutions.py OUT_DIR``, which
writes solved (unexecuted) copies of every exercise notebook to OUT_DIR (``solved/`` is git-ignored). Every function body is
self-contained apart from ``np`` (imported by each notebook's first cell) and, for NF4,
``NF4_VALUES`` (imported by that notebook's first cell).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np

from loralab.quant import NF4_VALUES  # imported by the NF4 notebook's first cell too


def lora_forward(x, W0, A, B, scaling):
    return x @ W0.T + scaling * ((x @ A.T) @ B.T)


def lora_forward_from_config(x, W0, A, B, alpha, r):
    return lora_forward(x, W0, A, B, alpha / r)


def lora_backward(dy, x, W0, A, B, scaling):
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dy @ W0 + scaling * ((dy @ B) @ A)
    dA = scaling * (dy2 @ B).T @ x2
    dB = scaling * dy2.T @ (x2 @ A.T)
    return dx, dA, dB


def lora_param_count(d, k, r):
    return r * (d + k)


def lora_model_param_count(shapes, r, targets):
    trainable = sum(r * (shapes[name][0] + shapes[name][1]) for name in targets)
    base = sum(int(np.prod(shape)) for shape in shapes.values())
    return trainable, base + trainable


def low_rank_approx(W, r):
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ np.diag(S[:r]) @ Vh[:r]


def merge(W0, A, B, scaling):
    return W0 + scaling * (B @ A)


def unmerge(W, A, B, scaling):
    return W - scaling * (B @ A)


def sgd_step(params, grads, trainable, lr):
    return {name: p - lr * grads[name] if name in trainable else p for name, p in params.items()}


def adam_step(params, grads, state, trainable, lr, betas, eps, t):
    beta1, beta2 = betas
    new_params, new_state = dict(params), {}
    for name in trainable:
        m, v = state[name]
        g = grads[name]
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        new_params[name] = params[name] - lr * m_hat / (np.sqrt(v_hat) + eps)
        new_state[name] = (m, v)
    return new_params, new_state


def subspace_similarity(U1, U2, i, j):
    return np.linalg.norm(U1[:, :i].T @ U2[:, :j], "fro") ** 2 / min(i, j)


def init_lora(in_features, out_features, r, rng):
    A = rng.normal(0.0, 1.0 / np.sqrt(in_features), size=(r, in_features))
    B = np.zeros((out_features, r))
    return A, B


def lora_dropout_backward(dy, x, W0, A, B, scaling, keep, p):
    mask = keep / (1 - p)
    xd2 = (x * mask).reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dy @ W0 + (scaling * ((dy @ B) @ A)) * mask
    dA = scaling * (dy2 @ B).T @ xd2
    dB = scaling * dy2.T @ (xd2 @ A.T)
    return dx, dA, dB


def inject_lora_by_name(params, targets, r, rng):
    new_params, trainable = dict(params), set()
    for name, W0 in params.items():
        module = name.removesuffix(".weight")
        selected = any(module == t or module.endswith("." + t) for t in targets)
        if name.endswith(".weight") and W0.ndim == 2 and selected:
            out_features, in_features = W0.shape
            new_params[module + ".lora_A"] = rng.normal(
                0.0, 1.0 / np.sqrt(in_features), (r, in_features)
            )
            new_params[module + ".lora_B"] = np.zeros((out_features, r))
            trainable |= {module + ".lora_A", module + ".lora_B"}
    return new_params, trainable


def dora_forward(x, W0, A, B, scaling, m):
    V = W0 + scaling * (B @ A)
    norm = np.linalg.norm(V, axis=1)
    return (m / norm) * (x @ W0.T + scaling * ((x @ A.T) @ B.T))


def nf4_quantize(W, block_size):
    blocks = W.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    levels = NF4_VALUES.astype(np.float64)
    codes = np.abs((blocks / absmax[:, None])[..., None] - levels).argmin(axis=-1)
    return codes.reshape(W.shape), absmax


def nf4_dequantize(codes, absmax, shape, block_size):
    levels = NF4_VALUES.astype(np.float64)
    values = levels[np.asarray(codes).reshape(-1)].reshape(-1, block_size)
    return (values * absmax[:, None]).reshape(shape)


def mixed_forward(x, W0, As, Bs, scalings, adapter_ids):
    y = x @ W0.T
    for k in range(len(As)):
        rows = adapter_ids == k
        y[rows] += scalings[k] * ((x[rows] @ As[k].T) @ Bs[k].T)
    return y


def cat_combine(As, Bs, scalings, weights):
    A = np.concatenate([w * s * Ak for w, s, Ak in zip(weights, scalings, As)], axis=0)
    return A, np.concatenate(Bs, axis=1)


def ring_allreduce(grads, send):
    P = len(grads)
    chunks = [np.array_split(np.array(g, dtype=float), P) for g in grads]
    for step in range(P - 1):  # reduce-scatter: worker i ends owning chunk (i + 1) % P
        sends = [(i, (i - step) % P) for i in range(P)]
        arrived = [send(i, (i + 1) % P, chunks[i][c]) for i, c in sends]
        for (i, c), values in zip(sends, arrived):
            chunks[(i + 1) % P][c] = chunks[(i + 1) % P][c] + values
    for step in range(P - 1):  # all-gather: the summed chunks travel once around the ring
        sends = [(i, (i + 1 - step) % P) for i in range(P)]
        arrived = [send(i, (i + 1) % P, chunks[i][c]) for i, c in sends]
        for (i, c), values in zip(sends, arrived):
            chunks[(i + 1) % P][c] = values
    return [np.concatenate(c) for c in chunks]


def allreduce_bytes(layer_shapes, r, P, bytes_per_value):
    full = sum(out * inp for out, inp in layer_shapes)
    lora = sum(r * (out + inp) for out, inp in layer_shapes)
    factor = 2 * (P - 1) / P * bytes_per_value
    return full * factor, lora * factor


# The answer to the twin exercise is a class that subclasses torch.autograd.Function. It is kept
# as text so that this file does not import torch: `solution_sources` hands the text to the
# notebook (which imports torch), and `LoRAFunction` builds the class only when it is asked for.
LORA_FUNCTION = """\
class LoRAFunction(torch.autograd.Function):
    \"\"\"y = x W0^T + scaling * (x A^T) B^T, with a hand-written backward and no dW0.\"\"\"

    @staticmethod
    def forward(ctx, x, W0, A, B, scaling):
        ctx.save_for_backward(x, W0, A, B)
        ctx.scaling = scaling
        return x @ W0.T + scaling * ((x @ A.T) @ B.T)

    @staticmethod
    def backward(ctx, dy):
        x, W0, A, B = ctx.saved_tensors
        s = ctx.scaling
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = dy @ W0 + s * ((dy @ B) @ A)
        dA = s * (dy2 @ B).T @ x2
        dB = s * dy2.T @ (x2 @ A.T)
        return dx, None, dA, dB, None
"""


def __getattr__(name: str):
    """``LoRAFunction``, built from `LORA_FUNCTION` on first use (this imports torch)."""
    if name != "LoRAFunction":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    namespace = {"torch": torch}
    exec(LORA_FUNCTION, namespace)
    return namespace["LoRAFunction"]


def solution_sources() -> dict[str, str]:
    """Function name -> source code, for every solution above."""
    return {
        name: inspect.getsource(obj)
        for name, obj in globals().items()
        if inspect.isfunction(obj) and obj.__module__ == __name__ and name not in _NOT_SOLUTIONS
    } | {"LoRAFunction": LORA_FUNCTION}


def main(argv: list[str] | None = None) -> int:
    """``python instructor/solutions.py OUT_DIR``: write a solved copy of every exercise notebook."""
    from loralab.exercises.grade import fill_notebook

    parser = argparse.ArgumentParser(
        prog="python instructor/solutions.py",
        description="Write solved (unexecuted) copies of every notebook in tutorials/exercises/ "
        "to OUT_DIR. For instructors: do not hand them out.",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=Path,
        help="folder for the solved notebooks, created if missing (e.g. solved/, git-ignored)",
    )
    out = parser.parse_args(argv).out_dir
    if out.exists() and not out.is_dir():
        parser.error(f"OUT_DIR {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    notebooks = Path(__file__).resolve().parent.parent / "tutorials" / "exercises"
    for path in sorted(notebooks.glob("*.ipynb")):
        fill_notebook(path, solution_sources(), out / path.name)
        print(f"wrote {out / path.name}")
    return 0


_NOT_SOLUTIONS = {"solution_sources", "main", "__getattr__"}

if __name__ == "__main__":
    raise SystemExit(main())
