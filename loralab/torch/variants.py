"""The LoRA variants in torch, twins of :mod:`loralab.lora.variants` (same formulas, same names).

- :class:`DoRALinearFunction`: DoRA's layer with the hand-derived backward (norm held constant);
- :func:`principal_init`: PiSSA / OLoRA initialisation of a ``torch.nn.Linear`` (computed by the
  NumPy functions in float64, so both worlds start from the same A, B and residual W0);
- :func:`dora_magnitude`: DoRA's initial magnitude ||W0 + s B A||_row;
- LoRA+ needs nothing torch-specific: :func:`loralab.lora.variants.loraplus_param_groups` returns
  groups that ``torch.optim`` accepts.
"""

from __future__ import annotations

import numpy as np
import torch

from loralab.lora.variants import loraplus_param_groups, olora_init, pissa_init, row_norms

__all__ = ["DoRALinearFunction", "principal_init", "dora_magnitude", "loraplus_param_groups"]


def dora_magnitude(
    W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W0 + s B A|| of each row, shape (out,), outside the graph, in W0's dtype and device.

    Computed by the NumPy `loralab.lora.variants.row_norms` (then cast to W0's dtype, as the
    NumPy layer does), so a torch layer starts with the NumPy layer's magnitude bit for bit.
    """
    arrays = [t.detach().cpu().numpy() for t in (W0, A, B)]
    m = row_norms(*arrays, scaling).astype(arrays[0].dtype)
    return torch.from_numpy(m).to(device=W0.device)


class DoRALinearFunction(torch.autograd.Function):
    """``y = c * (x_d W0^T + s (x_d A^T) B^T) + b (+ (x - x_d) W0^T)``, c = m / ||W0 + s B A||_row.

    The backward, as in :func:`loralab.lora.variants.dora_backward`: with z the bracket and
    g = c * dy, dm = sum(dy * z) / ||.||, dB = s g^T u, dA = s (g B)^T x_d and
    dx = g W0 + s (g B) A (times the mask), plus dy W0 (1 - mask) with dropout. No dW0.
    """

    @staticmethod
    def forward(ctx, x, W0, b, A, B, m, scaling, mask):
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if mask is None else (x * mask).reshape(x2.shape)
        u = xd2 @ A.T
        z = xd2 @ W0.T + scaling * (u @ B.T)
        norm = torch.linalg.norm(W0 + scaling * (B @ A), dim=1).detach()
        c = m / norm
        y = c * z
        if mask is not None:
            y = y + (x2 - xd2) @ W0.T
        if b is not None:
            y = y + b
        ctx.save_for_backward(xd2, u, z, c, norm, W0, A, B, mask)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, b is not None
        return y.reshape(*x.shape[:-1], W0.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xd2, u, z, c, norm, W0, A, B, mask = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        dm = (dy2 * z).sum(dim=0) / norm
        g = dy2 * c
        gB = g @ B
        dA = s * (gB.T @ xd2)
        dB = s * (g.T @ u)
        db = dy2.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ W0 + s * (gB @ A)
            if mask is not None:
                frozen = dy2 @ W0
                dx = frozen + (dx - frozen) * mask.reshape(dx.shape)
            dx = dx.reshape(ctx.x_shape)
        return dx, None, db, dA, dB, dm, None, None


def principal_init(
    base: torch.nn.Linear, init: str, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA ("pissa") or OLoRA ("olora") initialisation; the residual replaces ``base.weight``.

    Returns
    -------
    A : Tensor of shape (r, in)
    B : Tensor of shape (out, r)
        In the base weight's dtype and device; ``base.weight`` now holds W0 - s B A.
    """
    split = {"pissa": pissa_init, "olora": olora_init}
    if init not in split:
        raise ValueError(f"principal_init: init must be 'pissa' or 'olora', got {init!r}")
    W = base.weight
    A, B, W_res = split[init](W.detach().cpu().numpy(), r, scaling)
    like = {"dtype": W.dtype, "device": W.device}
    with torch.no_grad():
        W.copy_(torch.from_numpy(np.ascontiguousarray(W_res)).to(**like))
    return torch.from_numpy(A).to(**like), torch.from_numpy(B).to(**like)
