"""`edit_count`, the counter of edits to a model's parameters and options, and the serving
caches that trust it: a mixed batch's holders and stack are worked out once, then reused until
an edit moves the counter; every kind of edit after a reused batch shows in the next one."""

import numpy as np
import pytest
from builders import nonzero_B

from loralab import nn
from loralab.lora import (
    delete_adapter,
    inject_lora,
    lora_layers,
    merge_lora,
    mixed_batch,
    set_adapter,
    unmerge_lora,
)
from loralab.lora import linear_layer as LL
from loralab.lora import named_adapters as NA
from loralab.nn.module import Parameter, edit_count
from loralab.tensor import no_grad

NAMES = ["t2", "t0", "t1", "t0", "t2", "t1", "__base__", "t2"]


def _model(k=3, r=2):
    model = nn.MLP([6, 7, 5], seed=0, dtype=np.float64)
    for i in range(k):
        inject_lora(model, ["0", "2"], r=r, alpha=2 * r, seed=i, adapter_name=f"t{i}")
    return nonzero_B(model, seed=4).eval()


def _serve(model, x, names=NAMES):
    with no_grad(), mixed_batch(model, names):
        return model(x).data


def _each_row(model, x, names=NAMES):
    """The reference: row i through adapter names[i] alone (the base for "__base__")."""
    out = []
    layers = [layer for _, layer in lora_layers(model)]
    for i, n in enumerate(names):
        for layer in layers:
            layer.active_adapter_names = [] if n == "__base__" else [n]
        out.append(model(x[i : i + 1]).data[0])
    return np.array(out)


# ----- the counter --------------------------------------------------------------------------------
def test_new_arrays_and_module_attributes_move_the_count_and_edits_inside_do_not():
    p = Parameter(np.zeros((2, 3)))
    m = nn.Linear(3, 2, seed=0)
    steps = {
        "p.data = new": lambda: setattr(p, "data", np.ones((2, 3))),
        "p.data += 1": lambda: p.__setattr__("data", p.data.__iadd__(1.0)),
        "module attribute": lambda: setattr(m, "note", 1),
        "new parameter": lambda: setattr(m, "weight", Parameter(np.zeros((2, 3)))),
        "deleted attribute": lambda: delattr(m, "note"),
    }
    for what, step in steps.items():
        before = edit_count()
        step()
        assert edit_count() > before, what
    before = edit_count()
    p.data[0, 0] = 5.0  # inside the array: the same object, read anew by whoever holds it
    p.grad = np.ones((2, 3))
    m.train(False)
    assert edit_count() == before


def test_a_layer_s_quiet_attributes_leave_the_count_alone():
    layer = lora_layers(_model())[0][1]
    before = edit_count()
    layer.mixed_rows = list(NAMES)
    layer.mixed_rows = None
    assert edit_count() == before
    layer.disabled = False  # not quiet: any other attribute counts
    assert edit_count() == before + 1


# ----- the serving caches -------------------------------------------------------------------------
def _refuse(*args, **kwargs):
    raise AssertionError("read again: the cache was not used")


def test_an_untouched_model_reads_its_adapters_once(monkeypatch):
    """Once a batch has run on the stacked adapters (the first stacks them: new arrays), the
    next reads no holder, no A, B or scaling: with the readers made to fail, it still gives the
    same rows."""
    model = _model()
    x = np.random.default_rng(0).normal(size=(len(NAMES), 6))
    _serve(model, x)
    y = _serve(model, x)
    monkeypatch.setattr(LL, "holders_with_dora", _refuse)
    for name in ("_A_DATA", "_B_DATA", "_SCALING"):
        monkeypatch.setattr(LL, name, _refuse)
    np.testing.assert_array_equal(_serve(model, x), y)
    monkeypatch.undo()
    np.testing.assert_allclose(y, _each_row(model, x), rtol=1e-12, atol=1e-12)


def _new_parameter(model):
    holder = lora_layers(model)[0][1].adapter("t1")
    holder.lora_A = Parameter(holder.lora_A.data * 2.0)


def _new_array(model):
    holder = lora_layers(model)[1][1].adapter("t2")
    holder.lora_B.data = holder.lora_B.data - 0.5


def _edit_inside(model):
    lora_layers(model)[0][1].adapter("t0").lora_B.data[2, 1] += 1.5


def _new_scaling(model):
    lora_layers(model)[1][1].adapter("t0").scaling *= 4.0


def _added_adapter(model):
    inject_lora(model, ["0", "2"], r=2, alpha=4, seed=9, adapter_name="t3")
    nonzero_B(model, seed=5)


def _deleted_adapter(model):
    delete_adapter(model, "t1")


EDITS = [_new_parameter, _new_array, _edit_inside, _new_scaling, _added_adapter, _deleted_adapter]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
def test_every_edit_after_a_reused_batch_shows_in_the_next(edit):
    model = _model()
    x = np.random.default_rng(1).normal(size=(len(NAMES), 6))
    y = _serve(model, x)
    np.testing.assert_array_equal(_serve(model, x), y)  # the cached batch
    edit(model)
    names = [n if n != "t1" or edit is not _deleted_adapter else "t0" for n in NAMES]
    if edit is _added_adapter:
        names = [*names[:-1], "t3"]
    y2 = _serve(model, x, names)
    assert not np.allclose(y2, y)
    np.testing.assert_allclose(y2, _each_row(model, x, names), rtol=1e-12, atol=1e-12)


def test_an_adapter_turned_to_dora_after_a_reused_batch_is_refused():
    model = _model()
    x = np.random.default_rng(2).normal(size=(len(NAMES), 6))
    _serve(model, x)
    _serve(model, x)
    lora_layers(model)[0][1].adapter("t0").use_dora = True
    with pytest.raises(ValueError, match="DoRA"):
        _serve(model, x)


def test_the_remembered_lora_layers_follow_new_and_replaced_layers():
    model = nn.MLP([6, 7, 5], seed=0, dtype=np.float64)
    inject_lora(model, ["0"], r=2, seed=0)
    assert [n for n, _ in lora_layers(model)] == ["0"]
    assert [n for n, _ in lora_layers(model)] == ["0"]  # remembered
    setattr(model, "2", LL.LoRALinear(model.get_submodule("2"), r=2, seed=1))  # a new one
    assert [n for n, _ in lora_layers(model)] == ["0", "2"]
    setattr(model, "2", nn.Linear(7, 5, seed=2, dtype=np.float64))  # and a plain one again
    assert [n for n, _ in lora_layers(model)] == ["0"]


def test_a_batch_no_layer_holds_whole_still_names_its_unknown_adapters():
    model = nn.MLP([6, 7, 5], seed=0, dtype=np.float64)
    inject_lora(model, ["0"], r=2, seed=0, adapter_name="a")
    inject_lora(model, ["2"], r=2, seed=1, adapter_name="b")
    nonzero_B(model, seed=2).eval()
    x = np.random.default_rng(3).normal(size=(3, 6))
    for _ in range(2):  # the second time from what the layers remember
        y = _serve(model, x, ["a", "b", "__base__"])
        np.testing.assert_allclose(y, _each_row(model, x, ["a", "b", "__base__"]), atol=1e-12)
        with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
            _serve(model, x, ["a", "b", "c"])


# ----- the batch's routing, worked out once per composition ---------------------------------------
def _count_routes(monkeypatch):
    """Make `route_rows` (the sort of a batch by adapter) count its calls."""
    calls = []
    real = NA.route_rows

    def counted(rows):
        calls.append(list(rows))
        return real(rows)

    monkeypatch.setattr(NA, "route_rows", counted)
    return calls


def test_the_same_rows_again_are_routed_once(monkeypatch):
    """A decode loop serves the same rows step after step: the routing is worked out for the
    first and reused while the rows are equal (new lists, equal names) and the model unedited."""
    calls = _count_routes(monkeypatch)
    model = _model()
    x = np.random.default_rng(4).normal(size=(len(NAMES), 6))
    _serve(model, x)  # the first batch stacks the adapters: new arrays, an edit
    ys = [_serve(model, x, list(NAMES)) for _ in range(3)]
    assert len(calls) == 2
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])
    np.testing.assert_allclose(ys[0], _each_row(model, x), rtol=1e-12, atol=1e-12)
    other = NAMES[::-1]
    np.testing.assert_allclose(
        _serve(model, x, other), _each_row(model, x, other), rtol=1e-12, atol=1e-12
    )
    assert len(calls) == 3  # other rows: routed anew ...
    np.testing.assert_array_equal(_serve(model, x, list(NAMES)), ys[0])
    assert len(calls) == 4  # ... and only the last composition is kept
    _new_scaling(model)
    _serve(model, x, list(NAMES))
    assert len(calls) == 5  # an edit: routed anew


def test_rows_changed_in_place_after_a_batch_are_routed_anew(monkeypatch):
    calls = _count_routes(monkeypatch)
    model = _model()
    x = np.random.default_rng(5).normal(size=(len(NAMES), 6))
    rows = list(NAMES)
    _serve(model, x, rows)
    rows[0] = "t0"  # the caller's own list, edited: the block kept a copy
    np.testing.assert_allclose(_serve(model, x, rows), _each_row(model, x, rows), atol=1e-12)
    assert len(calls) == 2


def test_remembered_rows_are_checked_again_after_a_delete_and_a_merge():
    """The checks of a batch hold for its remembered routing: rows naming a deleted adapter are
    refused; a merge (which edits W0 in place, not counted) is refused too."""
    model = _model()
    set_adapter(model, "t0")  # (the adapter merge_lora merges; itself an edit)
    x = np.random.default_rng(6).normal(size=(len(NAMES), 6))
    _serve(model, x)
    _serve(model, x)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        _serve(model, x)
    unmerge_lora(model)
    _serve(model, x)
    delete_adapter(model, "t1")
    with pytest.raises(ValueError, match=r"unknown adapters \['t1'\]"):
        _serve(model, x)
