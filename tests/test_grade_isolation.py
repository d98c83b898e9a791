"""The grader keeps student code away from the verdicts (issue 22).

Each test grades a small real exercise notebook into which a student's code (a forgery, a crash, an
endless loop, a misbehaving process) is written. The checks must run in the grader's process, so
nothing the notebook does changes a verdict, and every limit holds from outside.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import pytest

from loralab.exercises import grade
from loralab.exercises.grade import fill_notebook, grade_notebook, main

pytest.importorskip("nbclient")
pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parent.parent
EXERCISES_DIR = ROOT / "tutorials" / "exercises"
FORWARD = EXERCISES_DIR / "01_lora_forward.ipynb"  # lora_forward, lora_forward_from_config
MERGE = EXERCISES_DIR / "06_merge_and_optimizer.ipynb"  # merge, sgd_step, adam_step


@pytest.fixture(autouse=True)
def _quiet_package(tmp_path_factory, monkeypatch):
    """Hash a small stand-in package: others may be editing loralab's files while these run (the
    real package is hashed in tests/test_grade.py, and the guard is tested below)."""
    package = tmp_path_factory.mktemp("package")
    (package / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(grade, "_package_dir", lambda: package)


def _solutions() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location(
        "loralab_solutions", ROOT / "instructor" / "solutions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.solution_sources()


WRONG = {
    "lora_forward": (
        "def lora_forward(x, W0, A, B, scaling):\n"
        "    return np.zeros(x.shape[:-1] + (W0.shape[0],))"
    ),
    "lora_forward_from_config": (
        "def lora_forward_from_config(x, W0, A, B, alpha, r):\n"
        "    return np.zeros(x.shape[:-1] + (W0.shape[0],))"
    ),
}


def _notebook(tmp_path, template, sources, *, extra=(), name=None) -> Path:
    """``template`` with ``sources`` in its exercise cells, without its check cells, and with
    ``extra`` code cells at the end."""
    out = tmp_path / (name or template.name)
    nb = fill_notebook(template, sources)
    # the check cells only print (and would run an endless loop once more): the grader's verdict
    # does not depend on them
    nb.cells = [c for c in nb.cells if "check" not in c.metadata.get("tags", [])]
    for code in extra:
        nb.cells.append(nbformat.v4.new_code_cell(code))
    nbformat.write(nb, out)
    return out


def _verdicts(report) -> list[tuple[str, bool]]:
    return [(r.key, r.passed) for r in report.results]


# Each forgery is code a student could put in a cell; with the checks in the kernel each one
# turned zeros into full marks.
FORGERIES = {
    "patched_checks": """
import loralab.exercises as _ex, loralab.exercises._layer_checks as _lc
def _yes(*a, **k):
    print("Correct: forged")
    return True
for _m in (_ex, _lc):
    for _n in dir(_m):
        if _n.startswith("check_"):
            setattr(_m, _n, _yes)
""",
    "patched_grader": """
import json as _json
import loralab.exercises.grade as _g
def _forged(keys, namespace, *a, **k):
    for key in keys:
        print(_g._MARKER + _json.dumps({"key": key, "passed": True, "message": "ok"}), flush=True)
for _n in dir(_g):
    if _n.startswith(("run_", "_run", "grade")) and callable(getattr(_g, _n)):
        setattr(_g, _n, _forged)
import loralab.exercises._feedback as _fb
_fb.run_check = lambda *a, **k: True
""",
    "replaced_exercises_module": """
import sys, types
_fake = types.ModuleType("loralab.exercises")
_fake.__path__ = []
def __getattr__(name):
    return lambda *a, **k: True
_fake.__getattr__ = __getattr__
sys.modules["loralab.exercises"] = _fake
import loralab
loralab.exercises = _fake
""",
    "patched_allclose": """
import numpy
numpy.allclose = lambda *a, **k: True
numpy.array_equal = lambda *a, **k: True
numpy.isclose = lambda a, b, *args, **k: numpy.ones(numpy.shape(a), dtype=bool)
""",
    "always_equal_array": """
class _Yes(np.ndarray):
    def __eq__(self, other):
        return True
    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ in ("allclose", "array_equal", "isclose", "all"):
            return True
        return super().__array_function__(func, types, args, kwargs)
_wrong_forward, _wrong_config = lora_forward, lora_forward_from_config
def lora_forward(x, W0, A, B, scaling):
    return np.asarray(_wrong_forward(x, W0, A, B, scaling)).view(_Yes)
def lora_forward_from_config(x, W0, A, B, alpha, r):
    return np.asarray(_wrong_config(x, W0, A, B, alpha, r)).view(_Yes)
""",
    "patched_reference": """
import loralab.exercises._reference as _ref
_ref.lora_forward = lambda x, W0, A, B, scaling: np.zeros(x.shape[:-1] + (W0.shape[0],))
""",
    "tracer": """
import sys, ctypes
def _tracer(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "difference":
        frame.f_locals["expected"] = np.asarray(frame.f_locals["got"], dtype=float)
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    return None
sys.settrace(_tracer)
import threading
threading.settrace(_tracer)
""",
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forgery_scores_nothing_for_wrong_functions(tmp_path, forgery):
    student = _notebook(tmp_path, FORWARD, WRONG, extra=[FORGERIES[forgery]])
    report = grade_notebook(student, timeout=30)
    assert _verdicts(report) == [("lora_forward", False), ("lora_forward_from_config", False)]
    assert report.score == 0


def test_correct_functions_score_full_marks_despite_every_forgery(tmp_path):
    forgeries = [FORGERIES[k] for k in sorted(FORGERIES) if k != "always_equal_array"]
    student = _notebook(tmp_path, FORWARD, _solutions(), extra=forgeries)
    report = grade_notebook(student, timeout=30)
    assert report.passed, report.format()


def test_exit_and_an_alarm_proof_loop_fail_alone(tmp_path):
    sources = _solutions()
    sources["merge"] = (
        "def merge(W0, A, B, scaling):\n    import os\n    os._exit(3)\n\n"
        "def unmerge(W, A, B, scaling):\n    return W - scaling * (B @ A)"
    )
    sources["unmerge"] = ""
    sources["sgd_step"] = (
        "def sgd_step(params, grads, trainable, lr):\n"
        "    import signal\n"
        "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})\n"
        "    while True:\n"
        "        try:\n"
        "            pass\n"
        "        except BaseException:\n"
        "            pass"
    )
    student = _notebook(tmp_path, MERGE, sources)
    start = time.monotonic()
    # The notebook's own check cells run these too: the loop costs the cell timeout once.
    report = grade_notebook(student, timeout=4, time_limit=1)
    assert time.monotonic() - start < 60  # generous: the loop alone would run for ever
    assert _verdicts(report) == [("merge", False), ("sgd_step", False), ("adam_step", True)]
    assert "exited" in report.results[0].message and "3" in report.results[0].message
    assert "did not return within 1 s" in report.results[1].message


@pytest.mark.skipif(os.name != "posix", reason="the memory limit is POSIX's setrlimit")
def test_running_out_of_memory_fails_that_exercise_and_says_so(tmp_path):
    sources = _solutions()
    sources["lora_forward"] = (
        "def lora_forward(x, W0, A, B, scaling):\n    return np.ones((40_000, 40_000))"
    )
    sources["lora_forward_from_config"] = (
        "def lora_forward_from_config(x, W0, A, B, alpha, r):\n"
        "    return x @ W0.T + alpha / r * ((x @ A.T) @ B.T)"
    )
    report = grade_notebook(_notebook(tmp_path, FORWARD, sources), timeout=30, memory_limit=2048)
    assert _verdicts(report) == [("lora_forward", False), ("lora_forward_from_config", True)]
    assert "ran out of memory (the limit is 2048 MiB)" in report.results[0].message


def test_keyboard_interrupt_and_system_exit_fail_alone(tmp_path):
    sources = _solutions()
    sources["lora_forward"] = (
        "def lora_forward(x, W0, A, B, scaling):\n    raise KeyboardInterrupt('stop')"
    )
    sources["lora_forward_from_config"] = (
        "def lora_forward_from_config(x, W0, A, B, alpha, r):\n    raise SystemExit(0)"
    )
    report = grade_notebook(_notebook(tmp_path, FORWARD, sources), timeout=30)
    assert _verdicts(report) == [("lora_forward", False), ("lora_forward_from_config", False)]
    assert "KeyboardInterrupt" in report.results[0].message
    assert "called exit" in report.results[1].message


def test_the_time_limit_holds_without_sigalrm_and_from_a_thread(tmp_path, monkeypatch):
    sources = _solutions()
    sources["lora_forward"] = (
        "def lora_forward(x, W0, A, B, scaling):\n    while True:\n        pass"
    )
    sources["lora_forward_from_config"] = (  # not through the looping lora_forward
        "def lora_forward_from_config(x, W0, A, B, alpha, r):\n"
        "    return x @ W0.T + alpha / r * ((x @ A.T) @ B.T)"
    )
    student = _notebook(tmp_path, FORWARD, sources)
    monkeypatch.delattr(signal, "SIGALRM")
    monkeypatch.delattr(signal, "setitimer")
    found = {}
    worker = threading.Thread(
        target=lambda: found.update(report=grade_notebook(student, timeout=30, time_limit=1))
    )
    worker.start()
    worker.join(120)
    assert not worker.is_alive()
    report = found["report"]
    assert _verdicts(report) == [("lora_forward", False), ("lora_forward_from_config", True)]
    assert "did not return within 1 s" in report.results[0].message


def test_calling_loralab_own_implementation_fails_and_says_so(tmp_path):
    sources = _solutions()
    sources["lora_forward"] = (
        "def lora_forward(x, W0, A, B, scaling):\n"
        "    from loralab.lora.ops import lora_forward as theirs\n"
        "    return theirs(x, W0, A, B, scaling)"
    )
    sources["lora_forward_from_config"] = (
        "import loralab.exercises._reference as _r\n\n"
        "def lora_forward_from_config(x, W0, A, B, alpha, r):\n"
        "    return _r.lora_forward(x, W0, A, B, alpha / r)"
    )
    report = grade_notebook(_notebook(tmp_path, FORWARD, sources), timeout=30)
    assert _verdicts(report) == [("lora_forward", False), ("lora_forward_from_config", False)]
    for result in report.results:
        assert "loralab's own" in result.message, result.message


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    if status.exists():  # a zombie waiting for its parent is dead too
        return "\nState:\tZ" not in status.read_text()
    return True


@pytest.mark.skipif(os.name != "posix", reason="process groups and /proc")
def test_a_notebook_harms_no_one_else(tmp_path):
    classroom = tmp_path / "class"
    classroom.mkdir()
    solutions = _solutions()
    bully = """
import glob, os, signal, subprocess, sys
print("FOLDER", sorted(os.listdir(".")))
for p in glob.glob("*.ipynb") + glob.glob("../*.ipynb") + glob.glob("../*/*.ipynb"):
    if "bully" not in p:
        open(p, "w").write("overwritten")
try:
    print("NEIGHBOUR", open("good.ipynb").read()[:20])
except OSError as e:
    print("NEIGHBOUR unreadable")
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
print("CHILD", subprocess.Popen(sleep).pid)
print("DETACHED", subprocess.Popen(sleep, start_new_session=True).pid)
os.kill(os.getppid(), signal.SIGKILL)
"""
    _notebook(classroom, FORWARD, WRONG, extra=[bully], name="bully.ipynb")
    good = _notebook(classroom, FORWARD, solutions, name="good.ipynb")
    before = good.read_bytes()
    bully_report = grade_notebook(classroom / "bully.ipynb", timeout=30)
    good_report = grade_notebook(good, timeout=30)
    assert good.read_bytes() == before
    assert good_report.passed, good_report.format()
    assert bully_report.score == 0
    printed = "".join(o.get("text", "") for o in bully_report.executed.cells[-1].get("outputs", []))
    assert "FOLDER ['bully.ipynb']" in printed and "NEIGHBOUR unreadable" in printed
    pids = [
        int(line.split()[1])
        for line in printed.splitlines()
        if line.startswith(("CHILD", "DETACHED"))
    ]
    assert len(pids) == 2, printed
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_a_change_to_the_installed_package_stops_grading_and_names_the_notebook(
    tmp_path, monkeypatch
):
    package = tmp_path / "fake_package"
    package.mkdir()
    (package / "checks.py").write_text("ok = True\n")
    monkeypatch.setattr(grade, "_package_dir", lambda: package)
    tamper = f"open({str(package / 'checks.py')!r}, 'a').write('ok = False\\n')"
    student = _notebook(tmp_path, FORWARD, WRONG, extra=[tamper], name="tamper.ipynb")
    with pytest.raises(grade.PackageChanged, match="tamper.ipynb"):
        grade_notebook(student, timeout=30)


def test_a_folder_of_three_gives_a_csv_row_and_a_feedback_file_each(tmp_path, capfd):
    classroom = tmp_path / "class"
    classroom.mkdir()
    solutions = _solutions()
    half = dict(solutions, lora_forward_from_config=WRONG["lora_forward_from_config"])
    _notebook(classroom, FORWARD, solutions, name="ada.ipynb")
    _notebook(classroom, FORWARD, half, name="bob.ipynb")
    (classroom / "cyd.ipynb").write_text("not a notebook")  # broken: graded as zero, not fatal
    sheet, feedback = tmp_path / "grades.csv", tmp_path / "feedback"
    argv = [str(classroom), "-j", "2", "--csv", str(sheet), "--feedback", str(feedback)]
    assert main([*argv, "--seed", "3"]) == 1
    rows = list(csv.DictReader(sheet.open(encoding="utf-8")))
    assert [Path(r["file"]).name for r in rows] == ["ada.ipynb", "bob.ipynb", "cyd.ipynb"]
    assert [r["total"] for r in rows] == ["2", "1", "0"]
    assert rows[1]["lora_forward_from_config"] == "0" and rows[1]["lora_forward"] == "1"
    assert "wrong values" in rows[1]["failures"]
    assert "not JSON" in rows[2]["failures"]
    assert sorted(p.name for p in feedback.iterdir()) == ["ada.md", "bob.md", "cyd.md"]
    assert "Not yet" in (feedback / "bob.md").read_text(encoding="utf-8")
    out = capfd.readouterr()
    assert "without encryption" not in out.out + out.err


def test_seeded_cases_are_reproducible_and_differ_from_the_defaults():
    import numpy as np

    default = np.random.default_rng(41).random(3)
    with grade.seeded_cases(7):
        first = np.random.default_rng(41).random(3)
    with grade.seeded_cases(7):
        again = np.random.default_rng(41).random(3)
    with grade.seeded_cases(None):
        unseeded = np.random.default_rng(41).random(3)
    assert np.array_equal(first, again) and not np.array_equal(first, default)
    assert np.array_equal(unseeded, default)
    assert np.array_equal(np.random.default_rng(41).random(3), default)  # put back
