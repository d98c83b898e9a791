"""A layer's adapters stacked in torch: the twin of `loralab.lora.stacked`'s `AdapterStack`.

The torch `LoRALinear` keeps every adapter's A in one tensor A (K, r, in) and B transposed in
Bt (K, r, out), each adapter's Parameter holding a *view* of its slice (``A[k]``, and for B_k the
transposed view ``Bt[k].T`` of shape (out, r), column-major), so that an optimizer's in-place
step, ``load_state_dict`` or ``with torch.no_grad(): p.copy_(...)`` change the stack too. The
grouped op (`loralab.torch.grouped`) then runs all adapters' small products as one batched
``torch.matmul`` on the stack.

A parameter given a new tensor (``p.data = ...``, ``model.to(...)``, ``model.double()``) no
longer holds its view, and the stack is rebuilt on the next batch. In torch ``p.data`` is a new
Tensor object on every access, so the check cannot be NumPy's identity test: it compares each
parameter's data pointer, shape and strides with its view's. While the stack is alive (it is
kept with the layer) no other tensor's memory can start where one of its views does, so equal
pointer, shape and strides mean the parameter still holds that very view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["TorchAdapterStack", "stack_parameters"]


class TorchAdapterStack(NamedTuple):
    """A layer's adapters side by side (`stack_parameters`).

    A : Tensor of shape (K, r, in)
    Bt : Tensor of shape (K, r, out): B_k transposed, ``Bt[k] = B_k^T``
    scalings : Tensor of shape (K, 1, 1), s_k, in A's dtype and on its device
    key : per parameter (A_0..A_{K-1}, B_0..B_{K-1}) its view's (data pointer, shape, strides)
    scaling_key : tuple of K floats, the s_k the stack was built with
    """

    A: torch.Tensor
    Bt: torch.Tensor
    scalings: torch.Tensor
    key: tuple[tuple[Any, ...], ...]
    scaling_key: tuple[float, ...]


def _key(params: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], ...]:
    return tuple((p.data_ptr(), p.shape, p.stride()) for p in params)


def stack_parameters(
    A_params: Sequence[torch.nn.Parameter],
    B_params: Sequence[torch.nn.Parameter],
    scalings: Sequence[float],
    previous: TorchAdapterStack | None = None,
) -> TorchAdapterStack | None:
    """The adapters' A and B stacked, their parameters pointed at the stack's slices.

    Parameters
    ----------
    A_params, B_params : K torch Parameters each, A_k of shape (r, in), B_k of shape (out, r)
    scalings : K floats, s_k
    previous : the stack this returned last time, if any

    Returns
    -------
    ``previous`` when every parameter still holds its view of it (nothing copied); else a new
    stack (the parameters' values copied in once, and each parameter's ``.data`` replaced by its
    slice, ``Bt[k].T`` for B_k: the same values, now stored in the stack); None when the adapters
    cannot be stacked (their ranks, shapes, dtypes or devices differ).

    Examples
    --------
    >>> As = [torch.nn.Parameter(torch.ones(2, 3)) for _ in range(4)]
    >>> Bs = [torch.nn.Parameter(torch.ones(5, 2)) for _ in range(4)]
    >>> st = stack_parameters(As, Bs, [1.0] * 4)
    >>> tuple(st.A.shape), tuple(st.Bt.shape), Bs[0].shape, Bs[0].stride()
    ((4, 2, 3), (4, 2, 5), torch.Size([5, 2]), (1, 5))
    >>> stack_parameters(As, Bs, [1.0] * 4, st) is st
    True
    """
    params = (*A_params, *B_params)
    key = tuple(float(s) for s in scalings)
    if previous is not None and previous.scaling_key == key and previous.key == _key(params):
        return previous
    k = len(A_params)
    if k == 0:
        return None
    for part in (A_params, B_params):
        first = part[0]
        if any(
            p.shape != first.shape or p.dtype != first.dtype or p.device != first.device
            for p in part
        ):
            return None
    r, d_in = A_params[0].shape
    d_out = B_params[0].shape[0]
    with torch.no_grad():
        # filled slice by slice: torch.stack of the B_k^T views could keep their column order
        A = A_params[0].new_empty((k, r, d_in))
        Bt = B_params[0].new_empty((k, r, d_out))
        for i in range(k):
            A[i].copy_(A_params[i])
            Bt[i].copy_(B_params[i].T)
        for i in range(k):
            A_params[i].data = A[i]
            B_params[i].data = Bt[i].T
    s = torch.tensor(key, dtype=A.dtype, device=A.device).reshape(k, 1, 1)
    return TorchAdapterStack(A, Bt, s, _key(params), key)
