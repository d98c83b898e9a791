"""Reference solutions to the engine type-along (tutorial 4b). For instructors: do not hand out.

Like ``solutions.py`` it lives outside the ``loralab`` package. Each function has exactly the name
and signature of a blank cell in ``tutorials/04b_build_the_engine_yourself.ipynb`` (the cell ids
are the keys of `BLANK_CELLS`); ``tests/test_teaching.py`` swaps these sources into those cells
and runs the notebook, and every check must pass. Every body is self-contained apart from ``np``
(imported by the notebook's first cell) and, for ``my_backward``, the notebook's
``topological_order`` (the learner's, once step 1 passes).
"""

from __future__ import annotations

import inspect

import numpy as np


def my_topological_order(root):
    order, seen = [], set()

    def visit(node):
        if id(node) not in seen:
            seen.add(id(node))
            for parent in node.parents:
                visit(parent)
            order.append(node)  # after all of its parents

    visit(root)
    return order


def my_backward(root):
    root.grad = np.ones_like(root.data)
    for node in reversed(topological_order(root)):
        for parent, g in zip(node.parents, node.grad_fn(node.grad)):
            parent.grad += g


def my_mul_backward(grad, a, b):
    def unbroadcast(g, shape):
        extra = g.ndim - len(shape)  # axes broadcasting added in front
        stretched = tuple(
            i + extra for i, n in enumerate(shape) if n == 1 and g.shape[i + extra] != 1
        )
        return g.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)

    return unbroadcast(grad * b, np.shape(a)), unbroadcast(grad * a, np.shape(b))


def my_matmul_backward(grad, a, b):
    return grad @ b.T, a.T @ grad


def my_sum_backward(grad, shape, axis):
    if axis is not None:
        grad = np.expand_dims(grad, axis)
    return np.broadcast_to(grad, shape)


topological_order = my_topological_order  # what the notebook names the order it uses

#: notebook cell id -> the solution function whose source fills it
BLANK_CELLS = {
    "blank_topo": my_topological_order,
    "blank_backward": my_backward,
    "blank_mul": my_mul_backward,
    "blank_matmul": my_matmul_backward,
    "blank_sum": my_sum_backward,
}


def solution_sources() -> dict[str, str]:
    """Cell id -> the source of its solution."""
    return {cell: inspect.getsource(fn) for cell, fn in BLANK_CELLS.items()}
