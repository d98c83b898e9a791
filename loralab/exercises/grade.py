"""Grade a student's exercise notebook: run it, then run every exercise's check on what it defined.

The notebook is executed top to bottom (cells that raise are recorded, not fatal); then one extra cell
calls each exercise's check on the student's functions in the same kernel, so the score does not
depend on which check cells the student kept. One point per exercise.

Exercise cells are code cells tagged ``exercise`` whose metadata names the exercise and the functions
the student writes there::

    {"tags": ["exercise"], "loralab": {"exercise": "merge", "functions": ["merge", "unmerge"]}}

Usage: ``loralab grade NOTEBOOK...`` (this module's `main`); exit code 0 when every exercise
passes, 1 when any fails, 2 when a notebook cannot be read.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from loralab.exercises._catalogue import EXERCISES
from loralab.fileio import atomic_write

_MARKER = "LORALAB-GRADE-RESULTS:"


@dataclass
class ExerciseResult:
    """The verdict on one exercise: its key, whether it passed, and the check's message."""

    key: str
    passed: bool
    message: str


@dataclass
class GradeReport:
    """What `grade_notebook` found: one result per exercise and the cells that raised."""

    notebook: str
    results: list[ExerciseResult] = field(default_factory=list)
    cell_errors: list[str] = field(default_factory=list)
    executed: object = field(default=None, repr=False)  #: the executed notebook (nbformat node)

    @property
    def score(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> bool:
        return self.total > 0 and self.score == self.total

    def format(self) -> str:
        lines = [f"Grading {self.notebook}"]
        for r in self.results:
            number = list(EXERCISES).index(r.key) + 1
            lines.append(f"  [{'PASS' if r.passed else 'FAIL'}] {number}. {EXERCISES[r.key].title}")
            if not r.passed:
                lines += ["         " + line for line in r.message.splitlines()]
        for err in self.cell_errors:
            lines.append(f"  note: {err}")
        lines.append(f"Score: {self.score}/{self.total}")
        return "\n".join(lines)


def exercise_cells(nb) -> list:
    """The code cells tagged ``exercise``, in notebook order."""
    return [
        c
        for c in nb.cells
        if c.cell_type == "code" and "exercise" in c.get("metadata", {}).get("tags", [])
    ]


def fill_notebook(path, sources: dict[str, str], out=None):
    """Replace each exercise cell's source with ``sources[name]`` for the functions it names.

    Returns the notebook; writes it to ``out`` (atomically) when given. A function missing from
    ``sources`` raises ``KeyError`` naming it.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in exercise_cells(nb):
        names = cell.metadata["loralab"]["functions"]
        missing = [n for n in names if n not in sources]
        if missing:
            raise KeyError(f"fill_notebook: no source for {missing} (cell of {path})")
        cell.source = "\n\n".join(sources[n].strip() for n in names)
    if out is not None:
        _write_atomic(nb, Path(out))
    return nb


def _write_atomic(nb, out: Path) -> None:
    import nbformat

    atomic_write(out, lambda tmp: nbformat.write(nb, tmp))


def _exercise_keys(nb, path: Path) -> list[str]:
    keys = []
    for cell in exercise_cells(nb):
        key = cell.metadata.get("loralab", {}).get("exercise")
        if key in EXERCISES and key not in keys:
            keys.append(key)
    return keys or [k for k, e in EXERCISES.items() if e.notebook == path.name]


def run_in_kernel(keys: list[str], namespace: dict) -> None:
    """Run each exercise's check on the functions in ``namespace``; print the results as JSON.

    Called by the extra cell that `grade_notebook` appends, inside the student's kernel.
    """
    from loralab import exercises

    results = []
    for key in keys:
        ex = EXERCISES[key]
        fns = [namespace.get(name) for name in ex.functions]
        missing = [n for n, fn in zip(ex.functions, fns, strict=True) if not callable(fn)]
        if missing:
            msg = f"{', '.join(missing)} is not defined: the cell that defines it is missing or failed."
            results.append({"key": key, "passed": False, "message": msg})
            continue
        out = io.StringIO()
        with redirect_stdout(out):
            try:
                passed = bool(getattr(exercises, ex.check)(*fns))
            except Exception as exc:  # a check must never stop the grading of the others
                passed = False
                print(f"The check itself failed: {type(exc).__name__}: {exc}")
        results.append({"key": key, "passed": passed, "message": out.getvalue().strip()})
    print(_MARKER + json.dumps(results))


def grade_notebook(path, *, timeout: int = 120) -> GradeReport:
    """Execute the notebook at ``path`` and check every exercise it contains.

    Parameters
    ----------
    path : str or Path
        A student's copy of one of the notebooks in ``tutorials/exercises/``.
    timeout : int
        Seconds allowed per cell.

    Returns
    -------
    GradeReport
        One `ExerciseResult` per exercise, and a note for each cell that raised.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    keys = _exercise_keys(nb, path)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "from loralab.exercises.grade import run_in_kernel as _loralab_grade\n"
            f"_loralab_grade({keys!r}, globals())"
        )
    )
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    report = GradeReport(notebook=str(path), executed=nb)
    try:
        client.execute()
    except Exception as exc:  # timeouts and dead kernels: grade what ran
        report.cell_errors.append(f"execution stopped: {type(exc).__name__}: {exc}")
    for index, cell in enumerate(nb.cells[:-1]):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                report.cell_errors.append(
                    f"cell {index} raised {output['ename']}: {output['evalue']}"
                )
    found = _parse_results(nb.cells[-1])
    for key in keys:
        if key in found:
            report.results.append(ExerciseResult(key, *found[key]))
        else:
            report.results.append(
                ExerciseResult(key, False, "not graded: the notebook did not run.")
            )
    return report


def _parse_results(cell) -> dict[str, tuple[bool, str]]:
    for output in cell.get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith(_MARKER):
                rows = json.loads(line[len(_MARKER) :])
                return {r["key"]: (r["passed"], r["message"]) for r in rows}
    return {}


def main(argv: list[str] | None = None) -> int:
    """``loralab grade NOTEBOOK... [--timeout S]``: print a score per exercise.

    Returns 0 when every exercise of every notebook passes, 1 when any fails, 2 when a notebook
    is missing or holds no exercises.
    """
    parser = argparse.ArgumentParser(
        prog="loralab grade", description="Run exercise notebooks and score each exercise."
    )
    parser.add_argument("notebooks", nargs="+", type=Path, help="student notebook(s) (.ipynb)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if not path.is_file():
            print(f"loralab grade: no such notebook: {path}", file=sys.stderr)
            return 2
    code = 0
    score = total = 0
    for path in args.notebooks:
        report = grade_notebook(path, timeout=args.timeout)
        print(report.format())
        if report.total == 0:
            print(f"loralab grade: {path} holds no exercises", file=sys.stderr)
            return 2
        score, total = score + report.score, total + report.total
        code = code or (0 if report.passed else 1)
    if len(args.notebooks) > 1:
        print(f"Total: {score}/{total}")
    return code


if __name__ == "__main__":
    sys.exit(main())
