"""What the install instructions and the package metadata promise (issues 19 and 24).

`.[all]` is everything (JupyterLab included, so `jupyter lab tutorials/` works after it); no page
(nor a message, a notebook or a skip note) tells a user to `pip install loralab` from a package
index, where it is not published; the metadata names the project's pages and the Python versions
CI tests.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import tomllib

import loralab

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS = PROJECT["optional-dependencies"]

# `pip install loralab`, `pip install 'loralab[torch]'`, `pip install -U "loralab[x]"`: from an
# index. Not `pip install -e ".[x]"` (a clone) nor a wheel's path (`dist/loralab-0.2.0-...whl`).
FROM_AN_INDEX = re.compile(r"pip install\s+(?:-\w+\s+)*['\"]?loralab(?![-\w./])")


def requirement_name(requirement):
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def expand(extra, seen=()):
    """The requirement names of ``loralab[extra]``, following ``loralab[a,b]`` references."""
    names = set()
    for requirement in EXTRAS[extra]:
        if requirement_name(requirement) == "loralab":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                if inner not in seen:
                    names |= expand(inner.strip(), (*seen, extra))
        else:
            names.add(requirement_name(requirement))
    return names


def doc_pages():
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    pages += sorted((ROOT / "tutorials").rglob("*.md"))
    pages += sorted(p for p in (ROOT / "docs").rglob("*.md") if "tutorials" not in p.parts[-2:])
    return [p for p in pages if p.is_file()]


def test_all_is_every_other_extra_and_has_jupyterlab():
    everything = expand("all")
    for extra in EXTRAS:
        assert expand(extra) <= everything, f"loralab[all] misses what loralab[{extra}] installs"
    assert "jupyterlab" in expand("jupyter") and "jupyterlab" in everything


def test_no_extra_pulls_the_jupyter_meta_package():
    # It pulls far more than the tutorials need (ENVIRONMENT.md: it slows `import nbformat`).
    assert not [extra for extra in EXTRAS if "jupyter" in expand(extra)]


def test_dev_has_what_ci_uses_to_check_the_release():
    assert {"build", "twine"} <= expand("dev")


@pytest.mark.parametrize(
    "line, from_an_index",
    [
        ("pip install loralab", True),
        ("pip install 'loralab[tutorials]'", True),
        ('pip install -U "loralab[torch]"', True),
        ('pip install -e ".[tutorials]"', False),
        ('pip install "dist/loralab-0.2.0-py3-none-any.whl[tutorials]"', False),
        ("pip install loralab-0.2.0-py3-none-any.whl", False),
        ("pip install -e .", False),
    ],
)
def test_the_index_install_pattern(line, from_an_index):
    assert bool(FROM_AN_INDEX.search(line)) is from_an_index


def test_no_page_installs_loralab_from_a_package_index():
    offenders = [
        f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
        for page in doc_pages()
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if FROM_AN_INDEX.search(line)
    ]
    assert offenders == [], "loralab is not on a package index yet: install from a clone or a wheel"


def code_sources():
    """The Python files and notebooks a user runs or reads messages from, as (name, text) pairs.

    Notebooks give their cells' sources (what a reader sees), not the JSON with its escapes; this
    file is left out, since it spells the wrong commands on purpose.
    """
    for folder in ("loralab", "scripts", "instructor", "benchmarks", "tests", "docs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != Path(__file__).resolve():
                yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "tutorials").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for number, cell in enumerate(cells, 1):
            yield f"{path.relative_to(ROOT)} (cell {number})", "".join(cell["source"])


def test_code_and_notebooks_do_not_install_loralab_from_a_package_index():
    # Error messages (`loralab.torch needs PyTorch: ...`), skip notes and notebook prints.
    sources = list(code_sources())
    assert any(name.startswith("loralab/torch/") for name, _ in sources)
    assert any(name.startswith("tutorials/07_") for name, _ in sources)
    offenders = [
        f"{name}:{number}: {line.strip()}"
        for name, text in sources
        for number, line in enumerate(text.splitlines(), 1)
        if FROM_AN_INDEX.search(line)
    ]
    assert offenders == [], "loralab is not on a package index yet: install from a clone or a wheel"


def test_wheel_and_archive_names_in_the_pages_carry_this_version():
    names = {
        (str(page.relative_to(ROOT)), version)
        for page in doc_pages()
        for version in re.findall(r"loralab-(\d+\.\d+\.\d+)", page.read_text(encoding="utf-8"))
    }
    assert names and {v for _, v in names} == {loralab.__version__}, names


def test_metadata_names_the_projects_pages_and_the_tested_pythons():
    assert {"Homepage", "Documentation", "Issues", "Source"} <= set(PROJECT["urls"])
    classifiers = PROJECT["classifiers"]
    assert "License :: OSI Approved :: MIT License" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    tested = sorted(c.rsplit(" ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c))
    oldest = re.fullmatch(r">=(3\.\d+)", PROJECT["requires-python"]).group(1)
    assert tested[0] == oldest, "the oldest Python declared is the oldest one listed as tested"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"versions/{oldest}." in ci, f"CI does not run anything on Python {oldest}"


def test_jupyter_lab_is_a_command_where_the_extras_are_installed():
    # "Jupyter command `jupyter-lab` not found" was the error: both commands sit beside this Python.
    # (Running `jupyter lab --version` takes about 10 s here; the commands' presence is the point.)
    pytest.importorskip("jupyterlab", reason="needs loralab[jupyter] or loralab[all]")
    bindir = str(Path(sys.executable).parent)
    assert shutil.which("jupyter", path=bindir) and shutil.which("jupyter-lab", path=bindir)


def test_the_docs_extra_keeps_material_below_the_version_that_prints_an_alarm():
    # mkdocs-material 9.7.2 and later print a yellow "MkDocs 2.0 / end of life" notice on every
    # build unless NO_MKDOCS_2_WARNING is set; a student running `mkdocs build` must see no alarm.

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    [material] = [
        d for d in extras["optional-dependencies"]["docs"] if d.startswith("mkdocs-material")
    ]
    assert "<9.7.2" in material.replace(" ", ""), material
