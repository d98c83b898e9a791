"""``LoRALinear``: a frozen Linear plus a trainable low-rank update, h = W0 x + (alpha/r) B A x."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from loralab import functional as F
from loralab.lora.config import (
    LORA_INITS,
    check_bool,
    check_dropout,
    check_init,
    check_positive_int,
    check_positive_number,
    check_rank_fits,
    lora_scaling,
)
from loralab.lora.variants import DoRALinear, olora_init, pissa_init, row_norms
from loralab.nn.layers import Linear, check_input
from loralab.nn.module import Module, Parameter, make_rng
from loralab.tensor import Tensor

__all__ = ["LoRALinear", "LORA_INITS", "validate_lora_options"]


def validate_lora_options(
    in_features: int,
    out_features: int,
    r: Any,
    alpha: Any,
    dropout: Any,
    init: Any,
    use_rslora: Any = False,
    use_dora: Any = False,
) -> None:
    """Raise a clear error for a bad LoRA hyper-parameter (shared by the NumPy and torch layers).

    The rules are `loralab.lora.config`'s (strict types, finite positive alpha, r at most
    min(in_features, out_features)); a wrong type is a TypeError, a wrong value a ValueError.
    """
    where = f"LoRALinear(in_features={in_features}, out_features={out_features})"
    check_positive_int(r, "r", where)
    check_rank_fits(int(r), in_features, out_features, where)
    check_positive_number(alpha, "alpha", where)
    check_dropout(dropout, "dropout", where)
    check_init(init, "init", where)
    check_bool(use_rslora, "use_rslora", where)
    check_bool(use_dora, "use_dora", where)


def random_A(rng: np.random.Generator, init: str, r: int, in_features: int) -> np.ndarray:
    """A's initial values, shape (r, in_features), float64: PEFT's two random inits.

    "kaiming": U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)); "gaussian": N(0, (1/r)^2).
    Shared by the NumPy and torch layers, so the same seed gives the same A in both.
    """
    if init == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        return rng.uniform(-bound, bound, size=(r, in_features))
    return rng.normal(0.0, 1.0 / r, size=(r, in_features))


class LoRALinear(Module):
    """A frozen `loralab.nn.Linear` plus a trainable rank-r update.

    $$h = W_0 x + b + \\frac{\\alpha}{r} B A x$$

    Parameters
    ----------
    base : Linear
        The pre-trained layer; kept as the field ``base`` and frozen (W0 and b get no gradient).
    r : int, default 8
        Rank of the update, 1 <= r <= min(in_features, out_features).
    alpha : float, default 16
        The scaling numerator: scaling = alpha / r (alpha / sqrt(r) with ``use_rslora``).
    dropout : float in [0, 1), default 0.0
        Dropout on the LoRA branch's input (training mode only), as in PEFT.
    init : "kaiming", "gaussian", "pissa" or "olora"
        A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform with a=sqrt(5)), or A ~ N(0, (1/r)^2)
        (PEFT's "gaussian"); B = 0 either way, so ΔW = 0 at first. "pissa" and "olora" instead
        put the top-r singular part (PiSSA) or the first r QR columns (OLoRA) of W0 into A and B
        and keep the residual W0 - s B A frozen in ``base.weight`` (see
        `loralab.lora.variants`); the layer's output is unchanged at initialisation.
    use_rslora : bool, default False
        Rank-stabilised scaling alpha / sqrt(r).
    use_dora : bool, default False
        DoRA: a trainable magnitude m per output row, W' = m * (W0 + s B A) / ||W0 + s B A||_row,
        the norm held constant in the backward; m starts at ||W0 + s B A||_row.
    seed, rng : source of A's initial values and of the dropout masks.

    Attributes
    ----------
    lora_A : Parameter of shape (r, in_features)
    lora_B : Parameter of shape (out_features, r)
    lora_magnitude_vector : Parameter of shape (out_features,), only with ``use_dora``
    scaling : float
    merged : bool
        Whether ΔW is currently added into ``base.weight``.

    Examples
    --------
    >>> from loralab.nn import Linear
    >>> layer = LoRALinear(Linear(6, 4, seed=0), r=2, alpha=4, seed=1)
    >>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling
    ((2, 6), (4, 2), 2.0)
    """

    def __init__(
        self,
        base: Linear,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ):
        if not isinstance(base, Linear):
            raise TypeError(
                f"LoRALinear: base must be a loralab.nn.Linear, got {type(base).__name__}"
            )
        validate_lora_options(
            base.in_features, base.out_features, r, alpha, dropout, init, use_rslora, use_dora
        )
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.init, self.use_rslora, self.use_dora = init, bool(use_rslora), bool(use_dora)
        self.scaling = lora_scaling(self.alpha, self.r, self.use_rslora)
        self.rng = make_rng(seed, rng)
        dtype = base.weight.dtype
        B = np.zeros((self.out_features, self.r), dtype=dtype)
        if init in ("kaiming", "gaussian"):
            A = random_A(self.rng, init, self.r, self.in_features)
        else:  # the principal part of W0 moves into the adapter; the residual stays frozen
            split = pissa_init if init == "pissa" else olora_init
            A, B, base.weight.data = split(base.weight.data, self.r, self.scaling)
        self.lora_A = Parameter(A.astype(dtype))
        self.lora_B = Parameter(B)
        if self.use_dora:
            m = row_norms(base.weight.data, self.lora_A.data, B, self.scaling)
            self.lora_magnitude_vector = Parameter(m.astype(dtype))
        self.merged = False
        self._merge_norm: np.ndarray | None = None

    @property
    def weight(self) -> Parameter:
        """The base weight W0 (ΔW included while merged)."""
        return self.base.weight

    @property
    def bias(self) -> Parameter | None:
        return self.base.bias

    def delta_weight(self) -> np.ndarray:
        """ΔW = scaling * B A, an ndarray of shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.data @ self.lora_A.data)

    def merge(self) -> None:
        """Add ΔW into W0 in place, so inference costs exactly one matmul (no extra latency).

        With DoRA the merged weight is m * (W0 + ΔW) / ||W0 + ΔW||_row; the norm is kept for
        `unmerge`.
        """
        if self.merged:
            raise ValueError(
                "LoRALinear.merge(): the layer is already merged; call unmerge() first"
            )
        W = self.base.weight.data
        if self.use_dora:
            W += self.delta_weight().astype(W.dtype)
            self._merge_norm = np.linalg.norm(W, axis=1)
            W *= (self.lora_magnitude_vector.data / self._merge_norm)[:, None]
        else:
            W += self.delta_weight().astype(W.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW from W0 again, restoring the pre-trained weight (up to round-off)."""
        if not self.merged:
            raise ValueError("LoRALinear.unmerge(): the layer is not merged; nothing to unmerge")
        W = self.base.weight.data
        if self.use_dora:
            W *= (self._merge_norm / self.lora_magnitude_vector.data)[:, None]
            self._merge_norm = None
        W -= self.delta_weight().astype(W.dtype)
        self.merged = False

    def forward(self, x: Any) -> Tensor:
        """x of shape (..., in_features) -> h of shape (..., out_features) via the fused op."""
        x = check_input(
            f"LoRALinear(in_features={self.in_features}, out_features={self.out_features}, r={self.r})",
            x,
            self.in_features,
        )
        W0, b = self.base.weight, self.base.bias
        if self.merged:
            return F.linear(x, W0, b)
        mask = None
        if self.training and self.dropout > 0.0:
            mask = F.dropout_mask(x.shape, self.dropout, self.rng, x.dtype)
        if self.use_dora:
            return DoRALinear.apply(
                x,
                W0,
                b,
                self.lora_A,
                self.lora_B,
                self.lora_magnitude_vector,
                scaling=self.scaling,
                mask=mask,
            )
        return F.LoRALinear.apply(
            x, W0, b, self.lora_A, self.lora_B, scaling=self.scaling, mask=mask
        )

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        rs += ", use_dora=True" if self.use_dora else ""
        rs += f", init={self.init!r}" if self.init in ("pissa", "olora") else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, dropout={self.dropout:g}{rs}, merged={self.merged}"
        )
