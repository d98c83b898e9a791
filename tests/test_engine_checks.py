"""The engine type-along's checks (loralab.exercises.engine_checks): they pass the reference
solutions and loralab's stand-ins, and catch every planted mistake by its name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from loralab.exercises import engine_checks as E

ROOT = Path(__file__).resolve().parent.parent
M = E.ENGINE_MISTAKES


def _load_solutions():
    spec = importlib.util.spec_from_file_location(
        "loralab_engine_solutions", ROOT / "instructor" / "engine_solutions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _load_solutions()
CHECKS = {
    "topological_order": (E.check_topological_order, S.my_topological_order),
    "backward": (E.check_backward_pass, S.my_backward),
    "mul_backward": (E.check_mul_backward, S.my_mul_backward),
    "matmul_backward": (E.check_matmul_backward, S.my_matmul_backward),
    "sum_backward": (E.check_sum_backward, S.my_sum_backward),
}


@pytest.mark.parametrize("name", CHECKS)
def test_check_passes_the_reference_solution_and_loralabs_stand_in(name, capsys):
    check, solution = CHECKS[name]
    assert check(solution) is True
    assert check(E.STAND_INS[name]) is True
    assert capsys.readouterr().out.count("Correct:") == 2


@pytest.mark.parametrize("name", CHECKS)
def test_blank_cell_is_told_to_write_its_code_and_strict_raises(name, capsys):
    check, _ = CHECKS[name]

    def stub(*args):
        raise NotImplementedError

    assert check(stub) is False
    assert "not implemented yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="Not yet"):
        check(stub, strict=True)


# ------------------------------------------------------------------------- planted mistakes
def _topo_without_visited_set(root):
    order = []

    def visit(node):
        for parent in node.parents:
            visit(parent)
        order.append(node)

    visit(root)
    return order


def _backward_with(order_of, *, accumulate=True, seed=True):
    def backward(root):
        if seed:
            root.grad = np.ones_like(root.data)
        for node in order_of(root):
            for parent, g in zip(node.parents, node.grad_fn(node.grad)):
                if accumulate:
                    parent.grad += g
                else:
                    parent.grad = g

    return backward


def _preorder(root):
    order, seen = [], set()

    def visit(node):
        if id(node) not in seen:
            seen.add(id(node))
            order.append(node)
            for parent in node.parents:
                visit(parent)

    visit(root)
    return order


def _reverse_order(root):
    return list(reversed(S.my_topological_order(root)))


def _sum_axes(g, shape):
    return g.sum(
        axis=tuple(range(g.ndim - len(shape)))
        + tuple(
            i + g.ndim - len(shape)
            for i, n in enumerate(shape)
            if n == 1 and g.shape[i + g.ndim - len(shape)] != 1
        ),
        keepdims=True,
    )


PLANTED = [
    ("topological_order", _topo_without_visited_set, "node_listed_twice"),
    ("topological_order", lambda root: S.my_topological_order(root)[1:], "node_missing"),
    ("topological_order", _reverse_order, "order_reversed"),
    ("topological_order", _preorder, "preorder"),
    ("backward", _backward_with(_reverse_order, accumulate=False), "assigned_not_accumulated"),
    ("backward", _backward_with(S.my_topological_order), "walked_forwards"),
    ("backward", _backward_with(_reverse_order, seed=False), "no_seed"),
    ("mul_backward", lambda grad, a, b: (grad * b, grad * a), "not_unbroadcast"),
    (
        "mul_backward",
        lambda grad, a, b: (S.my_mul_backward(grad, a, a)[0], S.my_mul_backward(grad, b, b)[1]),
        "mul_swapped",
    ),
    (
        "mul_backward",
        lambda grad, a, b: (b * np.ones_like(grad), a * np.ones_like(grad)),
        "mul_no_grad",
    ),
    (
        "mul_backward",
        lambda grad, a, b: tuple(_sum_axes(grad * o, np.shape(m)) for m, o in ((a, b), (b, a))),
        "unbroadcast_keepdims",
    ),
    ("matmul_backward", lambda grad, a, b: (grad @ b, a @ grad), "matmul_no_transpose"),
    ("matmul_backward", lambda grad, a, b: (b @ grad.T, grad.T @ a), "matmul_transposed"),
    ("sum_backward", lambda grad, shape, axis: grad, "sum_not_expanded"),
    ("sum_backward", lambda grad, shape, axis: np.broadcast_to(grad, shape), "sum_wrong_axis"),
    (
        "sum_backward",
        lambda grad, shape, axis: (
            S.my_sum_backward(grad, shape, axis) / (np.prod(shape) if axis is None else shape[axis])
        ),
        "sum_divided",
    ),
]


@pytest.mark.parametrize(("name", "wrong", "mistake"), PLANTED, ids=[p[2] for p in PLANTED])
def test_planted_mistake_fails_and_is_named(name, wrong, mistake, capsys):
    check, _ = CHECKS[name]
    assert check(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet:")
    assert M[mistake].title in out, out


def test_every_named_mistake_is_planted_by_a_test():
    planted = {p[2] for p in PLANTED} | {"unbroadcast_mean"}  # the test below plants it
    assert planted == set(M)


def test_mean_instead_of_sum_is_named(capsys):
    def mul_backward(grad, a, b):
        def reduce(g, shape):
            return (_sum_axes(g, shape) / (g.size / max(int(np.prod(shape)), 1))).reshape(shape)

        return reduce(grad * b, np.shape(a)), reduce(grad * a, np.shape(b))

    assert E.check_mul_backward(mul_backward) is False
    assert M["unbroadcast_mean"].title in capsys.readouterr().out


def test_backward_that_returns_nothing_useful_is_not_praised(capsys):
    assert E.check_backward_pass(lambda root: None) is False
    assert "Correct" not in capsys.readouterr().out
