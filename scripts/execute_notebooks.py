"""Execute the tutorial notebooks once and write the executed copies for the docs site.

Notebooks are stored in git without outputs (``tutorials/**/*.ipynb``). This script runs each one
top to bottom with nbclient (a fresh ``python3`` kernel on the interpreter that runs this script,
working directory = the notebook's folder, a time limit per cell) and writes the executed copy to
``docs/tutorials/<same relative path>``, where mkdocs-jupyter renders it without executing it
again. The executed copy records a digest of the source cells so that the docs build can tell a
stale copy from a current one.

Usage::

    python scripts/execute_notebooks.py                     # every notebook under tutorials/
    python scripts/execute_notebooks.py tutorials/01_*.ipynb --timeout 300

Prints the run time of each notebook and the total; exits with status 1 if any notebook raises.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loralab.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = ROOT / "tutorials"
OUTPUT_DIR = ROOT / "docs" / "tutorials"
DEFAULT_TIMEOUT = 300  # seconds per cell: generous, for a busy CI machine; a hang still fails
METADATA_KEY = "loralab"
# Figures are drawn at FIGURE_DPI with FONT_SIZE-point text (the tick labels' size): the site shows
# a figure wider than its column (about 800 px at a 1200 px window) scaled down, so 12 points keep
# the tick labels of a 13-inch-wide figure at 10 px or more on screen (matplotlib's 10 would not).
FIGURE_DPI = 100
FONT_SIZE = 12
FIGURE_DEFAULTS = [
    "--IPKernelApp.exec_lines=import matplotlib as _mpl; "
    f"_mpl.rcParams.update({{'figure.dpi': {FIGURE_DPI}, 'font.size': {FONT_SIZE}}}); del _mpl"
]


@dataclass
class Result:
    """Outcome of executing one notebook: its source path, seconds taken and error text (or None)."""

    source: Path
    seconds: float
    error: str | None = None


def find_notebooks(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """Every ``*.ipynb`` under ``source_dir`` (recursively, checkpoints skipped), sorted by path."""
    return sorted(
        p
        for p in source_dir.rglob("*.ipynb")
        if ".ipynb_checkpoints" not in p.relative_to(source_dir).parts
    )


def source_digest(nb_path: Path) -> str:
    """sha256 over the cell types and sources of a notebook; outputs and metadata do not count."""
    with open(nb_path, encoding="utf-8") as f:
        nb = json.load(f)
    h = hashlib.sha256()
    for cell in nb.get("cells", []):
        source = cell.get("source", "")
        h.update(cell.get("cell_type", "").encode())
        h.update(b"\0")
        h.update(("".join(source) if isinstance(source, list) else source).encode())
        h.update(b"\0")
    return h.hexdigest()


def output_path(
    nb_path: Path, source_dir: Path = SOURCE_DIR, output_dir: Path = OUTPUT_DIR
) -> Path:
    """Where the executed copy of ``nb_path`` goes: the same path relative to ``output_dir``."""
    return output_dir / nb_path.resolve().relative_to(source_dir.resolve())


def execute_notebook(nb_path: Path, dest: Path, *, timeout: int = DEFAULT_TIMEOUT) -> float:
    """Execute ``nb_path`` and write the executed notebook to ``dest`` atomically.

    Parameters
    ----------
    nb_path : Path
        The notebook to run; its folder is the kernel's working directory.
    dest : Path
        Where to write the executed copy (parent folders are created).
    timeout : int
        Seconds allowed for each cell; a slower cell fails the notebook.

    Returns
    -------
    float
        Wall-clock seconds the execution took.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        If a cell raises (cells tagged ``raises-exception`` may raise).
    nbclient.exceptions.CellTimeoutError
        If a cell runs longer than ``timeout``.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",  # jupyter_client starts it with this interpreter (sys.executable)
        allow_errors=False,
        resources={"metadata": {"path": str(nb_path.parent.resolve())}},
        # figures inline even when MPLBACKEND=Agg is set (as for the tests): otherwise plt.show()
        # draws nothing and the site's tutorials lose their figures
        extra_arguments=["--matplotlib=inline", *FIGURE_DEFAULTS],
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata[METADATA_KEY] = {
        "source": nb_path.resolve().relative_to(ROOT).as_posix()
        if nb_path.resolve().is_relative_to(ROOT)
        else nb_path.name,
        "source_sha256": source_digest(nb_path),
        "execution_seconds": round(seconds, 2),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: nbformat.write(nb, tmp))
    return seconds


def remove_stale_copies(
    sources: list[Path], source_dir: Path = SOURCE_DIR, output_dir: Path = OUTPUT_DIR
) -> list[Path]:
    """Delete executed copies in ``output_dir`` whose source notebook no longer exists."""
    keep = {output_path(p, source_dir, output_dir).resolve() for p in sources}
    removed = []
    if output_dir.is_dir():
        for p in output_dir.rglob("*.ipynb"):
            if p.resolve() not in keep:
                p.unlink()
                removed.append(p)
    return removed


def execute_all(
    notebooks: list[Path] | None = None,
    *,
    source_dir: Path = SOURCE_DIR,
    output_dir: Path = OUTPUT_DIR,
    timeout: int = DEFAULT_TIMEOUT,
    log=print,
) -> list[Result]:
    """Execute ``notebooks`` (default: all under ``source_dir``) one after the other.

    Logs one line per notebook (seconds and path) and the total; returns one ``Result`` each.
    When every notebook is run, executed copies of deleted notebooks are removed.
    """
    run_all = notebooks is None
    if notebooks is None:
        notebooks = find_notebooks(source_dir)
    results = []
    for nb_path in notebooks:
        dest = output_path(nb_path, source_dir, output_dir)
        shown = nb_path.relative_to(ROOT) if nb_path.resolve().is_relative_to(ROOT) else nb_path
        start = time.perf_counter()
        try:
            seconds = execute_notebook(nb_path, dest, timeout=timeout)
            results.append(Result(nb_path, seconds))
            log(f"{seconds:7.1f} s  {shown}")
        except Exception as exc:  # report every failing notebook, not only the first
            seconds = time.perf_counter() - start
            results.append(Result(nb_path, seconds, f"{type(exc).__name__}: {exc}"))
            dest.unlink(missing_ok=True)  # never leave an old copy that looks current
            log(f"{seconds:7.1f} s  {shown}  FAILED\n{type(exc).__name__}: {exc}")
    if run_all:
        for p in remove_stale_copies(notebooks, source_dir, output_dir):
            log(f"removed stale executed copy {p}")
    total = sum(r.seconds for r in results)
    failed = sum(r.error is not None for r in results)
    log(f"{total:7.1f} s  total for {len(results)} notebook(s), {failed} failed")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: all under tutorials/")
    parser.add_argument(
        "--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds allowed per cell"
    )
    parser.add_argument("--source", type=Path, default=SOURCE_DIR, help="notebooks folder")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR, help="executed copies folder")
    args = parser.parse_args(argv)
    source, output = args.source.resolve(), args.output.resolve()
    notebooks = [p.resolve() for p in args.notebooks] or None
    for p in notebooks or []:
        if not p.is_relative_to(source):
            parser.error(f"notebook {p} is not under {source}")
    results = execute_all(notebooks, source_dir=source, output_dir=output, timeout=args.timeout)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
