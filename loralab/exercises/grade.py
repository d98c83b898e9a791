"""Grade a student's exercise notebook: run it, then run every exercise's check on what it defined.

The notebook is executed top to bottom (cells that raise are recorded, not fatal); then one extra cell
calls each exercise's check on the student's functions in the same kernel, so the score does not
depend on which check cells the student kept. One point per exercise.

Exercise cells are code cells tagged ``exercise`` whose metadata names the exercise and the functions
the student writes there::

    {"tags": ["exercise"], "loralab": {"exercise": "merge", "functions": ["merge", "unmerge"]}}

A student's function that never returns is stopped after ``time_limit`` seconds per call, a call of
``sys.exit()`` is caught, and a cell that runs past ``timeout`` is interrupted: each makes that one
exercise fail with a message saying so, and the others are still graded.

Usage: ``loralab grade NOTEBOOK... [--timeout S] [--time-limit S]`` (this module's `main`); exit
code 0 when every exercise passes, 1 when any fails, 2 when a notebook cannot be read (missing,
not a notebook, no exercises) or an option is wrong: one line on stderr, and nothing is graded.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from loralab._validate import positive_number
from loralab.exercises._catalogue import EXERCISES
from loralab.fileio import atomic_write

_MARKER = "LORALAB-GRADE-RESULT:"


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
        """How many exercises passed."""
        return sum(r.passed for r in self.results)

    @property
    def total(self) -> int:
        """How many exercises the notebook holds (and were graded)."""
        return len(self.results)

    @property
    def passed(self) -> bool:
        """True when there is at least one exercise and every one passed."""
        return self.total > 0 and self.score == self.total

    def format(self) -> str:
        """The report as printed by ``loralab grade``: one PASS/FAIL line per exercise (with the
        check's message under a FAIL), the cells that raised, and ``Score: score/total``."""
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


def run_in_kernel(keys: list[str], namespace: dict, time_limit: float | None = None) -> None:
    """Run each exercise's check on the functions in ``namespace``; print each result as JSON.

    Called by the extra cell that `grade_notebook` appends, inside the student's kernel. One line
    per exercise, printed as soon as its check ends, so the results before a crash are kept.
    """
    from loralab import exercises

    for key in keys:
        ex = EXERCISES[key]
        fns = [namespace.get(name) for name in ex.functions]
        missing = [n for n, fn in zip(ex.functions, fns, strict=True) if not callable(fn)]
        if missing:
            msg = f"{', '.join(missing)} is not defined: the cell that defines it is missing or failed."
            row = {"key": key, "passed": False, "message": msg}
        else:
            out = io.StringIO()
            with redirect_stdout(out):
                try:
                    passed = bool(getattr(exercises, ex.check)(*fns, time_limit=time_limit))
                except (Exception, SystemExit) as exc:  # never stop the grading of the others
                    passed = False
                    print(f"The check itself failed: {type(exc).__name__}: {exc}")
            row = {"key": key, "passed": passed, "message": out.getvalue().strip()}
        print(_MARKER + json.dumps(row), flush=True)


class NotebookError(ValueError):
    """A file that `grade_notebook` cannot grade; the message names the file and why."""


def read_notebook(path):
    """The notebook at ``path`` (nbformat v4), or `NotebookError` saying why it is not one."""
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise NotebookError(f"no such notebook: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotebookError(f"{path} is not a notebook: not JSON ({_first_line(exc)})") from None
    except OSError as exc:
        raise NotebookError(f"cannot read {path}: {_first_line(exc)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        raise NotebookError(f"{path} is not a notebook: JSON with no cells list")
    try:
        nb = nbformat.reads(json.dumps(raw), as_version=4)
    except Exception as exc:  # nbformat's errors have no common base
        raise NotebookError(
            f"{path} is not a notebook nbformat can read: {_first_line(exc)}"
        ) from None
    if not _exercise_keys(nb, path):
        raise NotebookError(f"{path} holds no exercises")
    return nb


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def grade_notebook(path, *, timeout: int = 120, time_limit: float | None = None) -> GradeReport:
    """Execute the notebook at ``path`` and check every exercise it contains.

    Parameters
    ----------
    path : str or Path
        A student's copy of one of the notebooks in ``tutorials/exercises/``.
    timeout : int
        Seconds allowed per cell; a cell that runs longer is interrupted and the rest still runs.
    time_limit : float or None
        Seconds allowed per call of a student's function during grading (None: the checks'
        default, `loralab.exercises.TIME_LIMIT`).

    Returns
    -------
    GradeReport
        One `ExerciseResult` per exercise, and a note for each cell that raised.

    Raises
    ------
    NotebookError
        ``path`` is missing, is not a notebook, or holds no exercises.
    """
    import nbformat
    from nbclient import NotebookClient

    cell_seconds = math.ceil(positive_number("timeout", timeout, "grade_notebook"))
    if time_limit is not None:
        time_limit = float(positive_number("time_limit", time_limit, "grade_notebook"))
    path = Path(path)
    nb = read_notebook(path)
    keys = _exercise_keys(nb, path)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "from loralab.exercises.grade import run_in_kernel as _loralab_grade\n"
            f"_loralab_grade({keys!r}, globals(), {time_limit!r})"
        )
    )
    stopped = f"the cell ran longer than --timeout {cell_seconds} s and was stopped"
    client = NotebookClient(
        nb,
        timeout=cell_seconds,
        kernel_name="python3",
        allow_errors=True,
        interrupt_on_timeout=True,
        error_on_timeout={"ename": "Timeout", "evalue": stopped, "traceback": []},
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    report = GradeReport(notebook=str(path), executed=nb)
    try:
        client.execute()
    except Exception as exc:  # dead kernels: grade what ran
        report.cell_errors.append(f"execution stopped: {type(exc).__name__}: {exc}")
    for index, cell in enumerate(nb.cells[:-1]):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                report.cell_errors.append(_cell_error(index, cell, output, stopped))
    found = _parse_results(nb.cells[-1])
    for key in keys:
        if key in found:
            report.results.append(ExerciseResult(key, *found[key]))
        elif found:
            why = "not graded: its check did not finish (the kernel stopped or the grading timed out)."
            report.results.append(ExerciseResult(key, False, why))
        else:
            report.results.append(
                ExerciseResult(key, False, "not graded: the notebook did not run.")
            )
    return report


# IPython compiles each cell as a file with a made-up name: "invalid syntax (106727793.py, line 13)".
_CELL_FILE = re.compile(r"\s*\((?:[^()]*[\\/])?\d+\.py, line (\d+)\)$")


def _cell_error(index: int, cell, output, stopped: str) -> str:
    """One line naming a cell that raised: its number counted from 1 at the top of the notebook
    (markdown cells included), how it starts, and for a SyntaxError the line of the cell."""
    lines = cell.source.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    first = first if len(first) <= 60 else first[:57] + "..."
    label = f"cell {index + 1}" + (f" (`{first}`)" if first else "")
    if output["ename"] == "KeyboardInterrupt":
        return f"{label}: {stopped}"
    evalue = output["evalue"]
    found = _CELL_FILE.search(evalue)
    if found:
        number = int(found.group(1))
        evalue = evalue[: found.start()]
        if 1 <= number <= len(lines) and lines[number - 1].strip() and number > 1:
            evalue += f": `{lines[number - 1].strip()}`"
        label += f", line {number}"
    return f"{label} raised {output['ename']}: {evalue}"


def _parse_results(cell) -> dict[str, tuple[bool, str]]:
    found = {}
    for output in cell.get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith(_MARKER):
                row = json.loads(line[len(_MARKER) :])
                found[row["key"]] = (row["passed"], row["message"])
    return found


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage and sys.exit
        raise _UsageError(f"{self.prog}: error: {message}")


def _seconds(kind):
    """An argparse type: a positive number of seconds (``kind`` int or float), one-line errors."""

    def parse(text: str):
        try:
            return positive_number("seconds", kind(text), "grade")
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(
                f"must be a positive {what} of seconds, got {text!r}"
            ) from None

    return parse


def main(argv: list[str] | None = None) -> int:
    """``loralab grade NOTEBOOK... [--timeout S] [--time-limit S]``: print a score per exercise.

    Every notebook is read first; returns 2 (one line on stderr, nothing graded) when one is
    missing, is not a notebook or holds no exercises, or when an option is wrong. Otherwise
    returns 0 when every exercise of every notebook passes, 1 when any fails.
    """
    parser = _Parser(
        prog="loralab grade", description="Run exercise notebooks and score each exercise."
    )
    parser.add_argument("notebooks", nargs="+", type=Path, help="student notebook(s) (.ipynb)")
    parser.add_argument(
        "--timeout", type=_seconds(int), default=120, help="seconds per cell (default 120)"
    )
    parser.add_argument(
        "--time-limit",
        type=_seconds(float),
        default=None,
        help="seconds per call of a student's function (default: the checks' 5)",
    )
    try:
        args = parser.parse_args(argv)
        for path in args.notebooks:
            read_notebook(path)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except NotebookError as exc:
        print(f"loralab grade: {exc}", file=sys.stderr)
        return 2
    code = 0
    score = total = 0
    for path in args.notebooks:
        report = grade_notebook(path, timeout=args.timeout, time_limit=args.time_limit)
        print(report.format())
        score, total = score + report.score, total + report.total
        code = code or (0 if report.passed else 1)
    if len(args.notebooks) > 1:
        print(f"Total: {score}/{total}")
    return code


if __name__ == "__main__":
    sys.exit(main())
