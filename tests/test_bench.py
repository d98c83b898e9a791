"""Tests for the benchmark suite (loralab.bench) and `loralab bench`: output format, not speed.

The PyTorch side of the benchmarked model is tested in test_bench_torch.py.
"""

import math
import os
import re

import numpy as np
import pytest

from loralab.bench.memory import traced_peak
from loralab.bench.mlp import HandStep, MLPArrays, engine_model, engine_step
from loralab.bench.sections.core import core_bounds
from loralab.bench.timing import paired_ratio, time_alternating
from loralab.cli import main


def test_paired_ratio_is_the_median_of_ratios():
    assert paired_ratio([1.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_time_alternating_alternates_the_sides():
    calls = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_alternating(sides, repeats=4, sample_seconds=0.0)
    assert calls[4:] == list("abbaabba")  # after two warm-up calls per side
    assert [len(t) for t in times.values()] == [4, 4]


def test_time_alternating_rewarms_each_side_before_its_sample():
    calls = []
    clock_reads = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}

    def clock():  # a sample's clock starts after its untimed call
        clock_reads.append(len(calls))
        return float(len(calls))

    times = time_alternating(sides, repeats=2, sample_seconds=0.0, clock=clock, rewarm=True)
    assert calls[4:] == list("aabbbbaa")  # each sample: one untimed call, then the timed one
    assert clock_reads == [5, 6, 7, 8, 9, 10, 11, 12]
    assert times == {"a": [1.0, 1.0], "b": [1.0, 1.0]}


def test_core_bounds_by_hand():
    # width 4, batch 2, r 1: one (2, 4) x (4, 4) matmul is 2 * 2 * 4 * 4 = 64 FLOPs.
    b = core_bounds(4, 2, r=1)
    full = 4 * 2 * 64 + 3 * 64  # forward and dW in 4 layers, dx in the last 3
    lora_mm = 2 * 2 * 1 * 8  # one LoRA matmul pair: x A^T then u B^T
    lora = 4 * (64 + 3 * lora_mm) + 3 * (64 + lora_mm)
    assert math.isclose(b["time"], lora / full)
    weights, lora_params, act = 4 * 20 * 4, 4 * 2 * 4 * 4, 4 * 2 * 2 * 4 * 4
    assert math.isclose(b["memory"], (weights + 4 * lora_params + act) / (4 * weights + act))


def test_the_engine_and_the_hand_written_step_take_the_same_step():
    rng = np.random.default_rng(0)
    arrays = MLPArrays.random(8, rng, r=2)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    t = rng.standard_normal((5, 8)).astype(np.float32)
    model = engine_model(arrays, lora=True)
    engine_step(model, x, t)()
    hand = HandStep(arrays, x, t)
    hand()
    for i, name in enumerate(["0", "2", "4", "6"]):
        layer = model.get_submodule(name)
        np.testing.assert_allclose(layer.lora_A.data, hand.params[i].data, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.lora_B.data, hand.params[4 + i].data, rtol=1e-5, atol=1e-6)
        assert not np.allclose(layer.lora_A.data, arrays.A[i])  # the step moved them


def test_traced_peak_counts_full_fine_tuning_state():
    rng = np.random.default_rng(0)
    arrays = MLPArrays.random(64, rng)
    x = rng.standard_normal((4, 64)).astype(np.float32)

    def build(lora):
        model = engine_model(arrays, lora=lora)
        return engine_step(model, x, x), list(model.parameters())

    full = traced_peak(lambda: build(False))
    lora = traced_peak(lambda: build(True))
    weights = 4 * (64 * 64 + 64) * 4
    assert full >= 4 * weights  # weights, gradients and two Adam moments
    assert weights <= lora < full / 2


def test_cli_bench_quick_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench" / "results.md"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    assert "CPU" in printed and "NumPy" in printed  # the machine
    assert "`loralab bench --quick`" in text
    for heading in ("### Machine", "### Summary", "### 1.", "### 2.", "### 3.", "### 4."):
        assert heading in text
    rows = re.findall(r"^\| (\d) \| ([^|]+) \| ([0-9.]+) \|", text, flags=re.M)
    names = [name.strip() for _, name, _ in rows]
    assert "engine / hand NumPy, width 32" in names
    assert "LoRA / full step time, NumPy (loralab)" in names
    assert "LoRA / full peak memory, NumPy (loralab)" in names
    assert "merged / base inference, NumPy (loralab)" in names
    assert any(n.startswith("fused / composed backward") for n in names)
    assert all(float(v) > 0 for _, _, v in rows)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed: no figures were drawn." in text
    else:
        for figure in ("overhead.png", "ratios.png"):
            assert (out.parent / figure).stat().st_size > 0
            assert f"({figure})" in text


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--threads", "0"], ["--clock", "sun"]])
def test_cli_bench_bad_input(tmp_path, capsys, argv):
    assert main(["bench", "--quick", "--out", str(tmp_path / "r.md"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loralab bench: error:") and "\n" not in err


@pytest.mark.parametrize("where", ["a folder", "under a file", "unwritable"])
def test_cli_bench_checks_out_before_any_work(tmp_path, capsys, monkeypatch, where):
    from loralab import bench

    ran = []
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: ran.append(args))
    (tmp_path / "a_file").write_text("x")
    if where == "unwritable":
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs a folder nobody can write into, even root: /proc/self")
        out = "/proc/self/results.md"
    else:
        out = str(tmp_path if where == "a folder" else tmp_path / "a_file" / "results.md")
    assert main(["bench", "--quick", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loralab bench: error:") and "--out" in err and "\n" not in err
    assert not ran


def test_a_missed_target_is_never_printed_as_its_limit():
    from loralab.bench.sections._table import shown

    assert shown(1.35046, 1.35) == "1.3505"  # not 1.350, which reads as met
    assert shown(1.3504, None) == "1.350"
    assert shown(1.394, 1.35) == "1.394"
    assert shown(0.80049, 0.8) == "0.8005"
    assert shown(1.35, 1.35) == "1.350"
