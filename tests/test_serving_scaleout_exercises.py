"""The serving (tutorial 12) and scale-out (tutorial 13) exercises: right answers pass, mistakes are named."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from loralab.exercises import scaleout_checks as oc
from loralab.exercises import serving_checks as sc
from loralab.exercises.scaleout_checks import check_allreduce_bytes, check_ring_allreduce
from loralab.exercises.serving_checks import check_cat_combine, check_mixed_forward

# ------------------------------------------------------------------------ right answers
# The instructors' reference solutions, loaded from their file (not shipped in the package).
_spec = importlib.util.spec_from_file_location(
    "loralab_solutions_serving", Path(__file__).resolve().parents[1] / "instructor" / "solutions.py"
)
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)
mixed_forward, cat_combine = S.mixed_forward, S.cat_combine
ring_allreduce, allreduce_bytes = S.ring_allreduce, S.allreduce_bytes


def mixed_forward_sorted(x, W0, As, Bs, scalings, adapter_ids):
    """Another right answer: rows sorted by adapter, one segment product each (Punica's way)."""
    order = np.argsort(adapter_ids, kind="stable")
    xs, ids = x[order], adapter_ids[order]
    y = xs @ W0.T
    for k in range(len(As)):
        lo, hi = np.searchsorted(ids, k), np.searchsorted(ids, k, side="right")
        y[lo:hi] += scalings[k] * ((xs[lo:hi] @ As[k].T) @ Bs[k].T)
    out = np.empty_like(y)
    out[order] = y
    return out


@pytest.mark.parametrize(
    "check, fn",
    [
        (check_mixed_forward, mixed_forward),
        (check_mixed_forward, mixed_forward_sorted),
        (check_cat_combine, cat_combine),
        (check_ring_allreduce, ring_allreduce),
        (check_allreduce_bytes, allreduce_bytes),
    ],
)
def test_right_answers_pass(check, fn, capsys):
    assert check(fn) is True
    assert "Correct" in capsys.readouterr().out


# ------------------------------------------------------------------------ planted mistakes


def all_adapters(x, W0, As, Bs, scalings, adapter_ids):
    return x @ W0.T + sum(s * (x @ A.T) @ B.T for A, B, s in zip(As, Bs, scalings))


def base_wraps(x, W0, As, Bs, scalings, adapter_ids):
    y = x @ W0.T
    for i, k in enumerate(adapter_ids):
        y[i] += scalings[k] * (x[i] @ As[k].T) @ Bs[k].T  # As[-1]: the last adapter
    return y


def first_only(x, W0, As, Bs, scalings, adapter_ids):
    return mixed_forward(
        x, W0, [As[0]] * len(As), [Bs[0]] * len(Bs), [scalings[0]] * len(As), adapter_ids
    )


def no_scalings(x, W0, As, Bs, scalings, adapter_ids):
    return mixed_forward(x, W0, As, Bs, [1.0] * len(As), adapter_ids)


def one_scaling(x, W0, As, Bs, scalings, adapter_ids):
    return mixed_forward(x, W0, As, Bs, [scalings[0]] * len(As), adapter_ids)


def no_base(x, W0, As, Bs, scalings, adapter_ids):
    y = mixed_forward(x, W0, As, Bs, scalings, adapter_ids)
    return np.where((adapter_ids >= 0)[:, None], y - x @ W0.T, y)


def cat_no_scalings(As, Bs, scalings, weights):
    return cat_combine(As, Bs, [1.0] * len(As), weights)


def cat_no_weights(As, Bs, scalings, weights):
    return cat_combine(As, Bs, scalings, [1.0] * len(As))


def cat_weight_twice(As, Bs, scalings, weights):
    A, _ = cat_combine(As, Bs, scalings, weights)
    return A, np.concatenate([w * s * B for w, s, B in zip(weights, scalings, Bs)], axis=1)


def cat_added(As, Bs, scalings, weights):
    return sum(As), sum(w * s * B for w, s, B in zip(weights, scalings, Bs))


def ring_no_send(grads, send):
    return [np.sum(grads, axis=0) for _ in grads]


def ring_whole_vectors(grads, send):
    P = len(grads)
    acc = [g.copy() for g in grads]
    moving = [g.copy() for g in grads]
    for _ in range(P - 1):
        moving = [send((i - 1) % P, i, moving[(i - 1) % P]) for i in range(P)]
        acc = [a + m for a, m in zip(acc, moving)]
    return acc


def ring_no_allgather(grads, send):
    P = len(grads)
    chunks = [np.array_split(g.copy(), P) for g in grads]
    for step in range(P - 1):
        msgs = [
            (i, (i - step) % P, send(i, (i + 1) % P, chunks[i][(i - step) % P])) for i in range(P)
        ]
        for i, c, values in msgs:
            chunks[(i + 1) % P][c] = chunks[(i + 1) % P][c] + values
    return [np.concatenate(c) for c in chunks]


def ring_to_everyone(grads, send):
    P = len(grads)
    return [sum(send(j, i, grads[j]) if j != i else grads[i] for j in range(P)) for i in range(P)]


def bytes_one_phase(layer_shapes, r, P, b):
    f, lo = allreduce_bytes(layer_shapes, r, P, b)
    return f / 2, lo / 2


def bytes_p(layer_shapes, r, P, b):
    f, lo = allreduce_bytes(layer_shapes, r, P, b)
    return f * P / (P - 1), lo * P / (P - 1)


def bytes_no_over_p(layer_shapes, r, P, b):
    f, lo = allreduce_bytes(layer_shapes, r, P, b)
    return f * P, lo * P


def bytes_lora_dk(layer_shapes, r, P, b):
    f, _ = allreduce_bytes(layer_shapes, r, P, b)
    return f, f * r


def bytes_numbers(layer_shapes, r, P, b):
    f, lo = allreduce_bytes(layer_shapes, r, P, b)
    return f / b, lo / b


@pytest.mark.parametrize(
    "check, fn, mistake",
    [
        (check_mixed_forward, all_adapters, sc.ALL_ADAPTERS),
        (check_mixed_forward, base_wraps, sc.BASE_WRAPS),
        (check_mixed_forward, first_only, sc.FIRST_ONLY),
        (check_mixed_forward, no_scalings, sc.NO_SCALINGS),
        (check_mixed_forward, one_scaling, sc.ONE_SCALING),
        (check_mixed_forward, no_base, sc.NO_BASE),
        (check_cat_combine, cat_no_scalings, sc.CAT_NO_SCALINGS),
        (check_cat_combine, cat_no_weights, sc.CAT_NO_WEIGHTS),
        (check_cat_combine, cat_weight_twice, sc.CAT_WEIGHT_TWICE),
        (check_cat_combine, cat_added, sc.CAT_ADDED),
        (check_ring_allreduce, ring_no_send, oc.NOT_SENT),
        (check_ring_allreduce, ring_whole_vectors, oc.WHOLE_VECTORS),
        (check_ring_allreduce, ring_no_allgather, oc.NO_ALLGATHER),
        (check_allreduce_bytes, bytes_one_phase, oc.BYTES_NO_TWO),
        (check_allreduce_bytes, bytes_p, oc.BYTES_P_NOT_P_MINUS_1),
        (check_allreduce_bytes, bytes_no_over_p, oc.BYTES_NO_OVER_P),
        (check_allreduce_bytes, bytes_lora_dk, oc.BYTES_LORA_DK),
        (check_allreduce_bytes, bytes_numbers, oc.BYTES_NO_BYTES),
    ],
    ids=lambda v: getattr(v, "key", getattr(v, "__name__", "")),
)
def test_planted_mistake_is_named(check, fn, mistake, capsys):
    assert check(fn) is False
    out = capsys.readouterr().out
    assert out.startswith("Not yet")
    assert mistake.title in out
    with pytest.raises(AssertionError, match="Not yet"):
        check(fn, strict=True)


def test_sending_to_a_worker_that_is_not_the_neighbour_is_refused_by_name(capsys):
    assert check_ring_allreduce(ring_to_everyone) is False
    out = capsys.readouterr().out
    assert "may send only to its ring neighbour" in out


def test_the_simulated_network_counts_what_each_worker_sends():
    ring = oc._Ring(3)
    got = ring.send(2, 0, np.arange(4.0))
    got[0] = 99.0  # a copy: changing what arrived does not change the sender's array
    assert ring.sent.tolist() == [0, 0, 4]
    with pytest.raises(ValueError, match="only to its ring neighbour 1"):
        ring.send(0, 2, np.zeros(1))


def test_bytes_reference_is_the_ring_formula_on_gpt2_shapes():
    # GPT-2 small's q and v (768 x 768 each) in 12 blocks, r = 8, 4 workers, float32
    shapes = [(768, 768)] * 24
    full, lora = oc.bytes_reference(shapes, 8, 4, 4)
    assert full == 2 * 3 / 4 * 24 * 768 * 768 * 4
    assert lora == 2 * 3 / 4 * 24 * 8 * (768 + 768) * 4
    assert full / lora == 768 * 768 / (8 * 1536)


@pytest.mark.parametrize(
    "check, fn",
    [(check_cat_combine, sc.cat_reference), (check_ring_allreduce, oc.ring_reference)],
)
def test_the_references_the_notebooks_use_pass_their_own_checks(check, fn):
    assert check(fn) is True
