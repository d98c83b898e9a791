"""Exercise 14's check (NF4 quantization): a right answer passes, each usual mistake is named."""

import re
from pathlib import Path

import numpy as np
import pytest

from loralab.exercises import EXERCISES, check_nf4_quantization
from loralab.exercises import quant_checks as qc
from loralab.quant import NF4_VALUES, quantize

LEVELS = NF4_VALUES.astype(np.float64)
NOTEBOOK = Path(__file__).parents[1] / "tutorials" / "exercises" / "14_nf4_quantization.ipynb"


def nearest(x, levels=LEVELS):
    return np.abs(x[..., None] - levels).argmin(axis=-1)


def good_quantize(W, block_size):
    blocks = W.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    return nearest(blocks / absmax[:, None]).reshape(W.shape), absmax


def good_dequantize(codes, absmax, shape, block_size):
    values = LEVELS[np.asarray(codes).reshape(-1)].reshape(-1, block_size)
    return (values * absmax[:, None]).reshape(shape)


def one_absmax(W, block_size):
    absmax = np.abs(W).max()
    return nearest(W / absmax), np.full(W.size // block_size, absmax)


def not_normalised(W, block_size):
    return nearest(W), np.abs(W.reshape(-1, block_size)).max(axis=1)


def floor(W, block_size):
    codes, absmax = good_quantize(W, block_size)
    scaled = W.reshape(-1, block_size) / absmax[:, None]
    return np.searchsorted(LEVELS, scaled, side="right") - 1, absmax


def uniform(W, block_size):
    _, absmax = good_quantize(W, block_size)
    scaled = W.reshape(-1, block_size) / absmax[:, None]
    return nearest(scaled, np.linspace(-1, 1, 16)), absmax


def without_absmax(codes, absmax, shape, block_size):
    return LEVELS[np.asarray(codes)].reshape(shape)


def tiled(codes, absmax, shape, block_size):
    values = LEVELS[np.asarray(codes).reshape(-1)]
    return (values * np.tile(absmax, block_size)).reshape(shape)


def test_the_exercise_is_in_the_catalogue():
    assert EXERCISES["nf4_quantization"].check == "check_nf4_quantization"
    assert EXERCISES["nf4_quantization"].notebook == NOTEBOOK.name


def test_a_right_answer_passes(capsys):
    assert check_nf4_quantization(good_quantize, good_dequantize)
    out = capsys.readouterr().out
    assert out.startswith("Correct") and "Round trip" in out


def test_the_reference_agrees_with_the_library():
    W = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    codes, absmax = qc.reference_quantize(W.astype(np.float64), 64)
    q = quantize(W, "nf4", 64)
    np.testing.assert_array_equal(codes, q.level_codes())
    np.testing.assert_allclose(
        qc.reference_dequantize(codes, absmax, W.shape, 64), q.dequantize(), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("quantize_fn", "dequantize_fn", "mistake"),
    [
        (one_absmax, good_dequantize, qc.ONE_ABSMAX),
        (not_normalised, good_dequantize, qc.NOT_NORMALISED),
        (floor, good_dequantize, qc.FLOOR),
        (uniform, good_dequantize, qc.UNIFORM),
        (good_quantize, without_absmax, qc.NO_ABSMAX),
        (good_quantize, tiled, qc.TILED),
    ],
)
def test_each_usual_mistake_is_named(quantize_fn, dequantize_fn, mistake, capsys):
    assert not check_nf4_quantization(quantize_fn, dequantize_fn)
    out = capsys.readouterr().out
    assert out.startswith("Not yet") and mistake.title in out


def test_a_scalar_absmax_is_named_as_one_absmax(capsys):
    assert not check_nf4_quantization(lambda W, bs: (nearest(W / np.abs(W).max()), np.abs(W).max()))
    assert qc.ONE_ABSMAX.title in capsys.readouterr().out


def test_strict_raises_and_unimplemented_is_said():
    def todo(W, block_size):
        raise NotImplementedError

    with pytest.raises(AssertionError, match="not implemented yet"):
        check_nf4_quantization(todo, strict=True)


SOLUTIONS = {
    "nf4_quantize": """def nf4_quantize(W, block_size):
    blocks = W.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / absmax[:, None]
    return np.abs(scaled[..., None] - NF4_VALUES).argmin(axis=-1), absmax
""",
    "nf4_dequantize": """def nf4_dequantize(codes, absmax, shape, block_size):
    values = NF4_VALUES.astype(np.float64)[np.asarray(codes).reshape(-1, block_size)]
    return (values * absmax[:, None]).reshape(shape)
""",
}


def test_the_blank_notebook_carries_no_outputs_and_two_stubs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].source.count("raise NotImplementedError") == 2


@pytest.mark.notebook
def test_the_notebook_filled_with_answers_is_graded_correct(tmp_path):
    pytest.importorskip("nbclient")
    from loralab.exercises.grade import fill_notebook, grade_notebook

    solved = tmp_path / NOTEBOOK.name
    fill_notebook(NOTEBOOK, SOLUTIONS, solved)
    report = grade_notebook(solved)
    assert [(r.key, r.passed) for r in report.results] == [("nf4_quantization", True)], report


def test_a_float32_w_hat_is_named_with_digits_that_differ(capsys):
    """Not "got 1.03884, expected 1.03884": the dtype is named and the digits show the gap."""

    def float32_dequantize(codes, absmax, shape, block_size):
        return good_dequantize(codes, absmax, shape, block_size).astype(np.float32)

    assert not check_nf4_quantization(good_quantize, float32_dequantize)
    out = capsys.readouterr().out
    got, expected = re.search(r"\(got (\S+), expected (\S+)\)", out).groups()
    assert got != expected
    assert "Your W_hat is float32" in out and "NF4_VALUES.astype(np.float64)" in out
