"""The LoRA variants in torch: DoRA's Function, the twin of `loralab.lora.engine_functions.DoRALinearFn`.

Everything else about the variants is shared with the NumPy side (`loralab.lora.variants`): the
scaling rules, PiSSA/OLoRA initialisation (computed in NumPy, so both start from the same A, B
and residual W0), DoRA's initial magnitude and merging. LoRA+ needs nothing torch-specific:
`loralab.lora.variants.loraplus_param_groups` returns groups that ``torch.optim`` accepts.
"""

from __future__ import annotations

import torch

from loralab.lora.variants import loraplus_param_groups

__all__ = ["DoRALinearFunction", "loraplus_param_groups"]


class DoRALinearFunction(torch.autograd.Function):
    """``y = c * (x_d W0^T + s (x_d A^T) B^T) + b (+ (x - x_d) W0^T)``, c = m / ||W0 + s B A||_row.

    The backward, as in `loralab.lora.ops.dora_backward`: with z the bracket and
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
