"""Adapt the pre-trained GPT to another corpus with LoRA, and the LoRA paper's analyses of the result.

:func:`adapt` (tutorials 09 and 10) trains with `loralab.training.fit`;
:func:`subspace_similarity` and :func:`delta_w_vs_w` are the paper's Section 7 measurements
(Figures 3-4 and Table 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loralab import optim
from loralab._validate import positive_int, positive_number
from loralab.lora import count_parameters, inject_lora
from loralab.lora.variants import loraplus_param_groups
from loralab.models.data import get_batch, load_corpus
from loralab.models.gpt import GPT, load_gpt
from loralab.training import fit

__all__ = ["AdaptResult", "adapt", "subspace_similarity", "delta_w_vs_w"]


@dataclass
class AdaptResult:
    """What :func:`adapt` returns.

    Attributes
    ----------
    model : GPT
        The adapted model (LoRA layers in place, not merged).
    val_loss : float
        Mean cross-entropy (nats per character) on the held-out part of the corpus.
    trainable : int
        Number of trained values.
    seconds_per_step : float
        Median wall time of one training step.
    losses : list of float
        Training loss at every step.
    """

    model: GPT
    val_loss: float
    trainable: int
    seconds_per_step: float
    losses: list[float]


def adapt(
    target_modules: str | Sequence[str],
    *,
    r: int,
    alpha: float = 8.0,
    steps: int = 150,
    lr: float = 1e-2,
    batch_size: int = 16,
    context: int = 32,
    corpus: str = "devil",
    seed: int = 0,
    val_tokens: int = 8192,
    loraplus_lr_ratio: float | None = None,
    base: GPT | None = None,
    **lora_options: Any,
) -> AdaptResult:
    """Put LoRA on the shipped GPT (or ``base``) and train it with Adam on ``corpus``.

    Parameters
    ----------
    target_modules : list of str or regex
        Which Linear layers to adapt, e.g. ``["q", "v"]`` (Wq and Wv of every block).
    r : int
    alpha : float, default 8
        A constant in r, as in the LoRA paper (Section 4.1: alpha is set to the first r tried,
        here Table 5's r = 8, and not tuned), so the scaling s = alpha / r shrinks as r grows.
        See the scaling section of the math guide for the alternatives (rsLoRA, alpha = 2r).
    steps, lr, batch_size : training length, Adam's learning rate and windows per batch
    context : int
        Window length (at most the model's context length; short windows make steps cheap).
    corpus : "devil" or "genesis"
    seed : int
        Seeds the adapter's initialisation and the batches: the same seed, the same result.
    val_tokens : int
        Length of the held-out stream the validation loss is measured on.
    loraplus_lr_ratio : float, optional
        LoRA+: B's learning rate is this times ``lr``.
    base : GPT, optional
        A model to adapt in place instead of a fresh copy of the shipped checkpoint.
    **lora_options
        ``use_dora``, ``use_rslora``, ``init``, ``dropout`` for :func:`~loralab.lora.inject_lora`.

    Raises
    ------
    TypeError, ValueError
        For an option of the wrong type or value, checked before ``base`` is changed.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("val_tokens", val_tokens)):
        positive_int(name, value, "adapt")
    positive_number("lr", lr, "adapt")
    context = positive_int("context", context, "adapt")
    data = load_corpus(corpus)
    model = base if base is not None else load_gpt()
    if context > model.context_length:
        raise ValueError(
            f"adapt: context={context} exceeds the model's context_length={model.context_length}"
        )
    inject_lora(model, target_modules, r=r, alpha=alpha, seed=seed, **lora_options)
    if loraplus_lr_ratio is None:
        groups: Any = [p for p in model.parameters() if p.requires_grad]
    else:
        groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio)
    rng = np.random.default_rng(seed)
    batches = (get_batch(data.train, batch_size, context, rng) for _ in range(steps))
    model.train()
    history = fit(lambda batch: model.loss(*batch), batches, optim.Adam(groups, lr=lr), steps=steps)
    model.eval()
    return AdaptResult(
        model,
        model.evaluate(data.val[:val_tokens]),
        count_parameters(model)[0],
        float(np.median(history.step_seconds)),
        history.loss,
    )


def subspace_similarity(A1: np.ndarray, A2: np.ndarray) -> np.ndarray:
    """The LoRA paper's normalised subspace similarity between two adapters' A matrices.

    With U1, U2 the right singular vectors of A1 (r1, d) and A2 (r2, d) (rows of Vh, in order of
    decreasing singular value), phi(i, j) = ||U1[:i] U2[:j]^T||_F^2 / min(i, j): 1 when the top-i
    directions of one span the top-j of the other (or the reverse), 0 when they are orthogonal.

    Returns
    -------
    ndarray of shape (r1, r2)
        ``phi[i - 1, j - 1]`` for i = 1..r1, j = 1..r2.
    """
    U1 = np.linalg.svd(A1, full_matrices=False)[2]
    U2 = np.linalg.svd(A2, full_matrices=False)[2]
    overlap = (U1 @ U2.T) ** 2  # (r1, r2)
    cumulative = overlap.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, len(U1) + 1)[:, None]
    j = np.arange(1, len(U2) + 1)[None, :]
    return cumulative / np.minimum(i, j)


def delta_w_vs_w(
    W: np.ndarray, delta: np.ndarray, r: int, rng: np.random.Generator
) -> dict[str, float]:
    """Table 7 of the LoRA paper: how strongly W already contains the directions ΔW amplifies.

    Project W onto the top-r singular directions (U (d, r), V (r, d)) of ΔW, of W itself and of a
    random Gaussian matrix, and take ||U^T W V^T||_F of each.

    Returns
    -------
    dict with "delta_w", "w", "random" (the three projections), "norm_w" (||W||_F),
    "norm_delta" (||ΔW||_F) and "amplification" (||ΔW||_F / ||U^T W V^T||_F for ΔW's directions).
    """

    def project(M: np.ndarray) -> float:
        U, _, Vh = np.linalg.svd(M, full_matrices=False)
        return float(np.linalg.norm(U[:, :r].T @ W @ Vh[:r].T))

    result = {
        "delta_w": project(delta),
        "w": project(W),
        "random": project(rng.standard_normal(W.shape)),
        "norm_w": float(np.linalg.norm(W)),
        "norm_delta": float(np.linalg.norm(delta)),
    }
    result["amplification"] = result["norm_delta"] / result["delta_w"]
    return result
