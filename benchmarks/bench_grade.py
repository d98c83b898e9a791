"""Grading a class: seconds per notebook for 10 correct exercise notebooks graded with ``-j 2``.

Each notebook runs in a kernel of its own (a fresh folder, the checks in the grader's process,
student functions called across the process boundary), as ``loralab grade`` does. The notebooks
are the reference solutions swapped into the first 10 exercise notebooks (NumPy only; exercise 19,
torch, is left out). The number includes starting every kernel and running every notebook.

    python benchmarks/bench_grade.py [--jobs N] [--notebooks N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _solutions() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("solutions", ROOT / "instructor" / "solutions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.solution_sources()


def main(argv: list[str] | None = None) -> int:
    from loralab.exercises.grade import fill_notebook
    from loralab.exercises.grade import main as grade

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="notebooks at once (default 2)")
    parser.add_argument("--notebooks", type=int, default=10, help="how many (default 10)")
    args = parser.parse_args(argv)
    templates = sorted((ROOT / "tutorials" / "exercises").glob("*.ipynb"))
    templates = [p for p in templates if "torch" not in p.read_text(encoding="utf-8")]
    sources = _solutions()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.notebooks):
            template = templates[i % len(templates)]
            fill_notebook(template, sources, Path(folder) / f"student{i:02d}_{template.name}")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = grade([folder, "-j", str(args.jobs)])
        seconds = time.perf_counter() - start
    if code != 0:
        print(printed.getvalue())
        raise SystemExit(f"a correct notebook failed (exit code {code})")
    print(
        f"graded {args.notebooks} correct notebooks with -j {args.jobs} in {seconds:.1f} s: "
        f"{seconds / args.notebooks:.2f} s per notebook"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
