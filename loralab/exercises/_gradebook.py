"""The gradebook of `loralab grade`: a CSV row per notebook and a Markdown file a student reads.

``--csv FILE``: ``file``, one column of points per exercise (0 or 1, empty when the notebook does
not hold it), ``total`` and ``failures`` (``key: first line of the reason; ...``). ``--feedback
DIR``: ``DIR/<notebook name>.md`` with the score and every exercise's full message. Both are
written atomically.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.exercises._catalogue import EXERCISES
from loralab.fileio import atomic_write

if TYPE_CHECKING:  # grade.py imports this module: the types only, for the annotations
    from loralab.exercises.grade import ExerciseResult, GradeReport

__all__ = ["write_gradebook", "feedback_markdown", "write_feedback"]


def _short(result: ExerciseResult) -> str:
    """The first line of a failure's reason, for the gradebook."""
    lines = [line.strip() for line in result.message.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Not yet:")] or ["failed"]
    text = lines[0]
    return text if len(text) <= 160 else text[:157] + "..."


def write_gradebook(reports: list[GradeReport], out: Path) -> None:
    """One CSV row per notebook: ``file``, one column of points per exercise (0 or 1, empty when
    the notebook does not hold it), ``total``, and ``failures`` (``key: reason; ...``)."""
    keys = [k for k in EXERCISES if any(r.key == k for rep in reports for r in rep.results)]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", *keys, "total", "failures"])
            for rep in reports:
                points = {r.key: int(r.passed) for r in rep.results}
                why = [f"{r.key}: {_short(r)}" for r in rep.results if not r.passed]
                if rep.error:
                    why.insert(0, f"not graded: {rep.error}")
                row = [rep.notebook, *(points.get(k, "") for k in keys), rep.score, "; ".join(why)]
                writer.writerow(row)

    atomic_write(out, write)


def feedback_markdown(report: GradeReport) -> str:
    """The Markdown a student reads: the score, and every exercise's full message."""
    lines = [
        f"# Feedback: {Path(report.notebook).name}",
        "",
        f"Score: {report.score}/{report.total}",
    ]
    if report.error:
        lines += ["", f"This notebook could not be graded: {report.error}"]
    for r in report.results:
        ex = EXERCISES[r.key]
        lines += ["", f"## {ex.number}. {ex.title}: {'passed' if r.passed else 'not yet'}", ""]
        lines += ["```text", r.message or "(no message)", "```"]
    if report.cell_errors:
        lines += ["", "## Cells that raised", ""] + [f"- {e}" for e in report.cell_errors]
    return "\n".join(lines) + "\n"


def write_feedback(reports: list[GradeReport], folder: Path) -> None:
    """``folder/<notebook name>.md`` for each report (``-2``, ``-3``... when names repeat)."""
    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for rep in reports:
        stem, n = Path(rep.notebook).stem, 1
        name = f"{stem}.md"
        while name in used:
            n += 1
            name = f"{stem}-{n}.md"
        used.add(name)
        text = feedback_markdown(rep)
        atomic_write(
            folder / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8")
        )
