"""Grade students' exercise notebooks, with the student's code kept away from the verdicts.

Each notebook is copied into a fresh temporary folder and run top to bottom in a Jupyter kernel of
its own (cells that raise are recorded, not fatal). Then the grader calls the student's functions
in that kernel across the process boundary, with plain arrays going in and coming back, and runs
every exercise's check here, in the grader's process: nothing the notebook does (patching loralab,
NumPy, builtins or the grader, tracing, odd array subclasses) reaches a check, its reference
answer or a verdict. One point per exercise.

Exercise cells are code cells tagged ``exercise`` whose metadata names the exercise and the functions
the student writes there::

    {"tags": ["exercise"], "loralab": {"exercise": "merge", "functions": ["merge", "unmerge"]}}

Limits hold from outside: a call that runs past ``time_limit``, exits, crashes or runs out of
memory ends that kernel, fails that exercise alone with a message saying which, and a new kernel
(the notebook run again) serves the next exercise; a cell that runs past ``timeout`` or kills the
kernel is skipped when it is run again, so it costs its time once. When grading ends, every
process the notebook started is killed. During grading, loralab's own functions raise a named
error in the kernel, so an exercise answered by calling loralab fails and says so. The installed
loralab package is hashed before and after each notebook (`PackageChanged` if it changed).
Exercise 19 (``LoRAFunction``, a torch class) cannot cross the boundary as plain arrays: its check
runs inside the student's kernel (time-limited from outside), and its message says so.

Usage: ``loralab grade PATH... [-j N] [--csv FILE] [--feedback DIR] [--seed N] [--timeout S]
[--time-limit S] [--memory-limit MB]`` (this module's `main`). PATH is a notebook or a folder of
notebooks. Exit code 0 when every exercise passes, 1 when any fails (a notebook in a folder that
cannot be read counts as failed, and the others are still graded), 2 when a notebook named on the
command line cannot be read (missing, not a notebook, no exercises), a folder holds no notebook or
an option is wrong: one line on stderr, and nothing is graded; 3 when a notebook changed the
installed loralab package (grading stops, naming it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loralab._validate import positive_number
from loralab.exercises._catalogue import EXERCISES
from loralab.exercises._gradebook import write_feedback, write_gradebook
from loralab.fileio import atomic_write

#: Default address-space limit of a student's kernel, in MiB (POSIX; 0: no limit).
MEMORY_LIMIT_MB = 8192
#: Exercises whose check must run inside the student's kernel (see the module docstring).
NOT_ISOLATED = {
    "lora_function": "LoRAFunction is a torch class, which cannot cross as plain arrays"
}


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
    error: str | None = None  #: why the notebook could not be graded at all (None: it was)

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
        if self.error:
            lines.append(f"  not graded: {self.error}")
        for r in self.results:
            number = list(EXERCISES).index(r.key) + 1
            lines.append(f"  [{'PASS' if r.passed else 'FAIL'}] {number}. {EXERCISES[r.key].title}")
            if not r.passed:
                lines += ["         " + line for line in r.message.splitlines()]
        for err in self.cell_errors:
            lines.append(f"  note: {err}")
        lines.append(f"Score: {self.score}/{self.total}")
        return "\n".join(lines)


class PackageChanged(RuntimeError):
    """A notebook changed the installed loralab package while it was graded; grading stops."""


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


def _package_dir() -> Path:
    """The installed loralab package's folder (the one the grader imports)."""
    import loralab

    return Path(loralab.__file__).resolve().parent


def _package_files(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root``."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _package_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files changed, removed or added; new compiled files in ``__pycache__`` are Python's own."""
    changed = [p for p in before if after.get(p) != before[p]]
    added = [p for p in after if p not in before and "__pycache__/" not in p]
    return sorted(changed + added)


_seed_lock = threading.Lock()
_seed_users = 0
_seed_original = None


@contextmanager
def seeded_cases(seed: int | None):
    """Draw the checks' random cases from ``seed`` while the block runs (None: their defaults).

    The checks make their inputs with ``np.random.default_rng(n)`` for fixed numbers n; inside
    the block (in the grader's process) that is ``default_rng([seed, n])``: other inputs for
    every seed, the same ones for the same seed, so a regrade gives the same verdicts.
    """
    global _seed_users, _seed_original
    import numpy as np

    if seed is None:
        yield
        return
    with _seed_lock:
        if _seed_users == 0:
            _seed_original = original = np.random.default_rng
            bound = int(seed)

            def default_rng(n=None):
                if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
                    return original([bound, int(n)])
                return original(n)

            np.random.default_rng = default_rng
        _seed_users += 1
    try:
        yield
    finally:
        with _seed_lock:
            _seed_users -= 1
            if _seed_users == 0:
                np.random.default_rng = _seed_original


class _ThreadOutput(io.TextIOBase):
    """``sys.stdout`` while grading: a thread that set ``buffer`` writes there, others through."""

    def __init__(self, through):
        self.through = through
        self.local = threading.local()

    def write(self, text: str) -> int:
        buffer = getattr(self.local, "buffer", None)
        return (buffer if buffer is not None else self.through).write(text)

    def flush(self) -> None:
        if getattr(self.local, "buffer", None) is None:
            self.through.flush()


_output_lock = threading.Lock()
_output_users = 0


@contextmanager
def _thread_output():
    global _output_users
    with _output_lock:
        if _output_users == 0:
            sys.stdout = _ThreadOutput(sys.stdout)
        _output_users += 1
        router = sys.stdout
    try:
        yield router
    finally:
        with _output_lock:
            _output_users -= 1
            if _output_users == 0 and isinstance(sys.stdout, _ThreadOutput):
                sys.stdout = sys.stdout.through


def _run_check(check, functions, time_limit, router) -> tuple[bool, str, BaseException | None]:
    """Call ``check(*functions)`` in a thread of its own (no signal is ever needed there); return
    (passed, what it printed, the `WorkerGone` or `_TimeUp` that ended it or None)."""
    found: dict = {}

    def body():
        router.local.buffer = out = io.StringIO()
        try:
            found["passed"] = bool(check(*functions, time_limit=time_limit))
        except BaseException as exc:  # noqa: BLE001 - a verdict, never a crash of the grader
            found["passed"] = False
            found["ended"] = exc
        finally:
            found["out"] = out.getvalue().strip()
            router.local.buffer = None

    worker = threading.Thread(target=body, name="loralab-grade-check", daemon=True)
    worker.start()
    worker.join()
    return found["passed"], found["out"], found.get("ended")


def _grade_exercise(kernel, key: str, names: list[str], time_limit, router) -> ExerciseResult:
    from loralab import exercises
    from loralab.exercises._feedback import TIME_LIMIT, _TimeUp
    from loralab.exercises._grader_worker import WorkerGone

    ex = EXERCISES[key]
    if kernel.dead is not None:
        try:
            kernel.kill()
            kernel.start(names)
        except WorkerGone as exc:
            return ExerciseResult(key, False, f"not graded: the notebook's kernel {exc.why}.")
    missing = [n for n in ex.functions if not kernel.functions.get(n, {}).get("callable")]
    if missing:
        msg = f"{', '.join(missing)} is not defined: the cell that defines it is missing or failed."
        return ExerciseResult(key, False, msg)
    limit = TIME_LIMIT if time_limit is None else time_limit
    if key in NOT_ISOLATED:
        try:
            reply = kernel.check_here(ex.check, list(ex.functions), limit)
            passed, message = bool(reply.get("passed")), str(reply.get("message", ""))
        except (WorkerGone, _TimeUp) as exc:
            why = getattr(exc, "why", f"ran longer than {30 * limit:g} s")
            passed, message = False, f"Not yet: {ex.title}\n  The check stopped: the kernel {why}."
        note = f"(Checked inside your notebook's kernel: {NOT_ISOLATED[key]}.)"
        return ExerciseResult(key, passed, f"{message}\n  {note}")
    proxies = [kernel.proxy(n) for n in ex.functions]
    passed, message, ended = _run_check(getattr(exercises, ex.check), proxies, time_limit, router)
    if isinstance(ended, WorkerGone):
        name = kernel.last_call or ex.functions[0]
        message = (
            f"Not yet: {ex.title}\n  While your `{name}` ran, the process running your code "
            f"{ended.why}, so the check could not finish. A function hands back its result "
            "with `return`; look for a call that ends the program (`os._exit`) or uses far "
            "more memory than the inputs need."
        )
    elif isinstance(ended, _TimeUp):  # outside a call of the student's function
        message = f"Not yet: {ex.title}\n  The check ran out of time ({limit:g} s per call)."
    elif ended is not None:
        message += f"\nThe check itself failed: {type(ended).__name__}: {ended}"
    return ExerciseResult(key, passed, message)


def grade_notebook(
    path,
    *,
    timeout: int = 120,
    time_limit: float | None = None,
    seed: int | None = None,
    memory_limit: int = MEMORY_LIMIT_MB,
) -> GradeReport:
    """Execute the notebook at ``path`` in a kernel of its own and check every exercise it holds.

    Parameters
    ----------
    path : str or Path
        A student's copy of one of the notebooks in ``tutorials/exercises/``.
    timeout : int
        Seconds allowed per cell; a cell that runs longer is stopped (its kernel killed) and
        skipped, and the rest still runs.
    time_limit : float or None
        Seconds allowed per call of a student's function (None: the checks' default,
        `loralab.exercises.TIME_LIMIT`), enforced by killing the kernel.
    seed : int or None
        Draws the checks' random cases from this seed (None: the checks' fixed cases).
    memory_limit : int
        The kernel's address-space limit in MiB (POSIX; 0: none).

    Returns
    -------
    GradeReport
        One `ExerciseResult` per exercise, and a note for each cell that raised.

    Raises
    ------
    NotebookError
        ``path`` is missing, is not a notebook, or holds no exercises.
    PackageChanged
        The installed loralab package's files changed while the notebook ran.
    """
    from loralab.exercises._grader_worker import StudentKernel, WorkerGone

    cell_seconds = math.ceil(positive_number("timeout", timeout, "grade_notebook"))
    if time_limit is not None:
        time_limit = float(positive_number("time_limit", time_limit, "grade_notebook"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise TypeError(
            f"grade_notebook: seed must be a whole number >= 0 or None, got seed={seed!r}"
        )
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 0:
        raise TypeError(
            f"grade_notebook: memory_limit must be a whole number of MiB >= 0, got {memory_limit!r}"
        )
    path = Path(path)
    nb = read_notebook(path)
    keys = _exercise_keys(nb, path)
    names = [n for key in keys for n in EXERCISES[key].functions]
    report = GradeReport(notebook=str(path))
    package = _package_dir()
    before = _package_files(package)
    with tempfile.TemporaryDirectory(prefix="loralab-grade-") as folder:
        (Path(folder) / path.name).write_bytes(path.read_bytes())
        kernel = StudentKernel(nb, Path(folder), cell_seconds=cell_seconds, memory_mb=memory_limit)
        try:
            try:
                kernel.start(names)
                started = None
            except WorkerGone as exc:
                started = f"not graded: the notebook's kernel {exc.why}."
            with _thread_output() as router, seeded_cases(seed):
                for key in keys:
                    if started is not None:
                        report.results.append(ExerciseResult(key, False, started))
                        continue
                    report.results.append(_grade_exercise(kernel, key, names, time_limit, router))
        finally:
            kernel.close()
    changes = _package_changes(before, _package_files(package))
    if changes:
        raise PackageChanged(
            f"{path}: the installed loralab package changed while this notebook was graded "
            f"({', '.join(changes[:5])} in {package}). Grading stopped: reinstall loralab, then "
            "grade again without this notebook."
        )
    report.executed = kernel.executed
    stopped = f"the cell ran longer than --timeout {cell_seconds} s and was stopped"
    for index, cell in enumerate(kernel.executed.cells if kernel.executed else []):
        if index in kernel.skipped:
            report.cell_errors.append(_skipped_cell(index, cell, kernel.skipped[index], stopped))
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                report.cell_errors.append(_cell_error(index, cell, output, stopped))
    return report


def _skipped_cell(index: int, cell, why: str, stopped: str) -> str:
    label = _cell_label(index, cell)
    if why == "timeout":
        return f"{label}: {stopped}"
    return (
        f"{label}: the kernel died while running it, so it was skipped when the notebook ran again"
    )


def _cell_label(index: int, cell) -> str:
    lines = cell.source.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    first = first if len(first) <= 60 else first[:57] + "..."
    return f"cell {index + 1}" + (f" (`{first}`)" if first else "")


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


def _whole(name: str, low: int):
    """An argparse type: a whole number >= ``low``, one-line errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return value

    return parse


def _expand(paths: list[Path]) -> list[tuple[Path, bool]]:
    """(notebook, named on the command line) for each PATH: a notebook, or a folder's notebooks."""
    found = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
            if not inside:
                raise NotebookError(f"{path} holds no notebook (.ipynb)")
            found += [(p, False) for p in inside]
        else:
            found.append((path, True))
    return found


def main(argv: list[str] | None = None) -> int:
    """``loralab grade PATH... [-j N] [--csv FILE] [--feedback DIR] [--seed N] ...``.

    Every notebook named is read first; returns 2 (one line on stderr, nothing graded) when one
    is missing, is not a notebook or holds no exercises, when a folder holds no notebook, or when
    an option is wrong. Otherwise returns 0 when every exercise of every notebook passes, 1 when
    any fails (a notebook found in a folder that cannot be read fails, the others are graded),
    3 when a notebook changed the installed loralab package.
    """
    parser = _Parser(
        prog="loralab grade", description="Run exercise notebooks and score each exercise."
    )
    parser.add_argument(
        "notebooks", nargs="+", type=Path, help="student notebook(s) (.ipynb) or folders of them"
    )
    parser.add_argument(
        "--timeout", type=_seconds(int), default=120, help="seconds per cell (default 120)"
    )
    parser.add_argument(
        "--time-limit",
        type=_seconds(float),
        default=None,
        help="seconds per call of a student's function (default: the checks' 5)",
    )
    parser.add_argument(
        "-j", "--jobs", type=_whole("--jobs", 1), default=1, help="notebooks at once"
    )
    parser.add_argument("--csv", type=Path, help="write the gradebook (one row per notebook)")
    parser.add_argument("--feedback", type=Path, help="write one Markdown file per notebook here")
    parser.add_argument(
        "--seed", type=_whole("--seed", 0), default=None, help="draw the checks' cases from N"
    )
    parser.add_argument(
        "--memory-limit",
        type=_whole("--memory-limit", 0),
        default=MEMORY_LIMIT_MB,
        help=f"MiB of address space per kernel, POSIX (default {MEMORY_LIMIT_MB}; 0: none)",
    )
    try:
        args = parser.parse_args(argv)
        notebooks = _expand(args.notebooks)
        unreadable = {}
        for path, named in notebooks:
            try:
                read_notebook(path)
            except NotebookError as exc:
                if named:
                    raise
                unreadable[path] = str(exc)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except NotebookError as exc:
        print(f"loralab grade: {exc}", file=sys.stderr)
        return 2

    def one(path: Path) -> GradeReport:
        if path in unreadable:
            return GradeReport(notebook=str(path), error=unreadable[path])
        try:
            return grade_notebook(
                path,
                timeout=args.timeout,
                time_limit=args.time_limit,
                seed=args.seed,
                memory_limit=args.memory_limit,
            )
        except PackageChanged:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken notebook never stops the others
            return GradeReport(notebook=str(path), error=f"{type(exc).__name__}: {exc}")

    reports: list[GradeReport] = []
    try:
        with _thread_output(), ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(one, path) for path, _ in notebooks]
            for future in futures:
                report = future.result()
                reports.append(report)
                print(report.format(), flush=True)
    except PackageChanged as exc:
        for future in futures:
            future.cancel()
        print(f"loralab grade: {exc}", file=sys.stderr)
        return 3
    if args.csv is not None:
        write_gradebook(reports, args.csv)
    if args.feedback is not None:
        write_feedback(reports, args.feedback)
    if len(reports) > 1:
        print(f"Total: {sum(r.score for r in reports)}/{sum(r.total for r in reports)}")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
