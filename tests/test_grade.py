"""Grading executes real notebooks: solved ones pass, stubbed and wrong ones fail with reasons."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.cli import main as cli_main
from loralab.exercises import EXERCISES, MISTAKES, grade
from loralab.exercises.grade import exercise_cells, fill_notebook, grade_notebook, main

pytest.importorskip("nbclient")
pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials" / "exercises").glob("*.ipynb"))


@pytest.fixture(autouse=True)
def _stand_in_package(tmp_path_factory, monkeypatch):
    """The grader hashes the installed loralab before and after each notebook; others may be
    editing loralab's files while these tests run, so hash a small stand-in here (the guard itself
    is tested in tests/test_grade_isolation.py)."""
    package = tmp_path_factory.mktemp("package")
    (package / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(grade, "_package_dir", lambda: package)


def test_the_installed_package_is_hashed_file_by_file():
    files = grade._package_files(Path(grade.__file__).resolve().parent.parent)
    assert "exercises/grade.py" in files and "__init__.py" in files
    assert grade._package_changes(files, files) == []
    changed = dict(files, **{"exercises/grade.py": "0" * 64, "new.py": "1" * 64})
    changed["lora/__pycache__/ops.cpython-311.pyc"] = "2" * 64  # Python's own: allowed
    assert grade._package_changes(files, changed) == ["exercises/grade.py", "new.py"]


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
    # An exercise whose functions cannot cross to the grader as plain data says where it was checked.
    for result in report.results:
        inside = "Checked inside your notebook's kernel" in result.message
        assert inside == (result.key in grade.NOT_ISOLATED), result.message


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
    student = tmp_path / "06_merge_and_optimizer.ipynb"
    fill_notebook(NOTEBOOKS[3], sources, student)
    report = grade_notebook(student)
    assert [(r.key, r.passed) for r in report.results] == [
        ("merge", True),
        ("sgd_step", False),
        ("adam_step", False),
    ]
    assert MISTAKES["gradient_ascent"].title in report.results[1].message
    assert "adam_step is not defined" in report.results[2].message
    # the error is located in the notebook (cell, line), not in IPython's made-up file name
    syntax = [e for e in report.cell_errors if "SyntaxError" in e]
    assert syntax == [
        "cell 10 (`def adam_step(params, grads, state, trainable, lr, betas,...`), line 1 "
        "raised SyntaxError: expected ':'"
    ], report.cell_errors
    assert not any(".py, line" in e for e in report.cell_errors)
    assert report.score == 1 and not report.passed
    assert main([str(student)]) == 1
    assert "Score: 1/3" in capsys.readouterr().out


def test_grade_missing_notebook_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.ipynb")]) == 2
    assert "no such notebook" in capsys.readouterr().err


def test_fill_notebook_names_a_missing_solution():
    with pytest.raises(KeyError, match="lora_forward"):
        fill_notebook(NOTEBOOKS[0], {})


def test_one_hanging_or_exiting_exercise_leaves_the_others_graded(tmp_path):
    sources = _solution_sources()
    sources["merge"] = "def merge(W0, A, B, scaling):\n    import sys\n    sys.exit()"
    sources["sgd_step"] = (
        "def sgd_step(params, grads, trainable, lr):\n    while True:\n        pass"
    )
    student = tmp_path / "06_merge_and_optimizer.ipynb"
    fill_notebook(NOTEBOOKS[3], sources, student)
    start = time.perf_counter()
    report = grade_notebook(student, timeout=60, time_limit=0.5)
    assert time.perf_counter() - start < 50
    assert [(r.key, r.passed) for r in report.results] == [
        ("merge", False),
        ("sgd_step", False),
        ("adam_step", True),
    ]
    assert "`merge` called exit" in report.results[0].message
    assert "did not return within 0.5 s" in report.results[1].message
    assert report.cell_errors == []


def test_a_cell_that_never_finishes_is_interrupted_and_the_rest_is_graded(tmp_path):
    sources = _solution_sources()
    sources["sgd_step"] = "while True:\n    pass"  # at top level: the cell itself never ends
    student = tmp_path / "06_merge_and_optimizer.ipynb"
    fill_notebook(NOTEBOOKS[3], sources, student)
    report = grade_notebook(student, timeout=3)
    assert [(r.key, r.passed) for r in report.results] == [
        ("merge", True),
        ("sgd_step", False),
        ("adam_step", True),
    ]
    assert "sgd_step is not defined" in report.results[1].message
    assert any("3 s" in e for e in report.cell_errors), report.cell_errors


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("print('hello')\n", "not JSON"),
        ('{"cells": [', "not JSON"),
        ("[1, 2, 3]", "no cells"),
        ('{"metadata": {}}', "no cells"),
        ('{"cells": 5, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}', "no cells"),
        (b"\xff\xfe\x00binary", "not JSON"),
    ],
)
@pytest.mark.parametrize("via_cli", [False, True])
def test_grade_refuses_a_file_that_is_not_a_notebook(tmp_path, capsys, content, why, via_cli):
    path = tmp_path / "homework.ipynb"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    argv = [str(path)]
    assert (cli_main(["grade", *argv]) if via_cli else main(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("loralab grade: ")
    assert str(path) in lines[0] and why in lines[0]
    assert "Traceback" not in captured.err


def test_grade_checks_every_file_before_running_any(tmp_path, capsys):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{}", encoding="utf-8")
    assert main([str(NOTEBOOKS[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the good notebook was not graded first
    assert "bad.ipynb" in captured.err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"timeout": 0}, ValueError, "timeout must be a positive number, got timeout=0"),
        ({"timeout": "60"}, TypeError, "timeout must be a positive number, got timeout='60'"),
        ({"time_limit": float("inf")}, ValueError, "time_limit must be a positive number"),
        (
            {"time_limit": True},
            TypeError,
            "time_limit must be a positive number, got time_limit=True",
        ),
    ],
)
def test_grade_notebook_refuses_bad_limits_before_reading_anything(kwargs, error, match):
    with pytest.raises(error, match="^grade_notebook: " + match):
        grade_notebook("no-such-notebook.ipynb", **kwargs)


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "ten"])
@pytest.mark.parametrize("via_cli", [False, True])
def test_grade_timeout_must_be_positive(capsys, timeout, via_cli):
    argv = [str(NOTEBOOKS[0]), f"--timeout={timeout}"]
    assert (cli_main(["grade", *argv]) if via_cli else main(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "--timeout" in lines[0] and timeout in lines[0]


@pytest.mark.parametrize("limit", ["0", "-1", "nan", "x"])
@pytest.mark.parametrize("via_cli", [False, True])
def test_grade_time_limit_must_be_positive(capsys, limit, via_cli):
    argv = [str(NOTEBOOKS[0]), f"--time-limit={limit}"]
    assert (cli_main(["grade", *argv]) if via_cli else main(argv)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--time-limit" in lines[0]


def test_solutions_script_has_a_real_command_line(tmp_path):
    """`--help` prints usage (it once wrote notebooks into a folder named --help); OUT_DIR is required."""
    script = ROOT / "instructor" / "solutions.py"
    run = [sys.executable, str(script)]
    shown = subprocess.run([*run, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and "OUT_DIR" in shown.stdout
    missing = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 2 and "OUT_DIR" in missing.stderr
    assert list(tmp_path.iterdir()) == []
    done = subprocess.run([*run, "solved"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "solved").iterdir()) == [p.name for p in NOTEBOOKS]


def test_solved_notebooks_are_git_ignored():
    assert "solved/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
