"""Strip outputs and execution counts from notebooks (they are stored clean in git).

    python scripts/strip_outputs.py tutorials/*.ipynb          # strip in place
    python scripts/strip_outputs.py --check tutorials/*.ipynb  # exit 1 naming dirty notebooks

Used by the pre-commit hook; `tests/test_docs.py` checks the same rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loralab.fileio import atomic_write


def dirty_cells(nb: dict) -> list[int]:
    """Indices of code cells that carry outputs or an execution count."""
    return [
        i
        for i, cell in enumerate(nb.get("cells", []))
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="report, change nothing")
    args = parser.parse_args(argv)
    status = 0
    for path in args.notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        dirty = dirty_cells(nb)
        if not dirty:
            continue
        if args.check:
            print(f"{path}: cells {dirty} carry outputs", file=sys.stderr)
            status = 1
            continue
        for i in dirty:
            nb["cells"][i]["outputs"], nb["cells"][i]["execution_count"] = [], None
        atomic_write(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"stripped {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
