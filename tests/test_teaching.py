"""What the tutorials teach, checked: loralab.teaching's helpers, one alpha story in the math
guide, the demo and the notebooks, notebooks that run outside the repository, and the engine
type-along with its solutions filled in. Teaching helpers: add checks of this kind here."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from loralab import demo
from loralab.teaching import STAND_IN_BANNER, compare_prediction, figure, stand_in_banner

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.ipynb"))
ALL_NOTEBOOKS = TUTORIALS + sorted((ROOT / "tutorials" / "exercises").glob("*.ipynb"))
MATH_GUIDE = ROOT / "docs" / "guides" / "math.md"


def _cells(path: Path, kind: str) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [
        {**c, "source": "".join(c["source"]) if isinstance(c["source"], list) else c["source"]}
        for c in nb["cells"]
        if c["cell_type"] == kind
    ]


def _text(path: Path, kind: str) -> str:
    return "\n".join(c["source"] for c in _cells(path, kind))


# ------------------------------------------------------------------------ compare_prediction
def test_compare_prediction_without_a_guess_shows_the_answer(capsys):
    assert compare_prediction(None, 4.0, explanation="because") is None
    out = capsys.readouterr().out
    assert "did not commit a guess (my_guess is None)" in out and "4" in out and "because" in out


def test_compare_prediction_numbers_within_and_outside_the_tolerance(capsys):
    assert compare_prediction(3.9, 4.0) is True
    assert compare_prediction(8, 4.0) is False
    out = capsys.readouterr().out
    assert "Close (within 10%)" in out and "factor of 2 (too high)" in out
    assert compare_prediction(4.5, 4.0, rtol=0.2) is True
    assert compare_prediction(0.0, 1e-3, atol=1e-2) is True
    assert compare_prediction(-1.0, 1.0) is False
    assert "Off by 2" in capsys.readouterr().out


def test_compare_prediction_words_lists_and_dicts(capsys):
    assert compare_prediction(" Identical ", "identical", choices=("identical", "close")) is True
    assert compare_prediction(["update", "weight", "random"], ["update", "weight", "random"])
    assert (
        compare_prediction(["weight", "update", "random"], ["update", "weight", "random"]) is False
    )
    assert compare_prediction({"a": "Zero", "b": "none"}, {"a": "zero", "b": "none"}) is True
    assert compare_prediction({"a": "zero", "b": "zero"}, {"a": "zero", "b": "none"}) is False
    assert "look again at b" in capsys.readouterr().out


def test_compare_prediction_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="my_guess = 5 is not one of the choices 2, 4, 8"):
        compare_prediction(5, 4, choices=(2, 4, 8))
    with pytest.raises(TypeError, match="write a number"):
        compare_prediction("four", 4.0)
    with pytest.raises(ValueError, match="rtol must be a number >= 0"):
        compare_prediction(1.0, 1.0, rtol=-1)


def test_stand_in_banner_names_what_ran():
    assert (
        stand_in_banner("step 1: your forward", done=True) == "step 1: your forward is used below"
    )
    line = stand_in_banner("step 1: your forward", done=False)
    assert STAND_IN_BANNER in line and "your cell above is not finished" in line


def test_every_prediction_in_the_type_alongs_and_01_to_05_is_committed():
    """Each predict-then-run question has a `my_guess = None` cell and a compare_prediction."""
    owned = [p for p in TUTORIALS if re.match(r"0[1-5]", p.name)]
    assert len(owned) >= 7
    for path in owned:
        questions = len(re.findall(r"predict,? then run", _text(path, "markdown"), flags=re.I))
        code = _text(path, "code")
        assert len(re.findall(r"^my_guess = None\b", code, flags=re.M)) == questions, path.name
        assert code.count("compare_prediction(\n    my_guess") == questions, path.name


# ------------------------------------------------------------------------ figures
def test_block_diagram_ships_with_the_package_and_matches_the_docs_copy():
    docs_copy = ROOT / "docs" / "assets" / "figures" / "lora_block.svg"
    assert figure("lora_block.svg") == docs_copy.read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="available: lora_block.svg"):
        figure("missing.svg")
    with pytest.raises(FileNotFoundError):
        figure("../presets.json")


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_reads_a_path_outside_its_own_folder(path):
    """A downloaded copy of a notebook has no repository around it: code may not reach up
    (`../`); links in markdown are fine (the docs site maps them)."""
    for cell in _cells(path, "code"):
        assert not re.search(r"""["']\.\.[/\\]""", cell["source"]), (path.name, cell["source"])


def _run_alone(nb_path: Path, folder: Path, *, cells: int | None = None) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(nb_path, as_version=4)
    if cells is not None:
        nb.cells = nb.cells[:cells]
    copy = folder / nb_path.name
    nbformat.write(nb, copy)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()


@pytest.mark.notebook
def test_notebooks_with_figures_run_from_an_empty_folder(tmp_path):
    """Tutorials 01 and 05 show the block diagram; copied alone into an empty folder (as
    "Download the notebook" does), they run. 01 runs whole; 05 up to its figure (the rest of it
    times a backward for 20 s, and the static test above covers its paths)."""
    for name, cells in (
        ("01_why_peft.ipynb", None),
        ("05_lora_layer_and_manual_backward.ipynb", 3),
    ):
        folder = tmp_path / name.removesuffix(".ipynb")
        folder.mkdir()
        source = ROOT / "tutorials" / name
        assert "figure(" in _text(source, "code")
        _run_alone(source, folder, cells=cells)
        assert [p.name for p in folder.iterdir()] == [name]  # nothing else was needed or left


# ------------------------------------------------------------------------ one alpha story
def test_math_guide_tells_the_alpha_story_the_demo_repeats():
    guide = MATH_GUIDE.read_text(encoding="utf-8")
    key = re.search(r"In one sentence:\s*\*\*(.*?)\*\*", guide, flags=re.S)
    assert key, "the Scaling section's one-sentence summary is missing"
    sentence = " ".join(key.group(1).split())
    for claim in (
        r"fixes $\alpha$ at the first $r$ it tries",
        r"$s = \alpha / r$ shrinks as $r$ grows",
        r"$\alpha = 2r$ keeps $s = 2$ at every rank",
        "removes that normalisation",
        r"$s = \alpha / \sqrt{r}$",
    ):
        assert claim in sentence, claim
    note = " ".join(demo.ALPHA_NOTE.split())
    for claim in (
        "alpha = 2r",
        "2 at every rank",
        "removes the paper's normalisation",
        "fixes alpha at the first r it tries",
        "alpha / r shrinks as r grows",
        "math guide, section Scaling",
    ):
        assert claim in note, claim


def test_demo_does_what_its_alpha_note_says():
    from loralab.nn import MLP

    for r in (1, 4, 8):
        model = demo._lora(r)(MLP([64, 32, 16, 10], seed=0), 0)
        scalings = {m.scaling for m in model.modules() if hasattr(m, "lora_A")}
        assert scalings == {2.0}, (r, scalings)
    source = Path(demo.__file__).read_text(encoding="utf-8")
    assert "{ALPHA_NOTE}" in source  # printed by run_demo


def test_no_one_says_alpha_2r_lets_one_learning_rate_serve_every_rank():
    """The contradiction issue 25 found: alpha = 2r removes the rank normalisation, so it is
    not what makes one learning rate serve every r."""
    wrong = re.compile(r"one learning rate (serves|suits|works for) every (r\b|rank)", flags=re.I)
    places = [Path(demo.__file__), MATH_GUIDE, *ROOT.glob("docs/guides/*.md"), ROOT / "README.md"]
    places += ALL_NOTEBOOKS
    for path in places:
        text = path.read_text(encoding="utf-8")
        assert not wrong.search(text), path.name


ALPHA_2R = re.compile(r"alpha\s*=\s*2\s*\*\s*r\b")
LITERAL = re.compile(r"\br\s*=\s*(\d+)\s*,\s*(?:lora_)?alpha\s*=\s*(\d+)(?:\.0)?\b")


def _uses_alpha_2r(code: str) -> bool:
    """`alpha=2 * r`, or literal pairs with alpha = 2r other than alpha = 8 (the default, the
    paper's convention with 8 as the first rank tried: r = 4, alpha = 8 is not the recipe)."""
    literal = any(int(a) == 2 * int(r) and int(a) != 8 for r, a in LITERAL.findall(code))
    return bool(ALPHA_2R.search(code)) or literal


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_using_alpha_2r_says_so_and_links_the_scaling_section(path):
    if not _uses_alpha_2r(_text(path, "code")):
        return
    prose = _text(path, "markdown")
    assert "guides/math.md#scaling" in prose, f"{path.name}: no link to the math guide's Scaling"
    assert re.search(r"2r\b", prose), f"{path.name}: uses alpha = 2r without saying so"


def test_alpha_2r_detector_sees_both_spellings():
    assert _uses_alpha_2r("inject_lora(m, t, r=r, alpha=2 * r)")
    assert _uses_alpha_2r("LoRALinear(base, r=3, alpha=6, seed=0)")
    assert not _uses_alpha_2r("LoRALinear(base, r=4, alpha=8)")  # the default alpha
    assert not _uses_alpha_2r("LoRALinear(base, r=8, alpha=8)")


# ------------------------------------------------------------------------ ΔW, one definition
def test_delta_w_is_defined_with_the_scaling_everywhere():
    r"""ΔW = (alpha / r) B A (the README's table) where ΔW is defined (README, home page, the
    math guide, glossary and conventions, the tutorials and exercise 1, which introduces it);
    the bare ΔW = BA only where the paper's notation is explained."""
    bare = re.compile(r"\\Delta W\s*=\s*BA\b|ΔW\s*=\s*B\s*A\b")
    guides = ("math.md", "glossary.md", "conventions.md")
    exercise01 = sorted((ROOT / "tutorials" / "exercises").glob("01_*.ipynb"))
    places = [ROOT / "README.md", ROOT / "docs" / "index.md", *TUTORIALS, *exercise01]
    places += [ROOT / "docs" / "guides" / name for name in guides]
    for path in places:
        for line in path.read_text(encoding="utf-8").splitlines():
            if bare.search(line):
                assert "paper" in line.lower() or "Equation 3" in line, (path.name, line)


# ------------------------------------------------------------------------ the engine type-along
def _load_engine_solutions():
    spec = importlib.util.spec_from_file_location(
        "loralab_engine_solutions_nb", ROOT / "instructor" / "engine_solutions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENGINE_NB = ROOT / "tutorials" / "04b_build_the_engine_yourself.ipynb"


def _execute(nb, folder: Path) -> str:
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.notebook
def test_engine_type_along_accepts_its_solutions_and_uses_them(tmp_path):
    import nbformat

    nb = nbformat.read(ENGINE_NB, as_version=4)
    sources = _load_engine_solutions().solution_sources()
    blanks = {c.id: c for c in nb.cells if c.id in sources}
    assert set(blanks) == set(sources)
    for cell_id, cell in blanks.items():
        assert "raise NotImplementedError" in cell.source, cell_id
        cell.source = sources[cell_id]
    printed = _execute(nb, tmp_path)
    assert printed.count("Correct:") == 5
    assert STAND_IN_BANNER not in printed
    for step in ("topological_order", "backward", "mul_backward", "matmul_backward"):
        assert f"your {step} is used below" in printed


@pytest.mark.notebook
def test_engine_type_along_with_blank_cells_says_loralab_stood_in(tmp_path):
    import nbformat

    nb = nbformat.read(ENGINE_NB, as_version=4)
    printed = _execute(nb, tmp_path)
    assert printed.count("Not yet:") == 5 and "Correct:" not in printed
    # every step, and both cells that compare with loralab.Tensor, say loralab's version ran
    assert printed.count(STAND_IN_BANNER) == 7
    assert "max |engine - loralab.Tensor|" in printed
