"""The README's example runs, and the numbers its comments state are the ones it prints."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_ten_line_example_runs_and_its_comment_is_true(tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"## Ten lines of LoRA\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
    stated = re.search(r"# \(trainable, total\) = (\(\d+, \d+\))", code).group(1)
    assert out.getvalue().strip() == stated
    assert namespace["loss"].item() < 0.1
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_twin_example_runs_and_peft_loads_its_adapter(tmp_path, monkeypatch):
    import numpy as np
    import pytest

    pytest.importorskip("torch")
    text = README.read_text()
    code = re.search(r"## The PyTorch twin and HF PEFT\n.*?```python\n(.*?)```", text, re.S).group(
        1
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), namespace)
    assert "max" in out.getvalue()
    peft = pytest.importorskip("peft")
    import torch

    from loralab.nn import MLP
    from loralab.torch import to_torch

    # what the comment in the README says, to the letter
    loaded = peft.PeftModel.from_pretrained(to_torch(MLP([64, 128, 10], seed=0)), "adapter")
    x = np.random.default_rng(1).random((4, 64))
    ours = namespace["model"](x).data
    theirs = loaded(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


def test_beyond_one_adapter_example_runs_and_its_comment_is_true():
    """QLoRA base, two named adapters, a mixed batch: the README's third example, to the letter."""
    import numpy as np

    text = README.read_text()
    code = re.search(
        r"## Beyond one adapter on one laptop\n\n```python\n(.*?)```", text, re.S
    ).group(1)
    out = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    stated = re.search(r"# \(trainable, total\) = (\(\d+, \d+\))", code).group(1)
    assert out.getvalue().strip() == stated
    from loralab.lora import set_adapter

    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    for i, name in enumerate(["default", "task2"]):
        set_adapter(model, name)
        np.testing.assert_allclose(y.data[i], model(x[i : i + 1]).data[0], rtol=1e-5, atol=1e-6)
