"""save_adapter and load_adapter under concurrency and crashes (issue 23, items 1-3).

Every test starts its own child processes (``python -c``, which imports this module) and ends
them in ``finally``; each child runs for about a second. A crash is a SIGKILL injected before or
after the k-th rename/exchange/removal of a save, so the tests do not depend on how many steps a
save takes: whatever k, the folder must load as the old adapter or the new one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loralab import fileio, nn
from loralab.lora import inject_lora, load_adapter, lora_layers, save_adapter
from loralab.lora.peft_format import read_adapter

TESTS = str(Path(__file__).parent)
ROOT = str(Path(__file__).parent.parent)
X = np.random.default_rng(0).standard_normal((3, 8))
ALPHA = {1: 4, 2: 8}  # adapter k: alpha ALPHA[k] and every B entry equal to k


def make(k):
    """Adapter k of two: the same r, a different alpha and a different B, so a config of one
    beside the weights of the other loads without error but is recognisably neither."""
    model = inject_lora(nn.MLP([8, 16, 4], seed=0, dtype=np.float64), ["0", "2"], r=2,
                        alpha=ALPHA[k], seed=0)  # fmt: skip
    for _, layer in lora_layers(model):
        layer.lora_B.data[:] = k
    return model


def which(directory):
    """1 or 2: the whole adapter found in ``directory``; fails on a mix."""
    config, tensors = read_adapter(directory)
    kinds = {float(v.flat[0]) for key, v in tensors.items() if "lora_B" in key}
    assert len(kinds) == 1, f"weights of two saves: {kinds}"
    (k,) = kinds
    assert config.lora_alpha == ALPHA[int(k)], f"config alpha {config.lora_alpha}, weights of {k}"
    return int(k)


def base():
    return nn.MLP([8, 16, 4], seed=0, dtype=np.float64)


def output(k):
    return make(k)(X).data


def loads_as(directory):
    """1 or 2: what load_adapter gives, by the model's output."""
    y = load_adapter(base(), directory)(X).data
    for k in (1, 2):
        if np.array_equal(y, output(k)):
            return k
    raise AssertionError("the loaded model is neither the old adapter nor the new one")


# ----- the child processes ----------------------------------------------------------------------
def _crash_at(position):
    """Kill this process (SIGKILL: no cleanup runs) before (even position) or after (odd) the
    (position // 2 + 1)-th call that renames, exchanges or removes a folder tree."""
    calls = [0]

    def wrap(module, name):
        real = getattr(module, name)

        def step(*args, **kwargs):
            calls[0] += 1
            if position == 2 * (calls[0] - 1):
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if position == 2 * (calls[0] - 1) + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(module, name, step)

    import shutil

    for module, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
        wrap(module, name)
    if hasattr(fileio, "_exchange"):
        wrap(fileio, "_exchange")


def child(argv):
    """``what directory [options]``: "crash K" saves adapter 2 and is killed at position K;
    "alternate SECONDS" saves adapters 1 and 2 in turn; "race GO" waits for the file GO, then
    saves 10 times. "fallback" anywhere: behave as a system without an atomic exchange."""
    what, directory, *rest = argv
    if "fallback" in rest:
        fileio._exchange = lambda src, dst: False
    if what == "crash":
        model = make(2)
        _crash_at(int(rest[0]))
        save_adapter(model, directory)
    elif what == "alternate":
        models, end, i = (make(1), make(2)), time.monotonic() + float(rest[0]), 0
        while time.monotonic() < end:
            save_adapter(models[i % 2], directory)
            i += 1
    elif what == "race":
        model = make(int(rest[1]))
        Path(rest[0] + f".ready{rest[1]}").touch()
        while not os.path.exists(rest[0]):
            time.sleep(0.001)
        for _ in range(10):
            save_adapter(model, directory)


def start(*argv):
    code = (
        f"import sys; sys.path[:0] = [{TESTS!r}, {ROOT!r}]; "
        f"import test_lora_peft_format_concurrency as t; t.child({list(map(str, argv))!r})"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


# ----- 1. a reader beside a writer --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_reader_beside_a_writer_sees_one_whole_save(tmp_path, mode):
    directory = tmp_path / "ad"
    save_adapter(make(1), directory)
    writer = start("alternate", directory, 1.0, mode)
    seen, reads = set(), 0
    try:
        while writer.poll() is None:
            seen.add(which(directory))  # a mix or a raw error fails here
            reads += 1
    finally:
        code, err = finish(writer)
    assert code == 0, err
    assert reads > 5
    assert seen == {1, 2} or reads < 50, seen  # the reader saw both saves, whole
    assert which(directory) in (1, 2)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


# ----- 2. a crash at any point of a save -------------------------------------------------------
# A save exchanges the folders then removes the old one (2 calls), or, without an atomic
# exchange, renames twice then removes (3 calls): a kill before and after each of them.
@pytest.mark.parametrize(
    ("mode", "position"), [("exchange", k) for k in range(4)] + [("fallback", k) for k in range(6)]
)
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_adapter(tmp_path, mode, position):
    directory = tmp_path / "ad"
    save_adapter(make(1), directory)
    code, err = finish(start("crash", directory, position, mode))
    assert code in (0, -signal.SIGKILL), err
    assert loads_as(directory) in (1, 2)
    assert which(directory) in (1, 2)
    save_adapter(make(2), directory)  # the next save works and tidies up
    assert loads_as(directory) == 2
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_a_failing_save_after_a_crash_never_deletes_the_only_copy(tmp_path, monkeypatch):
    directory = tmp_path / "ad"
    save_adapter(make(1), directory)
    # Killed between moving the old folder aside and moving the new one in: the worst moment.
    code, err = finish(start("crash", directory, 1, "fallback"))
    assert code in (0, -signal.SIGKILL), err

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(make(2), directory)
    monkeypatch.undo()
    assert loads_as(directory) in (1, 2)


# ----- 3. two writers at once -------------------------------------------------------------------
def test_two_processes_saving_at_once_both_succeed_and_the_folder_stays_whole(tmp_path):
    directory, go = tmp_path / "ad", tmp_path / "go"
    save_adapter(make(1), directory)
    writers = [start("race", directory, go, k) for k in (1, 2)]
    try:
        deadline = time.monotonic() + 60
        while not all(Path(f"{go}.ready{k}").exists() for k in (1, 2)):
            assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
            time.sleep(0.01)
        go.touch()
        results = [finish(w) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    for code, err in results:
        assert code == 0, err
    assert loads_as(directory) == which(directory)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("go")) == ["ad"]
