"""mkdocs hooks for the loralab site: the parts of the site that follow what exists at build time.

- **Tutorials**: one page per notebook under ``tutorials/``, rendered from its executed copy in
  ``docs/tutorials/`` (a cache, ignored by git). A copy that is missing, or older than its
  notebook (by a digest of the source cells), is made first by executing the notebook with
  ``scripts/execute_notebooks.py``'s code, so ``mkdocs build --strict`` on a fresh clone builds the
  whole site; a current copy is reused. A notebook that fails to execute is reported with a
  warning (so a strict build fails) and left out.
- **API reference**: one mkdocstrings page per public module in ``API_MODULES`` that exists.
- **Home page**: the list of tutorials replaces ``<!-- loralab:tutorial-list -->`` in ``index.md``.
- **Benchmarks**: ``docs/benchmarks/results.md`` (written by ``loralab bench``) is inlined into
  ``benchmarks.md`` with its figures; a note says how to produce it when it is missing.
- A download link on every tutorial page, and links between notebooks and to the guides (written
  for Jupyter, relative to ``tutorials/``) pointed at their pages on the site.
"""

from __future__ import annotations

import ast
import contextlib
import html
import importlib.util
import json
import logging
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.loralab")

ROOT = Path(__file__).resolve().parent.parent

# (module, one-line summary) in reading order: engine, modules, LoRA, models, faces.
API_MODULES = [
    ("loralab", "The engine's public face: `Tensor`, `no_grad`, `gradcheck`, `Function`."),
    (
        "loralab.functional",
        "Differentiable functions on Tensors (`import loralab.functional as F`).",
    ),
    ("loralab.nn", "Modules: `Module`, `Parameter`, `Linear`, `MLP`, ..."),
    ("loralab.optim", "Optimizers with PyTorch's update rules: `SGD`, `Adam`, `AdamW`."),
    ("loralab.lora", "Where LoRA lives: `LoraConfig`, `LoRALinear`, injection, merging, adapters."),
    ("loralab.lora.ops", "The LoRA math in pure NumPy: forwards and hand backwards (LoRA, DoRA)."),
    ("loralab.lora.config", "`LoraConfig`: PEFT's field names, validated once."),
    (
        "loralab.lora.linear_shared",
        "What both `LoRALinear`s share, and the base interface for quantized bases.",
    ),
    ("loralab.lora.engine_functions", "The engine Functions LoRA runs, and `lora_linear`."),
    ("loralab.lora.linear_layer", "`LoRALinear`, the NumPy layer, and its named-adapter holders."),
    ("loralab.lora.variants", "LoRA variants as objects: rsLoRA, DoRA, PiSSA, OLoRA; LoRA+."),
    ("loralab.counting", "Parameter and memory counting for real model shapes."),
    ("loralab.datasets", "The datasets that ship with loralab and their shifted tasks."),
    ("loralab.training", "The one training loop (`fit`) and classifier training."),
    ("loralab.models", "Models used in the tutorials and the demo."),
    ("loralab.quant", "QLoRA from scratch: NF4/FP4 blockwise quantization, Linear4bit, LoftQ."),
    ("loralab.exercises", "Classroom exercises and their checks."),
    ("loralab.torch", "The PyTorch twin (needs the `torch` extra)."),
]

BENCH_MARKER = "<!-- loralab:benchmark-results -->"
TUTORIAL_LIST_MARKER = "<!-- loralab:tutorial-list -->"
FIGURE_SUFFIXES = (".svg", ".png", ".jpg", ".jpeg", ".webp")

_state: dict = {}


def _load_execute_script():
    path = ROOT / "scripts" / "execute_notebooks.py"
    spec = importlib.util.spec_from_file_location("loralab_execute_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def module_exists(name: str) -> bool:
    """True when module ``name`` (dotted) exists as a file or package under the repository root."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def notebook_title(nb_path: Path) -> str:
    """The first markdown ``# heading`` of a notebook, or its file name without the suffix."""
    with open(nb_path, encoding="utf-8") as f:
        nb = json.load(f)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        match = re.search(r"^#\s+(.+?)\s*#*\s*$", source, flags=re.MULTILINE)
        if match:
            return re.sub(r"[*_`]", "", match.group(1))
    return nb_path.stem.replace("_", " ")


def executed_copy(src: Path, dest: Path, ex) -> dict | None:
    """The recorded metadata of ``src``'s executed copy ``dest``, executing ``src`` first if needed.

    The copy is reused when it records the digest of ``src``'s current cells; otherwise (missing or
    stale) ``src`` is executed and the copy written. Returns None, after a warning, when the
    notebook fails to execute.
    """
    shown = src.relative_to(ROOT).as_posix() if src.is_relative_to(ROOT) else src.name
    recorded: dict = {}
    if dest.is_file():
        with open(dest, encoding="utf-8") as f:
            recorded = json.load(f).get("metadata", {}).get(ex.METADATA_KEY, {})
    if recorded.get("source_sha256") == ex.source_digest(src):
        return recorded
    why = "is older than the notebook" if dest.is_file() else "is missing"
    log.info(f"the executed copy of {shown} {why}: executing it")
    try:
        seconds = ex.execute_notebook(src, dest)
    except Exception as exc:  # report it and build the rest of the site
        dest.unlink(missing_ok=True)
        log.warning(f"{shown} failed to execute: {type(exc).__name__}: {exc}")
        return None
    log.info(f"executed {shown} in {seconds:.1f} s")
    with open(dest, encoding="utf-8") as f:
        return json.load(f)["metadata"][ex.METADATA_KEY]


def _tutorials(docs_dir: Path, source_dir: Path | None = None) -> list[dict]:
    ex = _load_execute_script()
    source_dir = source_dir or ex.SOURCE_DIR
    out_dir = docs_dir / "tutorials"
    found = []
    for src in ex.find_notebooks(source_dir):
        dest = ex.output_path(src, source_dir, out_dir)
        recorded = executed_copy(src, dest, ex)
        if recorded is None:
            continue
        found.append(
            {
                "uri": dest.relative_to(docs_dir).as_posix(),
                "title": notebook_title(src),
                "group": src.parent.relative_to(source_dir).as_posix(),
                "source": src.relative_to(ROOT).as_posix()
                if src.is_relative_to(ROOT)
                else src.name,
                "seconds": recorded.get("execution_seconds"),
            }
        )
    return found


def _tutorial_nav(tutorials: list[dict]) -> list:
    nav: list = [{"Overview": "tutorials/index.md"}]
    groups: dict[str, list] = {}
    for t in tutorials:
        entry = {t["title"]: t["uri"]}
        if t["group"] == ".":
            nav.append(entry)
        else:
            groups.setdefault(t["group"].replace("/", " / ").replace("_", " ").title(), []).append(
                entry
            )
    nav.extend({name: entries} for name, entries in groups.items())
    return nav


def _replace_nav_section(nav: list, title: str, section: list) -> None:
    for i, item in enumerate(nav):
        if isinstance(item, dict) and title in item:
            nav[i] = {title: section}
            return
    nav.append({title: section})


def tutorial_list(tutorials: list[dict], prefix: str = "") -> str:
    """A Markdown list of the tutorials (top-level notebooks, titles as written), linked from ``prefix``."""
    lines = [f"- [{t['title']}]({prefix}{t['uri']})" for t in tutorials if t["group"] == "."]
    return "\n".join(lines) + "\n" if lines else "No executed tutorials were found.\n"


def on_config(config):
    docs_dir = Path(config["docs_dir"])
    tutorials = _tutorials(docs_dir)
    modules = [(name, summary) for name, summary in API_MODULES if module_exists(name)]
    _state.update(tutorials=tutorials, modules=modules)
    if config["nav"] is not None:
        _replace_nav_section(config["nav"], "Tutorials", _tutorial_nav(tutorials))
        api_nav = [{"Overview": "api/index.md"}] + [{name: f"api/{name}.md"} for name, _ in modules]
        _replace_nav_section(config["nav"], "API reference", api_nav)
    return config


def _tutorials_index(tutorials: list[dict]) -> str:
    lines = [
        "# Tutorials",
        "",
        "Each tutorial is a Jupyter notebook in the repository's `tutorials/` folder, shown here with",
        "the outputs of a run made when this site was built. Every number in the text is computed by",
        "a cell; every page has a link to download the executed notebook.",
        "",
        'Run them yourself after `pip install -e ".[all]"`: open the folder in Jupyter, or execute',
        "all of them with `python scripts/execute_notebooks.py`. The docs build executes any notebook",
        "whose executed copy is missing or older than the notebook, and reuses the others.",
        "",
    ]
    if not tutorials:
        lines += ["!!! note", "    No executed tutorials were found when this site was built.", ""]
        return "\n".join(lines)
    lines += ["| Tutorial | Notebook | Run time when built |", "| --- | --- | --- |"]
    for t in tutorials:
        link = t["uri"].removeprefix("tutorials/")
        seconds = f"{t['seconds']:.1f} s" if t["seconds"] is not None else "?"
        lines.append(f"| [{t['title']}]({link}) | `{t['source']}` | {seconds} |")
    return "\n".join(lines) + "\n"


def _api_index(modules: list[tuple[str, str]]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings. Shapes follow PyTorch and PEFT: `Linear.weight` is",
        "`(out_features, in_features)`, `lora_A` is `(r, in_features)`, `lora_B` is",
        "`(out_features, r)`; see [Conventions](../guides/conventions.md).",
        "",
        "| Module | What it holds |",
        "| --- | --- |",
    ]
    lines += [f"| [`{name}`]({name}.md) | {summary} |" for name, summary in modules]
    return "\n".join(lines) + "\n"


def lazy_submodules(name: str) -> list[str]:
    """Public submodules of a package that loads its names lazily (a module ``__getattr__``).

    Static analysis cannot see lazily exported names, so their defining modules are documented.
    """
    package = ROOT.joinpath(*name.split("."))
    init = package / "__init__.py"
    if not init.is_file() or not re.search(r"^def __getattr__\(", init.read_text("utf-8"), re.M):
        return []
    listed = {m for m, _ in API_MODULES}
    subs = sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_"))
    return [f"{name}.{s}" for s in subs if f"{name}.{s}" not in listed]


def shadowed_exports(name: str) -> list[str]:
    """Names in a package's literal ``__all__`` that are also the names of its submodules.

    ``from loralab.gradcheck import gradcheck`` makes ``loralab.gradcheck`` the function at run
    time, but static analysis sees the submodule; such objects are documented by their full path.
    """
    package = ROOT.joinpath(*name.split("."))
    init = package / "__init__.py"
    if not init.is_file():
        return []
    exported: list[str] = []
    for node in ast.walk(ast.parse(init.read_text("utf-8"))):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            with contextlib.suppress(ValueError):
                exported = list(ast.literal_eval(node.value))
    listed = {m for m, _ in API_MODULES}
    return [
        f"{name}.{n}.{n}"
        for n in exported
        if (package / f"{n}.py").is_file() and f"{name}.{n}" not in listed
    ]


def _api_page(name: str, summary: str) -> str:
    blocks = [f"::: {name}\n    options:\n      show_submodules: false\n"]
    blocks += [
        f"::: {sub}\n    options:\n      heading_level: 2\n" for sub in lazy_submodules(name)
    ]
    blocks += [
        f"::: {obj}\n    options:\n      heading_level: 2\n" for obj in shadowed_exports(name)
    ]
    return f"{summary}\n\n" + "\n".join(blocks)


def on_files(files, config):
    tutorials = _state.get("tutorials", [])
    keep = {t["uri"] for t in tutorials}
    for f in list(files):
        if f.src_uri.startswith("tutorials/") and f.src_uri.endswith(".ipynb"):
            if f.src_uri not in keep:  # deleted upstream or not executed: never render it
                files.remove(f)
    files.append(File.generated(config, "tutorials/index.md", content=_tutorials_index(tutorials)))
    modules = _state.get("modules", [])
    files.append(File.generated(config, "api/index.md", content=_api_index(modules)))
    for name, summary in modules:
        files.append(File.generated(config, f"api/{name}.md", content=_api_page(name, summary)))
    return files


def _relink(markdown: str, prefix: str) -> str:
    """Prefix relative link and image targets in ``markdown`` with ``prefix``."""

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^([a-z]+:|/|#)", target) or target.startswith(prefix):
            return match.group(0)
        return f"{match.group(1)}({prefix}{target}"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)", fix, markdown)


def benchmark_results(docs_dir: Path) -> str:
    """Markdown for the Benchmarks page: ``benchmarks/results.md`` plus any figure it does not show."""
    bench_dir = docs_dir / "benchmarks"
    results = bench_dir / "results.md"
    if not results.is_file():
        return (
            '!!! warning "Not yet measured on this build"\n'
            "    No results were found in `docs/benchmarks/`. Run `loralab bench` (it writes\n"
            "    `docs/benchmarks/results.md` and the figures), then build the docs again.\n"
        )
    text = _relink(results.read_text(encoding="utf-8"), "benchmarks/")
    figures = sorted(p for p in bench_dir.iterdir() if p.suffix.lower() in FIGURE_SUFFIXES)
    extra = [p for p in figures if f"benchmarks/{p.name}" not in text]
    if extra:
        text += "\n\n## Figures\n\n"
        text += "\n\n".join(f"![{p.stem.replace('_', ' ')}](benchmarks/{p.name})" for p in extra)
        text += "\n"
    return text


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "index.md" and TUTORIAL_LIST_MARKER in markdown:
        return markdown.replace(TUTORIAL_LIST_MARKER, tutorial_list(_state.get("tutorials", [])))
    if page.file.src_uri == "benchmarks.md" and BENCH_MARKER in markdown:
        return markdown.replace(BENCH_MARKER, benchmark_results(Path(config["docs_dir"])))
    return markdown


def notebook_link_target(href: str, src_uri: str) -> tuple[str, str] | None:
    """The docs file (uri, anchor) that a relative link in notebook ``src_uri`` points to.

    Notebook links are written for Jupyter, relative to the notebook's folder in the repository:
    ``exercises/04_x.ipynb`` or ``../docs/guides/math.md#scaling`` from ``tutorials/``. On the site
    ``tutorials/`` is ``docs/tutorials/``. Returns None for absolute links, anchors and other hosts.
    """
    if re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", href):
        return None
    path, _, anchor = href.partition("#")
    if not path.endswith((".ipynb", ".md")):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(src_uri), path))
    return target.removeprefix("docs/"), anchor


def _relink_notebook_page(content: str, page, files) -> str:
    """Point a notebook page's links to other notebooks and guides at their pages on the site."""

    def fix(match: re.Match) -> str:
        found = notebook_link_target(html.unescape(match.group(1)), page.file.src_uri)
        if found is None:
            return match.group(0)
        uri, anchor = found
        target = files.get_file_from_path(uri)
        if target is None:
            log.warning(f"{page.file.src_uri} links to {match.group(1)}, which is not in the site")
            return match.group(0)
        url = target.url_relative_to(page.file) + (f"#{anchor}" if anchor else "")
        return f'href="{html.escape(url)}"'

    return re.sub(r'href="([^"]+)"', fix, content)


def on_page_content(content, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return content
    content = _relink_notebook_page(content, page, files)
    name = Path(page.file.src_uri).name
    source = next(
        (t["source"] for t in _state.get("tutorials", []) if t["uri"] == page.file.src_uri), name
    )
    bar = (
        '<p class="loralab-notebook-links">'
        f'<a class="md-button" href="{html.escape(name)}" download>Download the notebook</a> '
        f"executed when this site was built; its source is <code>{html.escape(source)}</code>.</p>"
    )
    return bar + content
