"""Checks for the engine type-along (tutorial 4b): the backward pass and three ops' backwards.

The learner builds a miniature autograd engine on nodes with four attributes, the contract of
tutorial 4b's ``Node``:

* ``data``: the value (an ``np.ndarray``);
* ``grad``: the accumulated gradient, same shape, zeros until a backward adds into it;
* ``parents``: the nodes this one was computed from (a node may appear twice: ``x * x``);
* ``grad_fn``: the node's gradient -> a tuple with one gradient per parent, in order.

and writes five functions, each checked here on fixed float64 inputs:

=============================================  ==========================================
``topological_order(root) -> list``            `check_topological_order`
``backward(root) -> None``                     `check_backward_pass`
``mul_backward(grad, a, b) -> (da, db)``       `check_mul_backward` (with broadcasting)
``matmul_backward(grad, a, b) -> (da, db)``    `check_matmul_backward` (``c = a @ b``, 2-D)
``sum_backward(grad, shape, axis) -> da``      `check_sum_backward` (``c = a.sum(axis)``)
=============================================  ==========================================

Each check prints ``Correct: ...`` or ``Not yet: ...`` with what differs and, when the answer
matches a common mistake, its name (forgetting to accumulate, the wrong order, a missing
transpose, a gradient not summed back to its input's shape); it returns True or False, and
raises ``AssertionError`` with ``strict=True``. ``STAND_INS`` holds loralab's versions, which
the notebook runs until a step passes (the op backwards run loralab's own `Tensor` autograd).

>>> check_sum_backward(lambda grad, shape, axis: np.broadcast_to(grad, shape))  # doctest: +ELLIPSIS
Not yet: sum_backward(grad, shape, axis)
...broadcast along the wrong axis...
False
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from loralab.exercises._feedback import (
    MISTAKE_NOTE,
    Failure,
    call_student,
    close,
    describe,
    difference,
    match_mistake,
    mistake_note,
)
from loralab.exercises._mistakes import Mistake
from loralab.tensor import Tensor

__all__ = [
    "ENGINE_MISTAKES",
    "STAND_INS",
    "check_backward_pass",
    "check_matmul_backward",
    "check_mul_backward",
    "check_sum_backward",
    "check_topological_order",
]

_M = [
    Mistake(
        "node_listed_twice",
        "topological order",
        "a node is listed more than once",
        "Keep a set of the nodes already visited (by `id(node)`) and skip a node you have seen: "
        "a value used twice, as in x * x, is still one node, and backward must visit it once.",
    ),
    Mistake(
        "node_missing",
        "topological order",
        "a node reachable from the root is missing",
        "Visit every parent of every node, recursively, down to the leaves (nodes without "
        "parents), and include the root itself.",
    ),
    Mistake(
        "order_reversed",
        "topological order",
        "the order is reversed (the root comes first)",
        "Return every node after all of its parents, so the root is last; `backward` then walks "
        "the list in reverse.",
    ),
    Mistake(
        "preorder",
        "topological order",
        "a node is appended before its parents (pre-order)",
        "Append a node after visiting all of its parents (post-order), not when you first reach "
        "it: a parent shared by two paths may be reached late.",
    ),
    Mistake(
        "assigned_not_accumulated",
        "accumulation",
        "you assigned the gradient (`=`) instead of accumulating it (`+=`)",
        "A node used twice (x * x, or x on two paths) receives one contribution per use; with `=` "
        "the last one overwrites the others. Add: `parent.grad += g`.",
    ),
    Mistake(
        "walked_forwards",
        "order",
        "you walked the order forwards (leaves first)",
        "Walk `reversed(topological_order(root))`: a node may pass its gradient to its parents "
        "only after every node that uses it has added its share.",
    ),
    Mistake(
        "no_seed",
        "chain rule",
        "the root's gradient was not set to ones",
        "Start with `root.grad = np.ones_like(root.data)`: dL/dL = 1 starts the chain rule.",
    ),
    Mistake(
        "mul_swapped",
        "product rule",
        "da and db are swapped (grad * a for a)",
        "For c = a * b, da = grad * b and db = grad * a: each input's gradient is multiplied by "
        "the other input.",
    ),
    Mistake(
        "mul_no_grad",
        "chain rule",
        "you forgot to multiply by grad",
        "The chain rule multiplies the local derivative by the gradient arriving from above: "
        "da = grad * b, not b.",
    ),
    Mistake(
        "not_unbroadcast",
        "broadcasting",
        "the gradient was not summed back to its input's shape (unbroadcasting)",
        "When NumPy broadcast an input (b of shape (4,) against a of shape (3, 4)), every copy of "
        "it received a gradient: sum over the axes broadcasting added or stretched, e.g. "
        "`(grad * a).sum(axis=0)`, so that db has b's shape.",
    ),
    Mistake(
        "unbroadcast_mean",
        "broadcasting",
        "you averaged over the broadcast axes instead of summing",
        "Each copy of a broadcast value contributes its full gradient: sum them, do not average.",
    ),
    Mistake(
        "unbroadcast_keepdims",
        "broadcasting",
        "you summed over the broadcast axes but kept them",
        "After summing, reshape to the input's own shape: `.reshape(np.shape(b))`.",
    ),
    Mistake(
        "matmul_no_transpose",
        "shapes",
        "a transpose is missing (grad @ b instead of grad @ b.T)",
        "For c = a @ b: da = grad @ b.T, shape (n, k), and db = a.T @ grad, shape (k, m). Check "
        "each product's shape: it must be the shape of the input it is the gradient of.",
    ),
    Mistake(
        "matmul_transposed",
        "shapes",
        "your gradient is the transpose of the right one",
        "Multiply in the other order: da = grad @ b.T (not b @ grad.T), db = a.T @ grad.",
    ),
    Mistake(
        "sum_not_expanded",
        "broadcasting",
        "you returned grad without broadcasting it back to the input's shape",
        "Every summed element gets the sum's gradient: the result has the input's shape, "
        "`np.broadcast_to(..., shape)`.",
    ),
    Mistake(
        "sum_wrong_axis",
        "broadcasting",
        "you broadcast along the wrong axis",
        "Put the summed axis back first, `np.expand_dims(grad, axis)`, then broadcast: NumPy "
        "broadcasts from the last axis, which is right only when the last axes were kept.",
    ),
    Mistake(
        "sum_divided",
        "broadcasting",
        "you divided by the number of summed elements",
        "That is the mean's backward. Each element adds into the sum with weight 1, so each gets "
        "the gradient once.",
    ),
]
#: The named mistakes these checks recognise, by key.
ENGINE_MISTAKES: dict[str, Mistake] = {m.key: m for m in _M}


# ------------------------------------------------------------------------------ verdicts
def _run(title: str, proved: str, body: Callable[[], None], strict: bool) -> bool:
    """Run a check body; print 'Correct: ...' or 'Not yet: ...'; True/False (strict: raise)."""
    try:
        body()
    except Failure as failure:
        message = f"Not yet: {title}\n  {failure}"
        print(message)
        if strict:
            raise AssertionError(message) from failure.raised
        return False
    print(f"Correct: {title}. {proved}")
    return True


def _note(key: str) -> str:
    return mistake_note(ENGINE_MISTAKES[key])


# ------------------------------------------------------------------------------ graphs
class _Node:
    """A node of a test graph: tutorial 4b's contract, plus a name for the messages."""

    def __init__(self, name, data, parents=(), grad_fn=None):
        self.name = name
        self.data = np.asarray(data, dtype=np.float64)
        self.grad = np.zeros_like(self.data)
        self.parents = tuple(parents)
        self.grad_fn = grad_fn if grad_fn is not None else (lambda g: ())

    def __repr__(self):
        return f"Node({self.name})"


def _graph(seed: int):
    """L = sum(w * (2 x + x * x)) built from named nodes; x is used three times, on two paths.

    Returns the root and the leaves whose gradients are checked: dL/dx = w (2 + 2 x) and
    dL/dw = 2 x + x^2.
    """
    rng = np.random.default_rng(seed)
    x = _Node("x", rng.normal(size=3))
    w = _Node("w", rng.normal(size=3))
    a = _Node("a = 2 x", 2 * x.data, (x,), lambda g: (2 * g,))
    b = _Node("b = x * x", x.data * x.data, (x, x), lambda g: (g * x.data, g * x.data))
    c = _Node("c = a + b", a.data + b.data, (a, b), lambda g: (g, g))
    d = _Node("d = w * c", w.data * c.data, (w, c), lambda g: (g * c.data, g * w.data))
    L = _Node("L = sum(d)", d.data.sum(), (d,), lambda g: (g * np.ones_like(d.data),))
    return L, {"x": x, "w": w}


def _tree():
    """A tree (every node used once): y = u * v, L = sum(y)."""
    u, v = _Node("u", [1.0, 2.0]), _Node("v", [3.0, -1.0])
    y = _Node("y = u * v", u.data * v.data, (u, v), lambda g: (g * v.data, g * u.data))
    L = _Node("L = sum(y)", y.data.sum(), (y,), lambda g: (g * np.ones_like(y.data),))
    return L, {"u": u, "v": v}


def _reachable(root) -> list:
    seen, todo, out = set(), [root], []
    while todo:
        node = todo.pop()
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
            todo.extend(node.parents)
    return out


def _postorder(root, *, flip: bool = False) -> list:
    """Depth-first post-order: each node after its parents (``flip``: parents last to first)."""
    order, seen = [], set()

    def visit(node):
        if id(node) not in seen:
            seen.add(id(node))
            for parent in reversed(node.parents) if flip else node.parents:
                visit(parent)
            order.append(node)

    visit(root)
    return order


def _preorder(root) -> list:
    order, seen = [], set()

    def visit(node):
        if id(node) not in seen:
            seen.add(id(node))
            order.append(node)
            for parent in node.parents:
                visit(parent)

    visit(root)
    return order


def _simulate(root, order, *, accumulate=True, seed_grad=True) -> None:
    for node in _reachable(root):
        node.grad = np.zeros_like(node.data)
    if seed_grad:
        root.grad = np.ones_like(root.data)
    for node in order:
        for parent, g in zip(node.parents, node.grad_fn(node.grad)):
            parent.grad = parent.grad + g if accumulate else np.array(g, dtype=np.float64)


# ------------------------------------------------------------------------------ step 1
def check_topological_order(student_fn: Callable, *, strict: bool = False) -> bool:
    """Check ``topological_order(root) -> list``: every node reachable from ``root`` once, each
    after all of its parents (the root last).

    Cases: L = sum(w * (2 x + x * x)), where x is used three times on two paths, and a tree.
    Recognised mistakes: a node listed twice (no visited set), a node missing, the order
    reversed, a node appended before its parents (pre-order).
    """
    title = "topological_order(root)"
    proved = (
        "Every node comes once, after all of its parents, even x, which three ops use: walking "
        "this list in reverse visits each node after every node that uses it."
    )
    return _run(title, proved, lambda: _topo_cases(student_fn), strict)


def _topo_cases(fn) -> None:
    name = getattr(fn, "__name__", "topological_order")
    for root, _ in (_graph(0), _tree()):
        case = f"test case: the graph of {root.name}"
        order = call_student(lambda r=root: fn(r), name, (), (), case)
        if not isinstance(order, (list, tuple)):
            raise Failure(f"`{name}` should return a list of nodes, got {type(order).__name__}.")
        nodes = _reachable(root)
        known = {id(n) for n in nodes}
        if any(id(n) not in known for n in order):
            raise Failure(f"Your list holds something that is not a node of this graph.\n  {case}")
        ids = [id(n) for n in order]
        twice = [n.name for n in nodes if ids.count(id(n)) > 1]
        if twice:
            raise Failure(
                f"{', '.join(twice)} appears more than once.{_note('node_listed_twice')}\n  {case}"
            )
        missing = [n.name for n in nodes if id(n) not in ids]
        if missing:
            raise Failure(f"Missing: {', '.join(missing)}.{_note('node_missing')}\n  {case}")
        late = _first_too_early(order)
        if late:
            node, parent = late
            if not _first_too_early(order[::-1]):
                key: str | None = "order_reversed"
            else:
                key = "preorder" if ids == [id(n) for n in _preorder(root)] else None
            note = _note(key) if key else ""
            raise Failure(f"{node.name} comes before its parent {parent.name}.{note}\n  {case}")


def _first_too_early(order):
    """The first (node, parent) pair in ``order`` where the node comes before its parent."""
    position = {id(n): i for i, n in enumerate(order)}
    for node in order:
        for parent in node.parents:
            if position[id(parent)] > position[id(node)]:
                return node, parent
    return None


# ------------------------------------------------------------------------------ step 2
def check_backward_pass(student_fn: Callable, *, strict: bool = False) -> bool:
    """Check ``backward(root)``: seeds ``root.grad`` with ones and, in reverse topological order,
    adds each node's ``grad_fn(node.grad)`` into its parents' ``grad``.

    It runs on the check's own graphs (nodes with ``data``, ``grad`` starting at zeros,
    ``parents`` and ``grad_fn``) and compares the leaves' gradients with the chain rule's.
    Recognised mistakes: assigning instead of accumulating, walking the order forwards, not
    seeding the root with ones.
    """
    title = "backward(root)"
    proved = (
        "Your backward pass seeds dL/dL = 1, visits each node after all of its users, and adds "
        "(+=) every contribution: x, used three times, gets all three."
    )
    return _run(title, proved, lambda: _backward_cases(student_fn), strict)


def _backward_cases(fn) -> None:
    name = getattr(fn, "__name__", "backward")
    for make in (_tree, lambda: _graph(1)):
        root, leaves = make()
        case = f"test case: the graph of {root.name}"
        call_student(lambda r=root: fn(r), name, (), (), case)
        got = {k: leaf.grad for k, leaf in leaves.items()}
        right, right_leaves = make()
        _simulate(right, _postorder(right)[::-1])
        expected = {k: leaf.grad for k, leaf in right_leaves.items()}
        problems = [difference(got[k], expected[k], what=f"{k}.grad", case=case) for k in expected]
        problems = [p for p in problems if p]
        if problems:
            mistake = _backward_mistake(make, got, root)
            note = _note(mistake) if mistake else ""
            raise Failure("\n  ".join(problems) + note + f"\n  {case}")


def _backward_mistake(make, got: dict, root) -> str | None:
    """The known mistake whose leaf gradients equal ``got`` (None: not a known one)."""
    arrays = {k: np.asarray(v) if isinstance(v, np.ndarray) else None for k, v in got.items()}
    if any(a is None for a in arrays.values()):
        return None
    if not any(a.any() for a in arrays.values()):  # nothing reached the leaves
        seeded = isinstance(root.grad, np.ndarray) and np.array_equal(
            root.grad, np.ones_like(root.data)
        )
        return "walked_forwards" if seeded else "no_seed"
    for flip in (False, True):  # either valid order of the parents: the last write differs
        other, leaves = make()
        _simulate(other, _postorder(other, flip=flip)[::-1], accumulate=False)
        if all(close(arrays[k], leaf.grad) for k, leaf in leaves.items()):
            return "assigned_not_accumulated"
    return None


# ------------------------------------------------------------------------------ step 3: ops
def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and g.shape[i + extra] != 1
    )
    return (g.sum(axis=axes, keepdims=True) if axes else g).reshape(shape)


def _pair(fn, name, args, arg_names, expected, variants, case) -> None:
    """Call ``fn(*args)``, expect a pair (da, db); raise a Failure naming what differs."""
    out = call_student(fn, name, args, arg_names, case)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise Failure(
            f"`{name}` should return a pair (da, db), got {type(out).__name__}.\n  {case}"
        )
    problems = [
        difference(got, exp, what=what, variants=var, case=case)
        for got, exp, what, var in zip(out, expected, ("da", "db"), variants, strict=True)
    ]
    problems = [p for p in problems if p]
    if problems:
        raise Failure("\n  ".join(_once(problems)) + f"\n  {case}")


def _once(problems: list[str]) -> list[str]:
    """The problems, without a known-mistake note that repeats the one before it."""
    out, seen = [], set()
    for problem in problems:
        head, sep, note = problem.partition(MISTAKE_NOTE)
        out.append(head if sep and note in seen else problem)
        seen.add(note)
    return out


def _mul_variants(grad, a, b, which):
    """Wrong answers for da (which = 0) or db (which = 1)."""
    mine, other = (a, b) if which == 0 else (b, a)
    full = grad * other
    variants = [
        (ENGINE_MISTAKES["not_unbroadcast"], full),
        (ENGINE_MISTAKES["mul_swapped"], _try(lambda: _unbroadcast(grad * mine, np.shape(mine)))),
        (
            ENGINE_MISTAKES["mul_no_grad"],
            _try(lambda: _unbroadcast(np.broadcast_to(other, grad.shape), np.shape(mine))),
        ),
    ]
    extra = full.ndim - np.ndim(mine)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(np.shape(mine)) if n == 1 and full.shape[i + extra] != 1
    )
    if axes:
        variants.append(
            (
                ENGINE_MISTAKES["unbroadcast_mean"],
                _try(lambda: full.mean(axis=axes).reshape(np.shape(mine))),
            )
        )
        variants.append(
            (ENGINE_MISTAKES["unbroadcast_keepdims"], full.sum(axis=axes, keepdims=True))
        )
    return variants


def _try(make):
    try:
        return make()
    except ValueError:
        return None


def check_mul_backward(student_fn: Callable, *, strict: bool = False) -> bool:
    """Check ``mul_backward(grad, a, b) -> (da, db)`` for ``c = a * b`` with NumPy broadcasting.

    da = grad * b and db = grad * a, each summed back to its input's shape. Cases: equal shapes
    (3, 4); b of shape (4,) and of shape () against a (3, 4); a (3, 1) against b (1, 4).
    Recognised mistakes: not unbroadcasting, averaging instead of summing, keeping the summed
    axes, da and db swapped, grad left out.
    """
    title = "mul_backward(grad, a, b)"
    proved = (
        "da = grad * b and db = grad * a, each summed back over the axes broadcasting added or "
        "stretched, so every gradient has its input's shape."
    )
    return _run(title, proved, lambda: _mul_cases(student_fn), strict)


def _mul_cases(fn) -> None:
    name = getattr(fn, "__name__", "mul_backward")
    rng = np.random.default_rng(7)
    for a_shape, b_shape in (((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), ()), ((3, 1), (1, 4))):
        a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
        grad = rng.normal(size=np.broadcast_shapes(a_shape, b_shape))
        case = describe(grad=grad, a=a, b=b)
        expected = (_unbroadcast(grad * b, a_shape), _unbroadcast(grad * a, b_shape))
        variants = (_mul_variants(grad, a, b, 0), _mul_variants(grad, a, b, 1))
        _pair(fn, name, (grad, a, b), ("grad", "a", "b"), expected, variants, case)


def check_matmul_backward(student_fn: Callable, *, strict: bool = False) -> bool:
    """Check ``matmul_backward(grad, a, b) -> (da, db)`` for ``c = a @ b``, a (n, k), b (k, m).

    da = grad @ b.T of shape (n, k) and db = a.T @ grad of shape (k, m). Cases: n, k, m = 3, 4, 5
    and a square case (4, 4, 4), where a missing transpose still runs; a function that fails
    on the first is run on the square one to name its mistake. Recognised mistakes: a missing
    transpose, a transposed result.
    """
    title = "matmul_backward(grad, a, b)"
    proved = (
        "da = grad @ b.T and db = a.T @ grad: each gradient has its input's shape, and a matrix "
        "product's backward is two products of the forward's size."
    )
    return _run(title, proved, lambda: _matmul_cases(student_fn), strict)


def _matmul_problem(n, k, m, seed):
    rng = np.random.default_rng(seed)
    a, b, grad = rng.normal(size=(n, k)), rng.normal(size=(k, m)), rng.normal(size=(n, m))
    expected = (grad @ b.T, a.T @ grad)
    variants = (
        [
            (ENGINE_MISTAKES["matmul_no_transpose"], _try(lambda: grad @ b)),
            (ENGINE_MISTAKES["matmul_transposed"], _try(lambda: b @ grad.T)),
        ],
        [
            (ENGINE_MISTAKES["matmul_no_transpose"], _try(lambda: a @ grad)),
            (ENGINE_MISTAKES["matmul_transposed"], _try(lambda: grad.T @ a)),
        ],
    )
    return (grad, a, b), expected, variants, describe(grad=grad, a=a, b=b)


def _matmul_cases(fn) -> None:
    name = getattr(fn, "__name__", "matmul_backward")
    args, expected, variants, case = _matmul_problem(3, 4, 5, 3)
    try:
        _pair(fn, name, args, ("grad", "a", "b"), expected, variants, case)
    except Failure as failure:
        if failure.raised is None or isinstance(failure.raised, NotImplementedError):
            raise
        raise Failure(f"{failure}\n  {_square_note(fn, name)}", raised=failure.raised) from None
    args, expected, variants, case = _matmul_problem(4, 4, 4, 4)
    _pair(fn, name, args, ("grad", "a", "b"), expected, variants, case)


def _square_note(fn, name) -> str:
    args, _, variants, case = _matmul_problem(4, 4, 4, 4)
    try:
        out = call_student(fn, name, args, ("grad", "a", "b"), case)
        for got, var in zip(out, variants, strict=True):
            mistake = match_mistake(np.asarray(got, dtype=float), var)
            if mistake:
                return (
                    f"With square matrices (4 x 4) your function does run, and there it shows a "
                    f"known mistake ({mistake.kind}): {mistake.title}. {mistake.explain}"
                )
    except (Failure, TypeError, ValueError):
        pass
    return "Shapes: a is (n, k), b is (k, m), grad is (n, m); da must be (n, k), db (k, m)."


def check_sum_backward(student_fn: Callable, *, strict: bool = False) -> bool:
    """Check ``sum_backward(grad, shape, axis) -> da`` for ``c = a.sum(axis)``, a of ``shape``.

    Every summed element gets the sum's gradient: da = grad broadcast back to ``shape``, after
    putting the summed axis back. Cases: axis None on (3, 4) (grad a 0-d array), axis 0 and
    axis 1 on (3, 4), axis 1 on (3, 3) (where broadcasting along the wrong axis still runs).
    Recognised mistakes: grad returned as it came, broadcast along the wrong axis, divided by
    the count (the mean's backward).
    """
    title = "sum_backward(grad, shape, axis)"
    proved = (
        "Every element of the input gets the gradient of the sum it went into: the gradient, "
        "with the summed axis put back, broadcast to the input's shape."
    )
    return _run(title, proved, lambda: _sum_cases(student_fn), strict)


def _sum_cases(fn) -> None:
    name = getattr(fn, "__name__", "sum_backward")
    rng = np.random.default_rng(5)
    cases = (((3, 4), None), ((3, 4), 0), ((3, 3), 1), ((3, 4), 1))
    for shape, axis in cases:
        grad = np.asarray(rng.normal(size=np.zeros(shape).sum(axis=axis).shape))
        expected = np.broadcast_to(
            np.expand_dims(grad, axis) if axis is not None else grad, shape
        ).copy()
        count = int(np.prod(shape)) if axis is None else shape[axis]
        variants = [
            (ENGINE_MISTAKES["sum_not_expanded"], grad),
            (
                ENGINE_MISTAKES["sum_wrong_axis"],
                _try(lambda g=grad, s=shape: np.broadcast_to(g, s)),
            ),
            (ENGINE_MISTAKES["sum_divided"], expected / count),
        ]
        case = describe(grad=grad, shape=shape, axis=axis)
        try:
            out = call_student(fn, name, (grad, shape, axis), ("grad", "shape", "axis"), case)
        except Failure as failure:
            if failure.raised is None or isinstance(failure.raised, NotImplementedError):
                raise
            hint = ""
            if axis == 1:
                hint = f"\n  {ENGINE_MISTAKES['sum_wrong_axis'].explain}"
            raise Failure(f"{failure}{hint}", raised=failure.raised) from None
        problem = difference(out, expected, what="da", variants=variants, case=case)
        if problem:
            raise Failure(f"{problem}\n  {case}")


# ------------------------------------------------------------------------------ stand-ins
def _loralab_topological_order(root) -> list:
    """loralab's version: `Tensor.backward`'s order (a post-order depth-first search)."""
    return _postorder(root)


def _loralab_backward(root) -> None:
    """loralab's version: seed with ones, walk the order in reverse, accumulate (+=)."""
    root.grad = np.ones_like(root.data)
    for node in reversed(_postorder(root)):
        for parent, g in zip(node.parents, node.grad_fn(node.grad)):
            parent.grad = parent.grad + g


def _autograd(op: Callable, grad: np.ndarray, *arrays: np.ndarray) -> tuple:
    tensors = [Tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    op(*tensors).backward(np.asarray(grad, dtype=np.float64))
    return tuple(t.grad for t in tensors)


def _loralab_mul_backward(grad, a, b):
    return _autograd(lambda x, y: x * y, grad, a, b)


def _loralab_matmul_backward(grad, a, b):
    return _autograd(lambda x, y: x @ y, grad, a, b)


def _loralab_sum_backward(grad, shape, axis):
    (da,) = _autograd(lambda x: x.sum(axis=axis), grad, np.zeros(shape))
    return da


#: loralab's versions of the five functions, by the names tutorial 4b gives them: the notebook
#: runs these (the op backwards through loralab's own `Tensor` autograd) until a step passes.
STAND_INS: dict[str, Callable] = {
    "topological_order": _loralab_topological_order,
    "backward": _loralab_backward,
    "mul_backward": _loralab_mul_backward,
    "matmul_backward": _loralab_matmul_backward,
    "sum_backward": _loralab_sum_backward,
}
