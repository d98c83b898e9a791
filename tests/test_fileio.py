"""atomic_write and atomic_directory: whole files or none, mode 0644, no stray temporaries."""

import os
import stat

import pytest

from loralab.fileio import atomic_directory, atomic_write


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_bytes_and_callable(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda tmp: open(tmp, "w").write("via name"))
    assert (tmp_path / "c.txt").read_text() == "via name"
    for name in ("a.txt", "b.bin", "c.txt"):
        assert _mode(tmp_path / name) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.txt"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write(target, "old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_stale_temporaries_from_an_interrupted_write_are_cleaned(tmp_path):
    stale = tmp_path / ".x.txt.abc123.tmp"
    stale.write_text("left by a killed process")
    atomic_write(tmp_path / "x.txt", "new")
    assert not stale.exists()


def test_atomic_write_refuses_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write(tmp_path, "x")


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_directory(dest) as tmp:
        (tmp / "config.json").write_text("1")
        (tmp / "weights").write_text("1")
    assert _mode(dest / "config.json") == 0o644
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "config.json").write_text("2")
            raise RuntimeError("killed between the two files")
    assert (dest / "config.json").read_text() == "1" and (dest / "weights").read_text() == "1"
    with atomic_directory(dest) as tmp:
        (tmp / "config.json").write_text("3")
    assert [p.name for p in dest.iterdir()] == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_directory(tmp_path / "f"):
            pass
