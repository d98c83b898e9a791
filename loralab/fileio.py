"""Files that appear whole or not at all: the one atomic-write helper of loralab.

Every file loralab writes (adapters, checkpoints, graded notebooks, benchmark reports, figures)
goes through `atomic_write`: the content is written to a temporary file in the destination's
folder, given the usual mode 0644, and renamed onto the destination in one step (`os.replace`
is atomic on POSIX and Windows). A crash or an exception in between leaves the old file (or no
file) and no temporary file behind.

`atomic_directory` does the same for a folder of files that belong together (an adapter's
config and weights): they are written into a fresh sibling folder which then replaces the
destination, so a reader never sees new weights beside an old config.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_directory", "FILE_MODE"]

FILE_MODE = 0o644  # rw-r--r--: mkstemp's private 0600 would hide shared files from others
_TMP_SUFFIX = ".tmp"


def _stale_temporaries(folder: Path, name: str) -> Iterator[Path]:
    """Temporary files or folders left for ``name`` by an earlier, interrupted write."""
    yield from folder.glob(f".{name}.*{_TMP_SUFFIX}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike[str],
    content: str | bytes | Callable[[str], None],
    *,
    mode: int = FILE_MODE,
    encoding: str = "utf-8",
) -> Path:
    """Write ``content`` to ``path`` atomically: the file appears whole or not at all.

    Parameters
    ----------
    path : path-like
        The destination; its folder must exist. An existing file is replaced.
    content : str, bytes or callable
        Text (encoded with ``encoding``), bytes, or a function ``write(tmp_name)`` that writes
        the file itself (for libraries such as safetensors or nbformat that take a file name).
    mode : int, default 0o644
        Permission bits of the written file.

    Returns
    -------
    Path of the written file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "note.txt", "hello").read_text()
    'hello'
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"atomic_write: {str(path)!r} is a directory, not a file")
    for stale in _stale_temporaries(path.parent, path.name):
        _remove(stale)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            data = content.encode(encoding) if isinstance(content, str) else bytes(content)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder's files in a temporary sibling, then swap it into place in one step.

    Use as ``with atomic_directory(dest) as tmp: write files into tmp``. On success ``dest``
    holds exactly what was written (an existing ``dest`` folder is replaced, its other files
    dropped); on an exception ``dest`` is untouched and the temporary folder is removed.

    Parameters
    ----------
    path : path-like
        The destination folder; its parent is created if missing. An existing *file* there is
        refused (FileExistsError naming the path).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"atomic_directory: {str(path)!r} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(path.parent, path.name):
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for child in tmp.iterdir():
            if child.is_file():
                os.chmod(child, FILE_MODE)
        if path.exists():
            # Two renames: dest -> old, tmp -> dest. Between them dest is missing, never mixed.
            old = Path(
                tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
            )
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)
        _remove(tmp)
        raise
    finally:
        if old is not None:
            _remove(old)
