"""``LoRALinear`` in PyTorch, with the same hand-derived backward as the NumPy fused op.

`LoRALinearFunction` is `loralab.lora.ops` written in torch: a
``torch.autograd.Function`` whose backward forms dx, dA, dB and db but never dW0 = dy^T x
unless W0 itself asks for a gradient. That skipped (out, in) matmul is what a real framework
saves under LoRA too.

Base layers: as on the NumPy side (`loralab.lora.linear_shared`'s docstring), a LoRALinear wraps a
``torch.nn.Linear`` or a *linear-like* module registered with `register_linear_type` (the 4-bit
`loralab.torch.quant.Linear4bit` registers itself: that is QLoRA). A plain Linear runs the whole
layer through the fused `LoRALinearFunction`; any other base runs ``base(x) + LoRABranchFunction(x,
A, B)``, the base computing its own part (dequantizing W0). Merging goes through the base's
``add_delta_`` (or is refused); DoRA, PiSSA and OLoRA need W0 itself and are refused there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loralab._validate import boolean
from loralab.functional import dropout_mask
from loralab.lora.grouped import RowGroups
from loralab.lora.linear_shared import (
    DEFAULT_ADAPTER,
    AdapterMixin,
    LoRALayerMixin,
    check_mixed_rows,
)
from loralab.nn.module import make_rng
from loralab.torch.grouped import grouped_lora
from loralab.torch.stacked import TorchAdapterStack, stack_parameters
from loralab.torch.variants import DoRALinearFunction

__all__ = [
    "LoRALinear",
    "LoRAAdapter",
    "LoRALinearFunction",
    "LoRABranchFunction",
    "LINEAR_TYPES",
    "register_linear_type",
    "numpy_dtype",
]

LINEAR_TYPES: list[type] = [torch.nn.Linear]
"""The torch module types `LoRALinear` wraps (see `register_linear_type`)."""


def register_linear_type(cls: type) -> type:
    """Let the torch `LoRALinear` wrap modules of type ``cls`` (the twin of
    `loralab.lora.register_linear_type`).

    ``cls`` must be a ``torch.nn.Module`` with ``in_features``, ``out_features``, a forward
    (..., in_features) -> (..., out_features) differentiable in x, and optionally ``add_delta_``
    and ``compute_dtype`` (see `loralab.lora.linear_shared`). Usable as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"register_linear_type: expected a torch.nn.Module class, got {cls!r}")
    if cls not in LINEAR_TYPES:
        LINEAR_TYPES.append(cls)
    return cls


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype (``torch.float64`` -> ``float64``)."""
    return torch.empty((), dtype=dtype).numpy().dtype


class LoRALinearFunction(torch.autograd.Function):
    """``y = x W0^T + b + s ((x * mask) A^T) B^T`` with the backward derived by hand.

    With u = x_d A^T and g = dy B (x_d = x * mask, or x without dropout)::

        dx = dy W0 + s (g A) * mask     dA = s g^T x_d     dB = s dy^T u     db = sum dy

    and dW0 = dy^T x only when W0 requires a gradient (``ctx.needs_input_grad[1]``).

    Inputs (to ``apply``)
    ---------------------
    x : Tensor of shape (..., in)
    W0 : Tensor of shape (out, in)
    b : Tensor of shape (out,) or None
    A : Tensor of shape (r, in)
    B : Tensor of shape (out, r)
    scaling : float
    mask : Tensor of shape (..., in) or None
        Dropout mask for the LoRA branch's input, already divided by (1 - p).

    Returns
    -------
    Tensor of shape (..., out)
    """

    @staticmethod
    def forward(ctx, x, W0, b, A, B, scaling, mask):
        batch_shape = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if mask is None else (x * mask).reshape(x2.shape)
        u = xd2 @ A.T  # (N, r)
        y = x2 @ W0.T
        y += scaling * (u @ B.T)
        if b is not None:
            y += b
        ctx.save_for_backward(x2, xd2, u, W0, A, B, mask)
        ctx.scaling, ctx.batch_shape = scaling, batch_shape
        return y.reshape(*batch_shape, W0.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, xd2, u, W0, A, B, mask = ctx.saved_tensors
        need_x, need_W0, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        g = dy2 @ B  # (N, r)
        dA = s * (g.T @ xd2) if need_A else None
        dB = s * (dy2.T @ u) if need_B else None
        db = dy2.sum(dim=0) if need_b else None
        dW0 = dy2.T @ x2 if need_W0 else None  # full fine-tuning only: LoRA never needs it
        dx = None
        if need_x:
            branch = s * (g @ A)  # (N, in)
            if mask is not None:
                branch = (branch.reshape(mask.shape) * mask).reshape(branch.shape)
            dx = dy2 @ W0
            dx += branch
            dx = dx.reshape(*ctx.batch_shape, W0.shape[1])
        return dx, dW0, db, dA, dB, None, None


class LoRABranchFunction(torch.autograd.Function):
    """The LoRA branch alone, ``z = s ((x * mask) A^T) B^T``, for a base that computes its own part.

    The torch twin of `loralab.lora.ops.branch_forward` / `branch_backward`. With u = x_d A^T and
    g = dz B::

        dx = s (g A) * mask        dA = s g^T x_d        dB = s dz^T u

    Inputs (to ``apply``): x (..., in), A (r, in), B (out, r), scaling (float), mask (..., in) or
    None. Returns z of shape (..., out).
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling, mask):
        xd = x if mask is None else x * mask
        xd2 = xd.reshape(-1, x.shape[-1])
        u = xd2 @ A.T  # (N, r)
        z = scaling * (u @ B.T)
        ctx.save_for_backward(xd2, u, A, B, mask)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return z.reshape(*x.shape[:-1], B.shape[0])

    @staticmethod
    def backward(ctx, dz):
        xd2, u, A, B, mask = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        s = ctx.scaling
        dz2 = dz.reshape(-1, dz.shape[-1])
        g = dz2 @ B  # (N, r)
        dA = s * (g.T @ xd2) if need_A else None
        dB = s * (dz2.T @ u) if need_B else None
        dx = None
        if need_x:
            dx = (s * (g @ A)).reshape(ctx.x_shape)
            if mask is not None:
                dx = dx * mask
        return dx, dA, dB, None, None


class LoRALinear(LoRALayerMixin, torch.nn.Module):
    """A frozen linear base plus a trainable rank-r update: h = W0 x + b + (alpha/r) B A x.

    The twin of `loralab.lora.LoRALinear`, sharing its code (`loralab.lora.linear_shared.LoRALayerMixin`:
    options, validation messages, initialisation, merging, repr): same parameter names
    (``base.weight``, ``base.bias``, ``lora_A``, ``lora_B``, ``lora_magnitude_vector``) and, for
    the same ``seed``, the same initial A, B, residual W0 and magnitude, bit for bit.

    Parameters
    ----------
    base : torch.nn.Linear, or a registered linear-like module
        The pre-trained layer; kept as the field ``base`` and frozen. A
        `loralab.torch.quant.Linear4bit` base makes the layer QLoRA's (A and B in float32,
        ``base(x) + LoRABranchFunction(x, A, B)``; no DoRA, PiSSA or OLoRA).
    r, alpha, dropout, init, use_rslora, use_dora
        As in `loralab.lora.LoRALinear`.
    use_custom_backward : bool, default True
        Run through `LoRALinearFunction` (or `loralab.torch.variants.DoRALinearFunction`),
        whose backward is derived by hand and forms no dW0, or, when False, through plain autograd
        on ``linear`` calls. Both give the same gradients.
    seed, rng : int or numpy.random.Generator, optional
        Source of A's initial values, drawn exactly as the NumPy layer draws them.
    generator : torch.Generator, optional
        Source of the dropout masks (torch's default generator when omitted).

    Attributes
    ----------
    lora_A, lora_B, lora_magnitude_vector, scaling, merged
        As in `loralab.lora.LoRALinear` (torch Parameters and tensors here).
    mask_rng : numpy.random.Generator or None
        When set, dropout masks are drawn from it with `loralab.functional.dropout_mask`,
        exactly as the NumPy layer draws them (see `loralab.torch.shared_dropout_masks`).

    Examples
    --------
    >>> layer = LoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4, seed=1)
    >>> tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.scaling
    ((2, 6), (4, 2), 2.0)
    """

    def __init__(
        self,
        base: torch.nn.Module,
        *,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        use_custom_backward: bool = True,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(base, tuple(LINEAR_TYPES)):
            raise TypeError(
                f"LoRALinear: base must be a torch.nn.Linear, got {type(base).__name__} "
                "(other linear-like types: loralab.torch.layers.register_linear_type)"
            )
        super().__init__()
        # ||W0 + ΔW||_row while a DoRA layer is merged (for unmerge); moves with .to(), not saved.
        self.register_buffer("_merge_norm", None, persistent=False)
        self.use_custom_backward = boolean("use_custom_backward", use_custom_backward, "LoRALinear")
        self.generator = generator
        self.mask_rng: np.random.Generator | None = None
        np_rng = make_rng(seed, rng)
        self._init_lora(base, np_rng, r, alpha, dropout, init, use_rslora, use_dora, adapter_name)

    def _weight_array(self, base: Any) -> np.ndarray | None:
        if isinstance(base, torch.nn.Linear):
            return base.weight.detach().cpu().numpy()
        return None  # a linear-like base (a 4-bit W0) holds no plain weight

    def _device(self) -> torch.device:
        """The device of the base's tensors (a Linear's weight, a Linear4bit's codes)."""
        for t in (*self.base.parameters(), *self.base.buffers()):
            return t.device
        return torch.device("cpu")

    def _set_weight(self, array: np.ndarray) -> None:
        W = self.base.weight
        with torch.no_grad():
            W.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(W.device))

    def _parameter(self, array: np.ndarray) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.from_numpy(array).to(self._device()))

    def weight_row_norms(self, W: torch.Tensor) -> torch.Tensor:
        """||W||_row: the norm of each row of W (out, in), shape (out,) (DoRA's norm)."""
        return torch.linalg.norm(W, dim=1)

    def _new_adapter(self) -> LoRAAdapter:
        return LoRAAdapter()

    def _norm_from(self, norm: np.ndarray) -> torch.Tensor:
        return torch.tensor(norm, device=self._device())

    def _new_adapter_dict(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict()

    def _dropout_mask(self, x: torch.Tensor, p: float | None = None) -> torch.Tensor:
        """Inverted-dropout mask of x's shape: 0 with probability p, else 1 / (1 - p)."""
        p = self.dropout if p is None else p
        if self.mask_rng is not None:
            mask = dropout_mask(tuple(x.shape), p, self.mask_rng, numpy_dtype(x.dtype))
            return torch.from_numpy(mask).to(x.device)
        device = self.generator.device if self.generator is not None else x.device
        u = torch.rand(x.shape, generator=self.generator, dtype=x.dtype, device=device)
        return ((u >= p).to(x.dtype) / (1.0 - p)).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x of shape (..., in_features) -> h of shape (..., out_features)."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._describe()}: expected x of shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        route, what = self.forward_plan()
        if route == "base":
            return self.base(x)
        if route == "mixed":
            return self._mixed_forward(x, *what)
        holders = [what] if route == "one" else what
        masks = [
            self._dropout_mask(x, h.dropout) if self.training and h.dropout > 0.0 else None
            for h in holders
        ]
        if route == "sum" or not self.plain_base:
            y = self.base(x)
            for h, mask in zip(holders, masks, strict=True):
                y = y + self._branch(h, x, mask)
            return y
        h, mask = holders[0], masks[0]
        W0, b, A, B, s = self.base.weight, self.base.bias, h.lora_A, h.lora_B, h.scaling
        extra = [getattr(h, name) for name in h.kind.extra_names]
        if self.use_custom_backward:
            return _FUNCTIONS[h.kind.name].apply(x, W0, b, A, B, *extra, s, mask)
        autograd = {"lora": self._lora_autograd, "dora": self._dora_autograd}[h.kind.name]
        return autograd(h, x, W0, b, *extra, mask)

    def _mixed_forward(self, x: torch.Tensor, groups: RowGroups, holders: list) -> torch.Tensor:
        """base(x) + the grouped op (`loralab.torch.grouped`): the batch's rows, sorted by adapter
        once for every layer (``groups``, one segment per holder), each through its own adapter."""
        check_mixed_rows(self._describe(), groups.order.size, tuple(x.shape))
        if not holders:  # no row uses an adapter of this layer
            return self.base(x)
        if self.training and any(h.dropout > 0.0 for h in holders):
            raise ValueError(
                f"{self._describe()}: a mixed batch runs without dropout; call model.eval() or use "
                "adapters with dropout=0"
            )
        return grouped_lora(x, groups, holders, self._stacked(holders), out=self.base(x))

    def _stacked(self, holders: list[Any]) -> tuple[TorchAdapterStack, range | list[int]] | None:
        """Every adapter of this layer stacked in name order (`loralab.torch.stacked`: built
        once, then reused while the adapters' parameters hold their slices), and the slot of
        each of ``holders``; None when the adapters differ in rank, dtype or device.

        ``holders`` come in the batch's order (by name, `forward_plan`): when they are all of
        the layer's adapters, they are the stack's order and every slot is theirs.
        """
        slots: range | list[int] = range(len(holders))
        everyone = holders
        if len(holders) != len(self.adapter_names):  # the batch uses some: stack them all
            everyone = self.holders(sorted(self.adapter_names))
            where = {id(h): k for k, h in enumerate(everyone)}
            slots = [where[id(h)] for h in holders]
        stack = stack_parameters(
            [h.lora_A for h in everyone],
            [h.lora_B for h in everyone],
            [h.scaling for h in everyone],
            self.__dict__.get("_adapter_stack"),
        )
        object.__setattr__(self, "_adapter_stack", stack)  # not a parameter or buffer
        return None if stack is None else (stack, slots)

    def _branch(self, h: Any, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One adapter's s ((x * mask) A^T) B^T, by the hand backward or by plain autograd."""
        if self.use_custom_backward:
            return LoRABranchFunction.apply(x, h.lora_A, h.lora_B, h.scaling, mask)
        xd = x if mask is None else x * mask
        return h.scaling * F.linear(F.linear(xd, h.lora_A), h.lora_B)

    @staticmethod
    def _lora_autograd(h, x, W0, b, mask):
        """LoRA through plain autograd: x W0^T + b + s ((x * mask) A^T) B^T."""
        xd = x if mask is None else x * mask
        return F.linear(x, W0, b) + h.scaling * F.linear(F.linear(xd, h.lora_A), h.lora_B)

    @staticmethod
    def _dora_autograd(h, x, W0, b, m, mask):
        """DoRA through plain autograd, PEFT's formula: the norm detached, the undropped x in the frozen path.

        y = x W0^T + b + (c - 1) (x_d W0^T) + c s (x_d A^T) B^T,  c = m / ||W0 + s B A||_row.
        """
        A, B, s = h.lora_A, h.lora_B, h.scaling
        norm = torch.linalg.norm(W0 + s * (B @ A), dim=1).detach()
        c = m / norm
        xd = x if mask is None else x * mask
        y = c * (F.linear(xd, W0) + s * F.linear(F.linear(xd, A), B))
        if mask is not None:
            y = y + F.linear(x - xd, W0)
        return y if b is None else y + b


class LoRAAdapter(AdapterMixin, torch.nn.Module):
    """A second (third ...) adapter of a torch `LoRALinear`: its A, B (m) and options."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_merge_norm", None, persistent=False)

    def weight_row_norms(self, W: torch.Tensor) -> torch.Tensor:
        """||W||_row: the norm of each row of W (out, in), shape (out,) (DoRA's norm)."""
        return torch.linalg.norm(W, dim=1)


_FUNCTIONS = {"lora": LoRALinearFunction, "dora": DoRALinearFunction}  # kind -> hand backward
