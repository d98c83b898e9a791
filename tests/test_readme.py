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
