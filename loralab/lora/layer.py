"""`LoRALinear`: a frozen linear base plus a trainable rank-r update, and the Functions it runs.

    h = base(x) + s B A dropout(x)          (the paper's h = W0 x + (alpha / r) B A x)

with A of shape (r, in), B of shape (out, r) and s = alpha / r (alpha / sqrt(r) for rsLoRA).

Shared by both backends
-----------------------
`LoRALayerMixin` holds everything the NumPy layer here and the torch layer
(`loralab.torch.layers.LoRALinear`) have in common: validation, the options, initialisation (in
NumPy, so both start from the same values bit for bit), ΔW, merging, unmerging and the repr. A
backend adds its parameters, dropout masks and forward Functions (`LoRALinearFn`, `DoRALinearFn`,
`LoRABranchFn` here, each a thin wrapper over `loralab.lora.ops`).

Base layers (the interface a quantized base implements)
-------------------------------------------------------
A LoRALinear wraps a *linear-like* module of a type registered with `register_linear_type`
(`loralab.nn.Linear` is registered; `loralab.quant.Linear4bit` registers itself). Such a base has

- ``in_features``, ``out_features``: ints;
- ``forward(x)``: (..., in_features) -> (..., out_features), differentiable with respect to x;
- ``requires_grad_(flag)``: a loralab Module's, to freeze it;
- optionally ``add_delta_(delta)``: add ΔW, an ndarray of shape (out_features, in_features), into
  its W0 in place (returning anything). ``merge``/``unmerge`` call it; without it they refuse;
- optionally ``compute_dtype``: the NumPy dtype of its outputs, given to A and B (float32 if absent).

A plain `loralab.nn.Linear` runs the whole layer through the fused `LoRALinearFn` (or DoRA's).
Any other base runs ``base(x) + LoRABranchFn(x, A, B)``: the base computes its own part (e.g. by
dequantizing W0), and the branch's hand-derived backward gives dx, dA and dB. DoRA, PiSSA and OLoRA
need W0 itself, so they are refused on such a base.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loralab import functional as F
from loralab._validate import boolean, positive_int, probability
from loralab.lora.config import (
    check_rank_fits,
    lora_init,
    lora_scaling,
    positive_number,
)
from loralab.lora.ops import (
    branch_backward,
    branch_forward,
    dora_backward,
    dora_forward,
    lora_backward,
    lora_backward_dW0,
    lora_forward,
)
from loralab.lora.variants import INITS, KINDS
from loralab.nn.layers import Linear, check_input
from loralab.nn.module import Module, Parameter, make_rng
from loralab.tensor import Function, Tensor, as_tensor

__all__ = [
    "LoRALinear",
    "LoRALayerMixin",
    "LoRALinearFn",
    "DoRALinearFn",
    "LoRABranchFn",
    "lora_linear",
    "LINEAR_TYPES",
    "register_linear_type",
    "validate_lora_options",
]

LINEAR_TYPES: list[type] = [Linear]
"""The module types `LoRALinear` wraps and `inject_lora` targets (see `register_linear_type`)."""


def register_linear_type(cls: type) -> type:
    """Let `LoRALinear` wrap modules of type ``cls`` and `loralab.lora.inject_lora` target them.

    ``cls`` must be a `loralab.nn.Module` with the base interface of this module's docstring.
    Usable as a class decorator; registering twice is harmless.
    """
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"register_linear_type: expected a loralab.nn.Module class, got {cls!r}")
    if cls not in LINEAR_TYPES:
        LINEAR_TYPES.append(cls)
    return cls


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
    """Raise a clear error for a bad LoRA option (shared by the NumPy and torch layers).

    A wrong type is a TypeError, a wrong value a ValueError; alpha must be finite and positive;
    r at most min(in_features, out_features) (`loralab.lora.config.check_rank_fits`).
    """
    where = f"LoRALinear(in_features={in_features}, out_features={out_features})"
    positive_int("r", r, where)
    check_rank_fits(int(r), in_features, out_features, where)
    positive_number("alpha", alpha, where)
    probability("dropout", dropout, where)
    lora_init("init", init, where)
    boolean("use_rslora", use_rslora, where)
    boolean("use_dora", use_dora, where)


class LoRALayerMixin:
    """What the NumPy and torch `LoRALinear` share; a backend class supplies

    - ``_weight_array(base)``: W0 as an ndarray (out, in), or None for a base without a plain W0;
    - ``_set_weight(array)``: replace W0 (by PiSSA's or OLoRA's residual);
    - ``_parameter(array)``: a trainable parameter holding ``array``, on W0's device;
    - ``weight_row_norms(W)``: ||W||_row, shape (out,) (DoRA's merge).
    """

    base: Any
    lora_A: Any
    lora_B: Any
    in_features: int
    out_features: int
    r: int
    alpha: float
    dropout: float
    init: str
    use_rslora: bool
    use_dora: bool
    scaling: float
    merged: bool
    plain_base: bool
    _merge_norm: Any

    def _weight_array(self, base: Any) -> np.ndarray | None:
        raise NotImplementedError

    def _set_weight(self, array: np.ndarray) -> None:
        raise NotImplementedError

    def _parameter(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def weight_row_norms(self, W: Any) -> Any:
        raise NotImplementedError

    def _init_lora(
        self,
        base: Any,
        rng: np.random.Generator,
        r: Any,
        alpha: Any,
        dropout: Any,
        init: Any,
        use_rslora: Any,
        use_dora: Any,
    ) -> None:
        """Validate the options (the layer's keywords), freeze ``base``, then create A, B (and DoRA's m)."""
        validate_lora_options(
            base.in_features, base.out_features, r, alpha, dropout, init, use_rslora, use_dora
        )
        W0 = self._weight_array(base)
        if W0 is None and (use_dora or INITS[init].moves_W0):
            raise ValueError(
                f"LoRALinear: use_dora={use_dora}, init={init!r} need W0 itself, which a "
                f"{type(base).__name__} base does not hold; use init='kaiming' or 'gaussian' without DoRA"
            )
        base.requires_grad_(False)
        self.base = base
        self.plain_base = W0 is not None  # W0 is a plain weight: the fused Functions run
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.init, self.use_rslora, self.use_dora = init, bool(use_rslora), bool(use_dora)
        self.scaling = lora_scaling(self.alpha, self.r, self.use_rslora)
        shape = (self.out_features, self.in_features)
        A, B, residual = INITS[init](W0, self.r, self.scaling, rng, shape)
        if residual is not None:  # the principal part of W0 moved into A and B
            self._set_weight(residual)
            W0 = residual
        dtype = W0.dtype if W0 is not None else np.dtype(getattr(base, "compute_dtype", np.float32))
        # Cast in NumPy first, so float32 values agree bit for bit between the backends.
        A, B = A.astype(dtype), B.astype(dtype)
        self.lora_A = self._parameter(A)
        self.lora_B = self._parameter(B)
        for name, value in self.kind.extra_parameters(W0, A, B, self.scaling).items():
            setattr(self, name, self._parameter(value))
        self._merge_norm = None
        self.merged = False

    @property
    def kind(self) -> Any:
        """The layer's kind, `loralab.lora.variants.KINDS[use_dora]`: plain LoRA or DoRA."""
        return KINDS[self.use_dora]

    @property
    def weight(self) -> Any:
        """The base weight W0 (ΔW included while merged)."""
        return self.base.weight

    @property
    def bias(self) -> Any:
        return self.base.bias

    def delta_weight(self) -> Any:
        """ΔW = scaling * B A, of shape (out_features, in_features), outside any graph."""
        return self.scaling * (self.lora_B.data @ self.lora_A.data)

    def merge(self) -> None:
        """Add ΔW into W0 in place, so inference costs exactly one matmul (no extra latency).

        With DoRA the merged weight is m * (W0 + ΔW) / ||W0 + ΔW||_row; the norm is kept for
        `unmerge`. A base without a plain W0 merges through its ``add_delta_``.
        """
        if self.merged:
            raise ValueError(
                "LoRALinear.merge(): the layer is already merged; call unmerge() first"
            )
        self._move_delta(into_base=True)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW from W0 again, restoring the pre-trained weight (up to round-off)."""
        if not self.merged:
            raise ValueError("LoRALinear.unmerge(): the layer is not merged; nothing to unmerge")
        self._move_delta(into_base=False)
        self.merged = False

    def _move_delta(self, into_base: bool) -> None:
        if self.plain_base:
            W = self.base.weight.data
            self.kind.merge(self, W) if into_base else self.kind.unmerge(self, W)
            return
        add = getattr(self.base, "add_delta_", None)
        if add is None:
            raise TypeError(
                f"LoRALinear.merge(): a {type(self.base).__name__} base has no add_delta_, so ΔW "
                "cannot be merged into it"
            )
        delta = np.asarray(self.delta_weight())
        add(delta if into_base else -delta)

    def _describe(self) -> str:
        return (
            f"LoRALinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.r})"
        )

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        rs += ", use_dora=True" if self.use_dora else ""
        rs += f", init={self.init!r}" if INITS[self.init].moves_W0 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, dropout={self.dropout:g}{rs}, merged={self.merged}"
        )


# ----- the Functions --------------------------------------------------------------------------------
class LoRALinearFn(Function):
    """``y = x W0^T + b + s ((x * mask) A^T) B^T`` with the hand-derived backward of
    `loralab.lora.ops.lora_backward`; dW0 is formed only if W0 requires a gradient."""

    @staticmethod
    def forward(ctx, x, W0, b, A, B, scaling, mask):
        y, cache = lora_forward(x, W0, b, A, B, scaling, mask)
        ctx.save_for_backward(cache)
        return y

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved
        need_x, need_W0, need_b = ctx.needs_input_grad[:3]
        dx, dA, dB, db = lora_backward(grad, cache, need_dx=need_x)
        dW0 = lora_backward_dW0(grad, cache) if need_W0 else None
        return dx, dW0, db if need_b else None, dA, dB


class DoRALinearFn(Function):
    """DoRA's layer over (x, W0, b, A, B, m) (`loralab.lora.ops.dora_forward`); W0 gets no gradient."""

    @staticmethod
    def forward(ctx, x, W0, b, A, B, m, scaling, mask):
        y, cache = dora_forward(x, W0, b, A, B, m, scaling, mask)
        ctx.save_for_backward(cache, b is not None)
        return y

    @staticmethod
    def backward(ctx, grad):
        cache, has_bias = ctx.saved
        need = ctx.needs_input_grad
        dx, dA, dB, dm, db = dora_backward(grad, cache, need_dx=need[0])
        return dx, None, db if has_bias and need[2] else None, dA, dB, dm


class LoRABranchFn(Function):
    """The LoRA branch alone over (x, A, B): ``s ((x * mask) A^T) B^T`` (`loralab.lora.ops.branch_forward`)."""

    @staticmethod
    def forward(ctx, x, A, B, scaling, mask):
        z, cache = branch_forward(x, A, B, scaling, mask)
        ctx.save_for_backward(cache)
        return z

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved
        dx, dA, dB = branch_backward(grad, cache, need_dx=ctx.needs_input_grad[0])
        return dx, dA, dB


_FUNCTIONS = {"lora": LoRALinearFn, "dora": DoRALinearFn}  # the layer's kind -> its fused Function


def _data(t: Any) -> np.ndarray:
    return t.data if isinstance(t, Tensor) else np.asarray(t)


def lora_linear(
    x: Any,
    W0: Any,
    b: Any,
    A: Any,
    B: Any,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
) -> Tensor:
    """The fused LoRA linear op: ``y = x W0^T + b + s ((x * mask) A^T) B^T``.

    Parameters
    ----------
    x : Tensor of shape (..., in)
    W0 : Tensor of shape (out, in)
        Frozen base weight; its gradient is computed only if it requires one.
    b : Tensor of shape (out,) or None
    A : Tensor of shape (r, in)
    B : Tensor of shape (out, r)
    scaling : float
        s = alpha / r.
    dropout_mask : ndarray of shape (..., in), optional
        Dropout mask for the LoRA branch's input, already divided by (1 - p).

    Returns
    -------
    Tensor of shape (..., out)
    """
    w_shape, a_shape = np.shape(_data(W0)), np.shape(_data(A))
    if len(w_shape) != 2:
        raise ValueError(f"lora_linear: expected W0 of shape (out, in), got {w_shape}")
    out, in_ = w_shape
    if len(a_shape) != 2 or a_shape[1] != in_:
        raise ValueError(
            f"lora_linear(in={in_}, out={out}): expected A of shape (r, {in_}), got {a_shape}"
        )
    r = a_shape[0]
    what = f"lora_linear(in={in_}, out={out}, r={r})"
    x_shape = np.shape(_data(x))
    if len(x_shape) == 0 or x_shape[-1] != in_:
        raise ValueError(f"{what}: expected x of shape (..., {in_}), got {x_shape}")
    if np.shape(_data(B)) != (out, r):
        raise ValueError(f"{what}: expected B of shape ({out}, {r}), got {np.shape(_data(B))}")
    if b is not None and np.shape(_data(b)) != (out,):
        raise ValueError(f"{what}: expected b of shape ({out},), got {np.shape(_data(b))}")
    if dropout_mask is not None and dropout_mask.shape != x_shape:
        raise ValueError(
            f"{what}: expected dropout_mask of shape {x_shape}, got {dropout_mask.shape}"
        )
    return LoRALinearFn.apply(as_tensor(x), W0, b, A, B, scaling=float(scaling), mask=dropout_mask)


# ----- the NumPy layer ------------------------------------------------------------------------------
class LoRALinear(LoRALayerMixin, Module):
    """A frozen linear base plus a trainable rank-r update.

    $$h = W_0 x + b + \\frac{\\alpha}{r} B A x$$

    Parameters
    ----------
    base : Linear (or a registered linear-like module, see the module docstring)
        The pre-trained layer; kept as the field ``base`` and frozen (W0 and b get no gradient).
    r : int, default 8
        Rank of the update, 1 <= r <= min(in_features, out_features).
    alpha : float, default 16
        The scaling numerator, finite and positive: scaling = alpha / r (alpha / sqrt(r) with
        ``use_rslora``).
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
        base: Any,
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
        if not isinstance(base, tuple(LINEAR_TYPES)):
            raise TypeError(
                f"LoRALinear: base must be a loralab.nn.Linear, got {type(base).__name__} "
                "(other linear-like types: loralab.lora.register_linear_type)"
            )
        super().__init__()
        self.rng = make_rng(seed, rng)
        self._init_lora(base, self.rng, r, alpha, dropout, init, use_rslora, use_dora)

    def _weight_array(self, base: Any) -> np.ndarray | None:
        return base.weight.data if isinstance(base, Linear) else None

    def _set_weight(self, array: np.ndarray) -> None:
        self.base.weight.data = array

    def _parameter(self, array: np.ndarray) -> Parameter:
        return Parameter(array)

    def weight_row_norms(self, W: np.ndarray) -> np.ndarray:
        return np.linalg.norm(W, axis=1)

    def forward(self, x: Any) -> Tensor:
        """x of shape (..., in_features) -> h of shape (..., out_features)."""
        x = check_input(self._describe(), x, self.in_features)
        if self.merged:
            return self.base(x)
        mask = None
        if self.training and self.dropout > 0.0:
            mask = F.dropout_mask(x.shape, self.dropout, self.rng, x.dtype)
        if not self.plain_base:
            branch = LoRABranchFn.apply(
                x, self.lora_A, self.lora_B, scaling=self.scaling, mask=mask
            )
            return self.base(x) + branch
        extra = [getattr(self, name) for name in self.kind.extra_names]
        W0, b = self.base.weight, self.base.bias
        fn = _FUNCTIONS[self.kind.name]
        return fn.apply(x, W0, b, self.lora_A, self.lora_B, *extra, scaling=self.scaling, mask=mask)
