"""LoRA's variants as small objects, shared by the NumPy and torch layers (PEFT's ``LoraVariant`` idea).

A LoRA layer is three independent choices, each an object here instead of ``if`` branches:

- its **scaling rule** (`SCALINGS`): s = alpha / r, or rsLoRA's alpha / sqrt(r) (Kalajdzievski, 2023);
- its **initialisation** (`INITS`): ``"kaiming"``/``"gaussian"`` draw A and set B = 0 (PEFT's
  ``init_lora_weights=True``/``"gaussian"``); ``"pissa"``/``"olora"`` move the principal part of W0
  into A and B and leave the residual W0 - s B A frozen in the base (Meng et al., 2024;
  Büyükakyüz, 2024), so the output is unchanged at first either way;
- its **kind** (`KINDS`): plain LoRA, or DoRA (Liu et al., 2024), which adds a magnitude vector m and
  changes the forward (`loralab.lora.ops.dora_forward`) and merging.

LoRA+ (Hayou et al., 2024) changes only the optimizer: `loraplus_param_groups`.

Everything here works on arrays: NumPy for initialisation (so both backends start from the same
values, bit for bit), and anything with ``@``, ``+=``, ``*=`` and ``[:, None]`` (NumPy arrays or
torch tensors) for merging. This module imports only `loralab.lora.ops`.

Adding a variant: write its object here (an init with ``__call__``, or a kind with
``extra_parameters``/``merge``/``unmerge`` and a ``name`` the layers map to their forward
Function), register it in `INITS` or `KINDS`, then give both layers (`loralab.lora.engine_functions` and
`loralab.torch.layers`) a Function for the new forward if it needs one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from loralab.lora.ops import row_norms

__all__ = [
    "SCALINGS",
    "INITS",
    "KINDS",
    "Scaling",
    "RandomInit",
    "PrincipalInit",
    "PlainLoRA",
    "DoRA",
    "pissa_init",
    "olora_init",
    "loraplus_param_groups",
]


# ----- scaling --------------------------------------------------------------------------------------
class Scaling:
    """s as a function of (alpha, r): ``alpha / r`` or, for rsLoRA, ``alpha / sqrt(r)``.

    rsLoRA's argument: with s = alpha / r the update's scale falls as r grows, so large ranks
    learn no better; alpha / sqrt(r) keeps it stable.

    >>> SCALINGS[False](16, 4), SCALINGS[True](16, 4)
    (4.0, 8.0)
    """

    def __init__(self, name: str, root: bool):
        self.name, self.root = name, root

    def __call__(self, alpha: float, r: int) -> float:
        return alpha / math.sqrt(r) if self.root else alpha / r

    def __repr__(self) -> str:
        return f"Scaling({self.name!r})"


SCALINGS = {
    False: Scaling("alpha / r", root=False),
    True: Scaling("rslora: alpha / sqrt(r)", root=True),
}
"""``use_rslora`` -> the scaling rule."""


# ----- initialisation ----------------------------------------------------------------------------------
class RandomInit:
    """A random, B = 0, W0 untouched, so ΔW = 0 at first. All float64; shape = (out, in).

    An init is called as ``init(W0 or None, r, scaling, rng, (out, in))`` and returns
    (A (r, in), B (out, r), the residual that replaces W0 or None).

    "kaiming": A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform with a=sqrt(5));
    "gaussian": A ~ N(0, (1/r)^2).
    """

    moves_W0 = False

    def __init__(self, name: str):
        self.name = name

    def __call__(
        self,
        W0: np.ndarray | None,
        r: int,
        scaling: float,
        rng: np.random.Generator,
        shape: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray, None]:
        out_features, in_features = shape
        if self.name == "kaiming":
            bound = 1.0 / math.sqrt(in_features)
            A = rng.uniform(-bound, bound, size=(r, in_features))
        else:
            A = rng.normal(0.0, 1.0 / r, size=(r, in_features))
        return A, np.zeros((out_features, r)), None


def pissa_init(W0: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PiSSA (Meng et al., 2024): the top-r singular triplets of W0 become the adapter.

    With W0 = U S V^T (singular values in decreasing order),

        A = diag(sqrt(S_r / s)) V_r^T,    B = U_r diag(sqrt(S_r / s)),    W_res = W0 - s B A,

    so s B A = U_r S_r V_r^T and the layer's output is unchanged at initialisation, while training
    starts on the principal directions of W0 instead of a random A and B = 0.

    Parameters
    ----------
    W0 : ndarray of shape (out, in)
    r : int
    scaling : float

    Returns
    -------
    A : ndarray of shape (r, in)
    B : ndarray of shape (out, r)
    W_res : ndarray of shape (out, in)
        The residual, kept frozen in place of W0. All three in W0's dtype; computed in float64.
    """
    W = W0.astype(np.float64)
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(S[:r] / scaling)
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root
    return A.astype(W0.dtype), B.astype(W0.dtype), (W - scaling * (B @ A)).astype(W0.dtype)


def olora_init(W0: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLoRA (Büyükakyüz, 2024): the first r columns of W0's QR decomposition become the adapter.

    With W0 = Q R (Q orthonormal columns, R upper triangular),

        A = R[:r, :],    B = Q[:, :r],    W_res = W0 - s B A,

    so B starts orthonormal. Returns (A (r, in), B (out, r), W_res (out, in)) in W0's dtype,
    computed in float64.
    """
    W = W0.astype(np.float64)
    Q, R = np.linalg.qr(W)
    A, B = R[:r], Q[:, :r]
    return A.astype(W0.dtype), B.astype(W0.dtype), (W - scaling * (B @ A)).astype(W0.dtype)


class PrincipalInit:
    """PiSSA or OLoRA: A and B from W0's decomposition, the residual W0 - s B A replaces W0."""

    moves_W0 = True

    def __init__(self, name: str, split: Any):
        self.name, self.split = name, split

    def __call__(
        self,
        W0: np.ndarray | None,
        r: int,
        scaling: float,
        rng: np.random.Generator,
        shape: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if W0 is None:
            raise ValueError(f"init={self.name!r} needs the base's W0 as an array")
        return self.split(W0, r, scaling)


INITS: dict[str, RandomInit | PrincipalInit] = {
    "kaiming": RandomInit("kaiming"),
    "gaussian": RandomInit("gaussian"),
    "pissa": PrincipalInit("pissa", pissa_init),
    "olora": PrincipalInit("olora", olora_init),
}
"""loralab's ``init`` name -> its initialisation."""


# ----- kinds: plain LoRA and DoRA ----------------------------------------------------------------------
class PlainLoRA:
    """h = W0 x + b + s B A x; merging adds ΔW = s B A into W0 and unmerging subtracts it."""

    name = "lora"
    extra_names: tuple[str, ...] = ()  # parameters beyond A and B, passed to the forward Function

    def extra_parameters(
        self, W0: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
    ) -> dict[str, np.ndarray]:
        return {}

    def merge(self, layer: Any, W: Any) -> None:
        W += layer.delta_weight()

    def unmerge(self, layer: Any, W: Any) -> None:
        W -= layer.delta_weight()


class DoRA(PlainLoRA):
    """W' = m * (W0 + s B A) / ||W0 + s B A||_row, with m (out,) trainable, starting at the norm.

    Merging writes W' into W0 and keeps the row norm (``layer._merge_norm``) for unmerging. The
    layer supplies ``layer.weight_row_norms(W)`` for its array type.
    """

    name = "dora"
    extra_names = ("lora_magnitude_vector",)

    def extra_parameters(
        self, W0: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
    ) -> dict[str, np.ndarray]:
        return {"lora_magnitude_vector": row_norms(W0, A, B, scaling).astype(W0.dtype)}

    def merge(self, layer: Any, W: Any) -> None:
        W += layer.delta_weight()
        layer._merge_norm = layer.weight_row_norms(W)
        W *= (layer.lora_magnitude_vector.data / layer._merge_norm)[:, None]

    def unmerge(self, layer: Any, W: Any) -> None:
        W *= (layer._merge_norm / layer.lora_magnitude_vector.data)[:, None]
        layer._merge_norm = None
        W -= layer.delta_weight()


KINDS = {False: PlainLoRA(), True: DoRA()}
"""``use_dora`` -> the layer's kind."""


# ----- LoRA+ --------------------------------------------------------------------------------------
def loraplus_param_groups(
    model: Any,
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024): B learns ``ratio`` times faster.

    lr_B = loraplus_lr_ratio * lr_A. The paper's argument is about width, not about B's zero
    start: as the embedding dimension (width) n grows, one learning rate for A and B cannot give
    efficient feature learning (a rate small enough to keep A's contribution stable leaves B's
    updates too small to learn features); the efficient rates have lr_B / lr_A growing like n,
    hence lr_B = lambda * lr_A with lambda >> 1 (the paper's experiments use lambda = 2^4 = 16
    as a good default; PEFT has none and asks the caller for it).

    The groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``), in its order, the
    empty ones left out:

    1. every other trainable parameter (the A matrices), at ``lr``;
    2. the adapters of embeddings (``lora_embedding_A`` and ``lora_embedding_B``, both), at
       ``loraplus_lr_embedding``;
    3. every ``lora_B`` and every other 1-D trainable parameter (DoRA's magnitude m, a trained
       bias), at ``lr * loraplus_lr_ratio``.

    PEFT also sets each group's weight decay (``loraplus_weight_decay``, 0 by default); these
    groups carry none, so the optimizer's own ``weight_decay`` applies to all of them.

    Parameters
    ----------
    model : loralab.nn.Module or torch.nn.Module
        Anything with ``named_parameters()``; only parameters that require a gradient are grouped.
    lr : float
        Learning rate of A (and of every other trainable parameter of two or more dimensions).
    loraplus_lr_ratio : float, default 16
        PEFT's name for lr_B / lr_A.
    loraplus_lr_embedding : float, default 1e-6
        PEFT's name (and default) for the embedding adapters' learning rate.

    Returns
    -------
    list of dicts ``{"params": [...], "lr": ...}``, accepted by ``loralab.optim`` and ``torch.optim``.

    Examples
    --------
    >>> from loralab.nn import MLP
    >>> from loralab.lora import inject_lora
    >>> model = inject_lora(MLP([4, 8, 2], seed=0), ["0"], r=2, seed=0)
    >>> [(len(g["params"]), g["lr"]) for g in loraplus_param_groups(model, lr=1e-3)]
    [(1, 0.001), (1, 0.016)]
    """
    for name, value in (
        ("loraplus_lr_ratio", loraplus_lr_ratio),
        ("loraplus_lr_embedding", loraplus_lr_embedding),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    plain: list[Any] = []
    embedding: list[Any] = []
    fast: list[Any] = []
    has_B = False
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        has_B = has_B or "lora_B" in parts or parts[-1] == "lora_embedding_B"
        if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            embedding.append(p)
        elif "lora_B" in parts or len(p.shape) == 1:
            fast.append(p)
        else:
            plain.append(p)
    if not has_B:
        raise ValueError(
            "loraplus_param_groups: the model has no trainable lora_B or lora_embedding_B parameter"
        )
    groups = [
        {"params": plain, "lr": lr},
        {"params": embedding, "lr": loraplus_lr_embedding},
        {"params": fast, "lr": lr * loraplus_lr_ratio},
    ]
    return [g for g in groups if g["params"]]
