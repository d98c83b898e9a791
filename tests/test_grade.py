"""Grading executes real notebooks: solved ones pass, stubbed and wrong ones fail with reasons."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loralab.exercises import EXERCISES, MISTAKES
from loralab.exercises.grade import exercise_cells, fill_notebook, grade_notebook, main

pytest.importorskip("nbclient")
pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials" / "exercises").glob("*.ipynb"))


def _solution_sources() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location(
        "loralab_solutions", ROOT / "instructor" / "solutions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.solution_sources()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_with_solutions_swapped_in_passes_every_check(notebook, tmp_path):
    solved = tmp_path / notebook.name
    nb = fill_notebook(notebook, _solution_sources(), solved)
    report = grade_notebook(solved)
    assert report.cell_errors == []
    assert report.passed, report.format()
    assert [r.key for r in report.results] == [
        k for k, e in EXERCISES.items() if e.notebook == notebook.name
    ]
    # The check cells the student sees print the success message as well.
    checks = [c for c in report.executed.cells if "check" in c.metadata.get("tags", [])]
    printed = ["".join(o.get("text", "") for o in c.outputs) for c in checks]
    assert len(printed) == len(report.results)
    assert all(text.startswith("Correct:") for text in printed)
    assert not any("NotImplementedError" in c.source for c in exercise_cells(nb))


def test_stubbed_notebooks_run_to_the_end_and_score_zero(capsys):
    assert main([str(p) for p in NOTEBOOKS]) == 1
    out = capsys.readouterr().out
    assert f"Total: 0/{len(EXERCISES)}" in out
    assert out.count("is not implemented yet") == len(EXERCISES)
    assert "note: cell" not in out  # no cell raised: every stub was caught by its check


def test_partly_wrong_notebook_scores_per_exercise(tmp_path, capsys):
    sources = _solution_sources()
    sources["sgd_step"] = sources["sgd_step"].replace("p - lr", "p + lr")
    sources["adam_step"] = (
        "def adam_step(params, grads, state, trainable, lr, betas, eps, t)\n    pass"
    )
    student = tmp_path / "04_merge_and_optimizer.ipynb"
    fill_notebook(NOTEBOOKS[3], sources, student)
    report = grade_notebook(student)
    assert [(r.key, r.passed) for r in report.results] == [
        ("merge", True),
        ("sgd_step", False),
        ("adam_step", False),
    ]
    assert MISTAKES["gradient_ascent"].title in report.results[1].message
    assert "adam_step is not defined" in report.results[2].message
    assert any("SyntaxError" in e for e in report.cell_errors)
    assert report.score == 1 and not report.passed
    assert main([str(student)]) == 1
    assert "Score: 1/3" in capsys.readouterr().out


def test_grade_missing_notebook_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.ipynb")]) == 2
    assert "no such notebook" in capsys.readouterr().err


def test_fill_notebook_names_a_missing_solution():
    with pytest.raises(KeyError, match="lora_forward"):
        fill_notebook(NOTEBOOKS[0], {})
