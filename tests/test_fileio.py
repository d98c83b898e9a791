"""atomic_write, atomic_directory and open_together: whole files or none, mode 0644, no stray
temporaries, one version of a folder read even while it is replaced (the processes: see
test_lora_peft_format_concurrency.py)."""

import os
import stat

import pytest

from loralab import fileio
from loralab.fileio import (
    ConcurrentSaveError,
    atomic_directory,
    atomic_write,
    open_together,
    settle_directory,
)


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


# ----- issue 23: readers beside writers, crashes, locks, links --------------------------------------
@pytest.fixture(params=["exchange", "fallback"])
def swap(request, monkeypatch):
    """Run a test with the atomic exchange, and as on a system without one (two renames)."""
    if request.param == "fallback":
        monkeypatch.setattr(fileio, "_exchange", lambda src, dst: False)
    return request.param


def _save(dest, **files):
    with atomic_directory(dest) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def test_atomic_directory_modes_nested_folders_and_both_swaps(tmp_path, swap):
    dest = tmp_path / "ad"
    old = os.umask(0o077)  # even under a private umask: files 0644, folders 0755
    try:
        _save(dest, a="1")
        _save(dest, a="2", **{"sub/b": "2"})
    finally:
        os.umask(old)
    assert (dest / "a").read_text() == "2" and (dest / "sub" / "b").read_text() == "2"
    assert [_mode(p) for p in (dest, dest / "sub", dest / "a", dest / "sub" / "b")] == [
        0o755,
        0o755,
        0o644,
        0o644,
    ]
    assert os.listdir(tmp_path) == ["ad"]


def test_open_together_reads_one_version_and_names_what_is_missing(tmp_path):
    dest = tmp_path / "ad"
    _save(dest, a="1", b="1")
    with open_together(dest, ["a", "b"], where="reader") as files:
        _save(dest, a="2", b="2")  # replaced while open: the files read stay the old pair
        assert files["a"].read() == files["b"].read() == b"1"
    with open_together(dest, ["a", "b"]) as files:
        assert files["a"].read() == files["b"].read() == b"2"
    with pytest.raises(FileNotFoundError, match=r"reader: .*nope' does not exist"):
        with open_together(tmp_path / "nope", ["a"], where="reader"):
            pass
    with pytest.raises(FileNotFoundError, match=r"reader: .*c' is missing"):
        with open_together(dest, ["a", "c"], where="reader"):
            pass


def test_open_together_retries_then_names_the_race(tmp_path, monkeypatch):
    _save(tmp_path / "ad", a="1")

    def replaced(*args):
        raise fileio._Replaced

    monkeypatch.setattr(fileio, "_open_once", replaced)
    monkeypatch.setattr(fileio, "READ_RETRY", 0.05)
    with pytest.raises(ConcurrentSaveError, match=r"reader: .*ad' was being replaced"):
        with open_together(tmp_path / "ad", ["a"], where="reader"):
            pass


def test_a_folder_left_aside_by_a_killed_save_is_put_back(tmp_path):
    dest = tmp_path / "ad"
    _save(dest, a="old")
    os.replace(dest, tmp_path / ".ad.x1y2.old")  # killed between the two renames
    with open_together(dest, ["a"]) as files:  # a reader puts it back
        assert files["a"].read() == b"old"
    os.replace(dest, tmp_path / ".ad.x1y2.old")
    (tmp_path / ".ad.z3.tmp").mkdir()  # the new folder, half written
    with pytest.raises(RuntimeError):
        with atomic_directory(dest):  # a save that fails deletes nothing it should keep
            raise RuntimeError("disk full")
    assert (dest / "a").read_text() == "old"
    assert os.listdir(tmp_path) == ["ad"]


def test_a_save_in_progress_holds_others_off(tmp_path, monkeypatch):
    dest = tmp_path / "ad"
    _save(dest, a="1")
    monkeypatch.setattr(fileio, "LOCK_TIMEOUT", 0.05)
    with fileio._lock(tmp_path, "another save"):
        os.replace(dest, tmp_path / ".ad.x1y2.old")
        assert settle_directory(dest) is None  # a reader leaves a running save alone
        with pytest.raises(ConcurrentSaveError, match=r"saving to .*ad'.*another process"):
            _save(dest, a="2")
        os.replace(tmp_path / ".ad.x1y2.old", dest)
    assert (dest / "a").read_text() == "1"


def test_atomic_directory_follows_a_link_and_refuses_a_dangling_one(tmp_path, swap):
    _save(tmp_path / "real", a="1")
    (tmp_path / "link").symlink_to("real")
    _save(tmp_path / "link", a="2")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a").read_text() == "2"
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(FileNotFoundError, match="dangling.*symbolic link to 'nowhere'"):
        _save(tmp_path / "dangling", a="3")
