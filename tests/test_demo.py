"""Tests for `loralab demo` (loralab.demo), in --quick mode."""

import re
from pathlib import Path

import numpy as np
import pytest

from loralab import demo
from loralab.cli import main
from loralab.datasets import load_digits, shift_digits
from loralab.models.digits import digits_checkpoint_path, digits_split, load_digits_mlp
from loralab.training import evaluate


def test_checkpoint_ships_and_loads():
    model, from_checkpoint = load_digits_mlp()
    assert from_checkpoint
    train, test = digits_split(load_digits())
    assert evaluate(model, test)[1] > 0.95
    assert evaluate(model, shift_digits(test, "rotate90"))[1] < 0.3  # the shift hurts


def test_cli_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    for column in ("trainable params", "% of total", "peak train memory", "step time"):
        assert column in header
    for method in ("full fine-tuning", "head only", "LoRA r=1", "LoRA r=4", "LoRA r=8"):
        assert any(line.startswith(method) for line in printed.splitlines())
    for r in (1, 4, 8):
        assert (out / f"adapter_r{r}" / "adapter_model.safetensors").is_file()
    assert (out / "full_finetuned.safetensors").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no figure" in printed
    else:
        assert (out / "demo.png").stat().st_size > 0
        assert str(out / "demo.png") in printed
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "equivalence check is skipped" in printed
    else:
        found = re.search(
            r"largest relative difference (\S+) in float64, (\S+) in float32", printed
        )
        # float64 is the check (round-off only); in float32 Adam enlarges round-off where a
        # gradient is near zero (see demo._equivalence), a bug would still be O(1)
        assert float(found.group(1)) < 1e-10 and float(found.group(2)) < 5e-2
        line = " ".join(printed.split())
        assert "The README's 1e-05 for float32 is the tests' bound on small random models;" in line
        if float(found.group(2)) <= 1e-5:
            assert "this run stays within it." in line
        else:  # the first step, before Adam amplifies anything, is float32 round-off
            first = re.search(
                r"the first step's loss, outputs and gradients agree within (\S+) "
                r"\((inside|outside) it\), then Adam's update m / sqrt\(v\) enlarges",
                line,
            )
            assert float(first.group(1)) < 1e-4
            assert first.group(2) == ("inside" if float(first.group(1)) <= 1e-5 else "outside")
        assert demo.FLOAT32_BOUND == 1e-5 and "and 1e-5 in float32" in " ".join(
            (Path(demo.__file__).parents[1] / "README.md").read_text().split()
        )


@pytest.mark.parametrize(
    ("float32", "first", "says"),
    [
        (1.08e-2, 2.1e-7, "agree within 2.10e-07 (inside it), then Adam's update m / sqrt(v)"),
        (3.0e-4, 2.0e-5, "agree within 2.00e-05 (outside it), then Adam's update m / sqrt(v)"),
        (4.0e-6, 4.0e-6, "this run stays within it."),
    ],
)
def test_float32_line_compares_with_the_readmes_bound(monkeypatch, float32, first, says):
    """The float32 difference is set beside the README's 1e-5 and explained where it is above."""
    pytest.importorskip("torch")
    found = {"float64": 1e-16, "float32": float32, "float32 first step": first}
    monkeypatch.setattr(demo, "_equivalence", lambda *args: found)
    lines: list[str] = []
    result = demo.DemoResult(0.9, 0.2, [], None, None, [])
    demo._log_equivalence(result, None, None, demo.DemoConfig(quick=True), lines.append)
    assert len(lines) == 1 and f"{float32:.2e} in float32. The README's 1e-05" in lines[0]
    assert lines[0].endswith(says) or says in lines[0]


def test_demo_numbers_and_reproducibility(tmp_path):
    def run(seed, name):
        config = demo.DemoConfig(seed=seed, out=tmp_path / name, quick=True, equivalence=False)
        return demo.run_demo(config, log=lambda line: None, progress=False)

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    rows = {r.method: r for r in a.methods}
    total = rows["full fine-tuning"].total
    assert rows["full fine-tuning"].trainable == total
    assert rows["head only"].trainable == 256 * 10 + 10
    for r in (1, 4, 8):  # r (in + out) per adapted Linear
        assert rows[f"LoRA r={r}"].trainable == r * ((64 + 256) + (256 + 256) + (256 + 10))
    assert rows["LoRA r=1"].saved_bytes < rows["LoRA r=8"].saved_bytes
    assert rows["LoRA r=8"].saved_bytes < rows["full fine-tuning"].saved_bytes
    assert rows["LoRA r=8"].peak_bytes < rows["full fine-tuning"].peak_bytes
    assert rows["full fine-tuning"].accuracy > a.base_shifted_accuracy  # it learned something
    config = demo.DemoConfig(quick=True)
    for r in a.methods:  # curves from step 0 (the pre-trained model) to the last step
        assert r.steps == list(range(0, config.steps + 1, config.eval_every))
        assert r.test_accuracy[0] == a.base_shifted_accuracy
        assert r.test_accuracy[-1] == r.accuracy
        assert len(r.train_loss) == config.steps
        assert r.step_seconds > 0
    for x, y in zip(a.methods, b.methods, strict=True):  # same seed: the same run
        assert x.test_accuracy == y.test_accuracy and x.train_loss == y.train_loss
    lora_a = [m.train_loss for m in a.methods if m.method.startswith("LoRA")]
    lora_c = [m.train_loss for m in c.methods if m.method.startswith("LoRA")]
    assert lora_a != lora_c  # another seed: other adapters and batches


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
        ({"seed": "0"}, TypeError, "seed must be an integer >= 0, got '0'"),
        ({"quick": "yes"}, TypeError, "quick must be True or False, got 'yes'"),
        ({"equivalence": 1}, TypeError, "equivalence must be True or False, got 1"),
        ({"shift": "rotate180"}, ValueError, "shift must be one of .*got shift='rotate180'"),
        ({"ranks": ()}, ValueError, r"ranks must hold at least one rank, got \(\)"),
        ({"ranks": (4, 0)}, ValueError, "ranks must be a positive integer, got 0"),
        ({"ranks": (1, 2.0)}, TypeError, "ranks must be a positive integer, got 2.0"),
        ({"ranks": (11,)}, ValueError, r"rank 11 exceeds 10 \(the output layer has 10 rows\)"),
        ({"ranks": 4}, TypeError, "ranks must be a tuple of ints, got 4"),
    ],
)
def test_demo_config_wrong_type_or_value(kwargs, error, match):
    with pytest.raises(error, match="^DemoConfig: " + match):
        demo.DemoConfig(**kwargs)


def test_cli_demo_bad_seed_is_one_line_and_exit_2(capsys):
    assert main(["demo", "--quick", "--seed", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loralab demo: error: DemoConfig: seed must be an integer >= 0, got -1"


def test_demo_out_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loralab demo: error: cannot write to --out") and "\n" not in err


def test_regenerated_checkpoint_matches_the_shipped_one(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = tmp_path / "ckpt.safetensors"
    assert demo.main(["--regenerate-checkpoint", "--path", str(path)]) == 0
    shipped = load_file(str(digits_checkpoint_path()))
    fresh = load_file(str(path))
    with safe_open(str(path), "np") as f, safe_open(str(digits_checkpoint_path()), "np") as g:
        fresh_meta, shipped_meta = f.metadata(), g.metadata()
    assert shipped_meta["regenerate"] == "python -m loralab.demo --regenerate-checkpoint"
    assert float(shipped_meta["test_accuracy"]) > 0.95
    del fresh_meta["test_accuracy"], shipped_meta["test_accuracy"]  # may round differently
    assert fresh_meta == shipped_meta  # the shipped note still describes how it was made
    assert shipped.keys() == fresh.keys()
    for k in shipped:  # bit for bit on one machine; BLAS kernels may round differently elsewhere
        np.testing.assert_allclose(fresh[k], shipped[k], rtol=1e-4, atol=1e-5, err_msg=k)
