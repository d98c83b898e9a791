"""Files that appear whole or not at all: the one atomic-write helper of loralab.

Every file loralab writes (adapters, checkpoints, graded notebooks, benchmark reports, figures)
goes through `atomic_write`: the content is written to a temporary file in the destination's
folder, given the usual mode 0644, and renamed onto the destination in one step (`os.replace`
is atomic on POSIX and Windows). A crash or an exception in between leaves the old file (or no
file) and no temporary file behind.

`atomic_directory` does the same for a folder of files that belong together (an adapter's
config and weights), and `open_together` reads such a folder as one version of it. What a
saved folder guarantees, on Linux (other systems: see `atomic_directory`):

- a reader sees one whole save, never the config of one save beside the weights of another:
  the files are opened through one handle on the folder, and a folder, once in place, is never
  changed, only replaced whole (`open_together` retries while a save swaps it, then raises
  `ConcurrentSaveError`);
- a process killed at any moment of a save leaves the old folder or the new one, and never
  deletes the only copy: the new folder is written and flushed to disk beside the old one, then
  the two are exchanged in one step (``renameat2(RENAME_EXCHANGE)``);
- saves to one place run one at a time (a lock on the parent folder), so two processes saving
  at once both succeed, the later one winning;
- a save that cannot remove the old contents raises an error saying so.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from io import BufferedReader
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_directory",
    "open_together",
    "settle_directory",
    "ConcurrentSaveError",
    "FILE_MODE",
]

FILE_MODE = 0o644  # rw-r--r--: mkstemp's private 0600 would hide shared files from others
DIR_MODE = 0o755
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"  # the previous folder, moved aside where no atomic exchange exists
LOCK_TIMEOUT = 60.0  # seconds a save waits for another save to the same place
READ_RETRY = 2.0  # seconds a reader retries while a save replaces the folder


class ConcurrentSaveError(OSError):
    """Another process kept replacing (or locking) a folder for longer than we waited."""


def _stale_temporaries(folder: Path, name: str, suffix: str = _TMP_SUFFIX) -> list[Path]:
    """Temporary files or folders left for ``name`` by an earlier, interrupted write."""
    return sorted(folder.glob(f".{glob.escape(name)}.*{suffix}"))


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


# ----- folders ------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100


def _exchange(src: Path, dst: Path) -> bool:
    """Swap the folders ``src`` and ``dst`` in one step (Linux ``renameat2``); False where the
    system or the file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _fsync(path: Path) -> None:
    """Flush a file or a folder to disk (folders: not possible on Windows, where it is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


@contextmanager
def _lock(folder: Path, where: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock``; released by the system when the
    process ends, even killed). Yields False if ``wait`` is False and another process holds
    it. Without ``fcntl`` (Windows) there is no lock and it yields True."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        held = False
        while not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if not wait:
                    break
                if time.monotonic() > deadline:
                    raise ConcurrentSaveError(
                        f"{where}: another process has been saving beside {str(folder)!r} for "
                        f"{LOCK_TIMEOUT:g} s; try again when it has finished"
                    ) from None
                time.sleep(0.005)
        yield held
    finally:
        os.close(fd)  # releases the lock


def _restore(path: Path) -> bool:
    """Put back the previous folder of ``path`` if a save was killed after moving it aside
    (only where there is no atomic exchange). Call with the lock held. True if restored."""
    if os.path.lexists(path):
        return False
    backups = _stale_temporaries(path.parent, path.name, _OLD_SUFFIX)
    if not backups:
        return False
    newest = max(backups, key=lambda p: p.stat().st_mtime_ns)
    os.replace(newest, path)
    return True


def settle_directory(path: str | os.PathLike[str]) -> bool | None:
    """Make ``path`` whole again after a save was killed half-way, if no save is running now.

    Returns None while another process is saving there (try again soon), True if ``path`` is
    there now (put back, or saved since we last looked), False if there is nothing to read.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _lock(path.parent, "load", wait=False) as held:
        if not held:
            return None
        if path.exists():
            return True
        return _restore(path)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder's files in a temporary sibling, then swap it into place in one step.

    Use as ``with atomic_directory(dest) as tmp: write files into tmp``. On success ``dest``
    holds exactly what was written (an existing ``dest`` folder is replaced, its other files
    dropped; every file gets mode 0644, every folder 0755); on an exception ``dest`` is
    untouched and the temporary folder is removed.

    The steps: take a lock on the parent folder (another save to the same parent waits, up to
    `LOCK_TIMEOUT` seconds, then `ConcurrentSaveError`); put back a previous folder that a
    killed save left aside, and remove its temporaries; write into ``.<name>.<random>.tmp``;
    flush every file and folder to disk; exchange it with ``dest`` in one step; remove the
    old folder (now under the temporary name). A crash at any point leaves ``dest`` as the old
    folder or the new one. If the old folder cannot be removed, an OSError says that the new
    folder is in place and where the old one was left.

    Where there is no atomic exchange (Windows, macOS, file systems without it) the swap is
    two renames (``dest`` -> ``.<name>.<random>.old``, temporary -> ``dest``): a reader may
    find ``dest`` missing for that moment (`open_together` waits and retries), and a crash
    between them leaves the old folder aside, put back by the next save or load. Windows has
    no ``fcntl`` lock: saves to one place at once are not serialised there.

    Symbolic links are followed: if ``dest`` is a link to a folder, the folder it points to is
    replaced and the link kept; a link to nothing is refused (FileNotFoundError naming it).

    Parameters
    ----------
    path : path-like
        The destination folder; its parent is created if missing. An existing *file* there is
        refused (FileExistsError naming the path).
    """
    given = Path(path)
    if given.is_symlink():
        if not given.exists():
            raise FileNotFoundError(
                f"atomic_directory: {str(given)!r} is a symbolic link to {os.readlink(given)!r}, "
                "which does not exist"
            )
        given = Path(os.path.realpath(given))
    path = given
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"atomic_directory: {str(path)!r} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path.parent, f"saving to {str(path)!r}"):
        _restore(path)
        if path.exists():  # never before: a folder set aside may be the only copy
            for stale in _stale_temporaries(path.parent, path.name, _OLD_SUFFIX):
                _remove(stale)
        for stale in _stale_temporaries(path.parent, path.name):
            _remove(stale)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX))
        old = None
        try:
            yield tmp
            _finish(tmp)
            if not path.exists():
                os.replace(tmp, path)
            elif _exchange(tmp, path):
                old = tmp  # the old folder, now under the temporary name
            else:
                old = Path(
                    tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=_OLD_SUFFIX)
                )
                os.rmdir(old)
                os.replace(path, old)
                os.replace(tmp, path)
        except BaseException:
            if old is not None and old != tmp and old.exists() and not path.exists():
                os.replace(old, path)
            if old != tmp:
                _remove(tmp)
            raise
        _fsync(path.parent)
        if old is None:
            return
        try:
            shutil.rmtree(old)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"atomic_directory: the new folder is in place at {str(path)!r}, but its previous "
                f"contents, moved to {str(old)!r}, could not be removed ({exc}); remove that "
                "folder by hand",
            ) from exc


def _finish(tmp: Path) -> None:
    """Modes 0644/0755 on everything in ``tmp``, every file and folder flushed to disk."""
    for folder, dirs, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE)
            _fsync(Path(folder, name))
        for name in dirs:
            os.chmod(os.path.join(folder, name), DIR_MODE)
    for folder, _, _ in os.walk(tmp, topdown=False):
        _fsync(Path(folder))
    os.chmod(tmp, DIR_MODE)


class _Replaced(Exception):
    """The folder was replaced while we opened its files: open them again."""


def _same(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _open_once(
    path: Path, names: list[str], where: str, stack: ExitStack
) -> dict[str, BufferedReader]:
    """Open ``names`` in the folder ``path`` as one version of it (`open_together`)."""
    if os.open in os.supports_dir_fd:
        try:
            dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except NotADirectoryError:
            raise FileNotFoundError(f"{where}: {str(path)!r} is not a directory") from None
        stack.callback(os.close, dfd)
        st = os.fstat(dfd)

        def opener(name: str) -> int:
            return os.open(name, os.O_RDONLY, dir_fd=dfd)
    else:  # Windows: open by path, then check that the folder is still the same one
        st = os.stat(path)

        def opener(name: str) -> int:
            return os.open(path / name, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    files: dict[str, BufferedReader] = {}
    for name in names:
        try:
            fd = opener(name)
        except FileNotFoundError:
            if not _same(path, st):
                raise _Replaced from None
            raise FileNotFoundError(f"{where}: {str(path / name)!r} is missing") from None
        files[name] = stack.enter_context(os.fdopen(fd, "rb"))
    if not (os.open in os.supports_dir_fd or _same(path, st)):
        raise _Replaced
    return files


@contextmanager
def open_together(
    path: str | os.PathLike[str], names: list[str], *, where: str = "open_together"
) -> Iterator[dict[str, BufferedReader]]:
    """Open the files ``names`` of the folder ``path`` as one version of the folder.

    Yields ``{name: binary file}``. The files come from one folder even while
    `atomic_directory` replaces ``path`` at the same moment (they are opened through one handle
    on the folder; the files of a folder in place never change). While a save is swapping the
    folder, this retries for up to `READ_RETRY` seconds, then raises `ConcurrentSaveError`
    naming the path. A folder that a killed save left aside is put back first.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a folder, or one of ``names`` is missing from it (the message names it).
    ConcurrentSaveError
        ``path`` kept being replaced for `READ_RETRY` seconds.
    """
    path = Path(path)
    deadline = time.monotonic() + READ_RETRY
    while True:
        with ExitStack() as stack:
            try:
                files = _open_once(path, names, where, stack)
            except _Replaced:
                files = None
            except FileNotFoundError as exc:
                if exc.filename is None:  # ours, naming what is missing
                    raise
                settled = settle_directory(path)
                if settled is False:
                    raise FileNotFoundError(f"{where}: {str(path)!r} does not exist") from None
                files = None
            if files is not None:
                yield files
                return
        if time.monotonic() > deadline:
            raise ConcurrentSaveError(
                f"{where}: {str(path)!r} was being replaced by another process's save for "
                f"{READ_RETRY:g} s; try again when the save has finished"
            )
        time.sleep(0.005)
