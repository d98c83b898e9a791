"""mkdocs hooks for the loralab site: the parts of the site that follow what exists at build time.

- **Tutorials**: one page per notebook under ``tutorials/``, rendered from its executed copy in
  ``docs/tutorials/`` (a cache, ignored by git). A copy that is missing, or older than its
  notebook (by a digest of the source cells), is made first by executing the notebook with
  ``scripts/execute_notebooks.py``'s code, so ``mkdocs build --strict`` on a fresh clone builds the
  whole site; a current copy is reused. A notebook that fails to execute is reported with a
  warning (so a strict build fails) and left out.
- **Exercises**: ``tutorials/exercises/index.md`` lists every exercise notebook with the numbers
  and titles of its exercises, from ``loralab/exercises/_catalogue.py``.
- **Tables of contents** of notebook pages are read from the rendered headings (mkdocs-jupyter's
  drops inline code from titles, and its anchors then miss the headings' ids).
- **API reference**: one mkdocstrings page per public module in ``API_MODULES`` that exists.
- **Home page**: the list of tutorials replaces ``<!-- loralab:tutorial-list -->`` in ``index.md``,
  and the README's "Ten lines of LoRA" (tested by ``tests/test_readme.py``) replaces
  ``<!-- loralab:readme-example -->``: the two pages show one example.
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
import os
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File
from mkdocs.structure.toc import get_toc

log = logging.getLogger("mkdocs.hooks.loralab")

ROOT = Path(__file__).resolve().parent.parent

# (module, one-line summary) in reading order: engine, modules, LoRA, models, faces.
API_MODULES = [
    ("loralab", "The engine's public face: `Tensor`, `no_grad`, `gradcheck`, `Function`."),
    (
        "loralab.functional",
        "Differentiable functions on Tensors (`import loralab.functional as F`).",
    ),
    (
        "loralab.functional_llm",
        "The ops of LLaMA-style models (re-exported by `loralab.functional`).",
    ),
    ("loralab.nn", "Modules: `Module`, `Parameter`, `Linear`, `MLP`, ..."),
    ("loralab.optim", "Optimizers with PyTorch's update rules: `SGD`, `Adam`, `AdamW`."),
    ("loralab.lora", "Where LoRA lives: `LoraConfig`, `LoRALinear`, injection, merging, adapters."),
    ("loralab.lora.ops", "The LoRA math in pure NumPy: forwards and hand backwards (LoRA, DoRA)."),
    ("loralab.lora.embedding_ops", "LoRA on an embedding table, in pure NumPy."),
    ("loralab.lora.grouped", "One batch, many adapters: the grouped LoRA op."),
    ("loralab.lora.stacked", "The grouped op on stacked adapters: one call for all adapters."),
    ("loralab.lora.variants", "LoRA variants as objects: rsLoRA, DoRA, PiSSA, OLoRA; LoRA+."),
    ("loralab.lora.config", "`LoraConfig`: PEFT's field names, validated once."),
    (
        "loralab.lora.linear_shared",
        "What both `LoRALinear`s share, and the base interface for quantized bases.",
    ),
    ("loralab.lora.engine_functions", "The engine Functions LoRA runs, and `lora_linear`."),
    ("loralab.lora.linear_layer", "`LoRALinear`, the NumPy layer, and its named-adapter holders."),
    ("loralab.lora.embedding_layer", "`LoRAEmbedding`: LoRA on a token table."),
    ("loralab.lora.backend", "How one implementation reaches NumPy and (registered) torch models."),
    (
        "loralab.lora.inject",
        "`inject_lora`, `merge_lora`, `unmerge_lora`, `lora_layers`, counting.",
    ),
    (
        "loralab.lora.named_adapters",
        "Named adapters, mixed batches and `add_weighted_adapter`.",
    ),
    ("loralab.lora.peft_format", "`save_adapter` / `load_adapter` in HF PEFT's format."),
    ("loralab.lora.peft_read", "Reading an adapter folder: config, safetensors header, tensors."),
    ("loralab.counting", "Parameter and memory counting for real model shapes."),
    ("loralab.datasets", "The datasets that ship with loralab and their shifted tasks."),
    ("loralab.training", "The one training loop (`fit`) and classifier training."),
    ("loralab.models", "Models used in the tutorials and the demo."),
    ("loralab.models.hf", "`from_pretrained` / `save_pretrained`: Hugging Face model folders."),
    ("loralab.models.gpt2", "GPT-2 on the engine with HF's module names (Conv1D transposed)."),
    ("loralab.models.generation", "`generate`: greedy and sampled decoding, key/value cache."),
    ("loralab.tokenizer", "`BPETokenizer`: byte-level BPE, as HF tokenizers runs tokenizer.json."),
    ("loralab.quant", "QLoRA from scratch: NF4/FP4 blockwise quantization, Linear4bit, LoftQ."),
    ("loralab.exercises", "Classroom exercises and their checks."),
    (
        "loralab.teaching",
        "What the tutorials share: committed predictions, stand-in banners, shipped figures.",
    ),
    ("loralab.torch", "The PyTorch twin (needs the `torch` extra)."),
]

# Packages whose page would hold every re-exported object in full (619 KB for loralab.lora): their
# page documents `lead` in full, in that order (what a student calls first), and lists every other
# public name in a table, by `groups` then by module, linked to its module's page; each public
# submodule has a page of its own (those not in API_MODULES are found, summarised by their
# docstring's first line).
SPLIT_PACKAGES: dict[str, dict] = {
    "loralab.lora": {
        "lead": [
            "LoraConfig",
            "inject_lora",
            "LoRALinear",
            "merge_lora",
            "unmerge_lora",
            "save_adapter",
            "load_adapter",
            "count_parameters",
        ],
        "groups": [
            (
                "Named adapters and mixed batches",
                [
                    "set_adapter",
                    "active_adapters",
                    "list_adapters",
                    "delete_adapter",
                    "disable_adapters",
                    "mixed_batch",
                    "add_weighted_adapter",
                ],
            ),
            ("Embedding LoRA", ["LoRAEmbedding"]),
            (
                "More for training and inspecting",
                ["lora_state_dict", "lora_layers", "lora_linear", "loraplus_param_groups"],
            ),
            (
                "Advanced and internal: backends and base layers",
                ["Backend", "register_backend", "register_linear_type"],
            ),
        ],
    },
    "loralab.quant": {"lead": [], "groups": []},
    "loralab.models": {"lead": [], "groups": []},
    "loralab.exercises": {"lead": [], "groups": []},
    "loralab.torch": {"lead": [], "groups": []},
    "loralab.torch.distributed": {"lead": [], "groups": []},
}

BENCH_MARKER = "<!-- loralab:benchmark-results -->"
TUTORIAL_LIST_MARKER = "<!-- loralab:tutorial-list -->"
README_EXAMPLE_MARKER = "<!-- loralab:readme-example -->"
EXERCISES_INDEX = "tutorials/exercises/index.md"
# Set to 1 to build with the executed copies as they are (stale ones used, missing ones left out)
REUSE_STALE = "LORALAB_DOCS_REUSE_STALE"
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
    if os.environ.get(REUSE_STALE) == "1":  # a quick look while notebooks are being edited
        log.info(
            f"{REUSE_STALE}=1: {shown} not executed; its executed copy {'is used' if recorded else 'is missing: left out'}"
        )
        return recorded or None
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
    if any(t["group"] == "exercises" for t in tutorials):
        groups["Exercises"] = [EXERCISES_INDEX]  # the section's own page (navigation.indexes)
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


def _module_path(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if (path / "__init__.py").is_file() else path.with_suffix(".py")


def _docstrings(name: str) -> tuple[str, dict[str, str]]:
    """First line of module ``name``'s docstring, and of each of its top-level defs and classes."""
    tree = ast.parse(_module_path(name).read_text(encoding="utf-8"))

    def first(node) -> str:
        doc = ast.get_docstring(node) or ""
        paragraph = " ".join(doc.split("\n\n")[0].split())
        return re.split(r"(?<=[.:;])\s", paragraph, maxsplit=1)[0]  # its first sentence

    objects = {
        n.name: first(n)
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    return first(tree), objects


def public_submodules(package: str) -> list[str]:
    """Public modules and subpackages directly inside ``package``, sorted by name."""
    folder = ROOT.joinpath(*package.split("."))
    found = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
    found += [p.name for p in folder.iterdir() if (p / "__init__.py").is_file()]
    return sorted(f"{package}.{n}" for n in found if not n.startswith("_"))


def reexports(package: str) -> dict[str, str]:
    """``{name: module}`` for the names ``package/__init__.py`` imports from other modules."""
    tree = ast.parse(_module_path(package).read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if not alias.asname and not alias.name.startswith("_"):
                    found[alias.name] = node.module
    return found


def defining_module(package: str, name: str) -> str:
    """The module whose page documents ``package.name``: re-exports are followed to their source."""
    module = reexports(package).get(name, package)
    while module in SPLIT_PACKAGES and module != package:
        package, module = module, reexports(module).get(name, module)
    return module


def _split_parent(name: str) -> str | None:
    parent = name.rpartition(".")[0]
    return parent if parent in SPLIT_PACKAGES else None


def api_pages() -> list[tuple[str, str]]:
    """(module, summary) of every API page in reading order: API_MODULES that exist, each split
    package followed by its submodules (those listed first, in their order, then the others)."""
    listed = [(name, summary) for name, summary in API_MODULES if module_exists(name)]
    names = {name for name, _ in listed}

    def with_submodules(name: str, summary: str) -> list[tuple[str, str]]:
        pages = [(name, summary)]
        if name in SPLIT_PACKAGES:
            children = [(n, s) for n, s in listed if _split_parent(n) == name]
            children += [
                (sub, _docstrings(sub)[0]) for sub in public_submodules(name) if sub not in names
            ]
            for child, text in children:
                pages += with_submodules(child, text)
        return pages

    pages = []
    for name, summary in listed:
        if _split_parent(name) is None:
            pages += with_submodules(name, summary)
    return pages


def _api_nav(modules: list[tuple[str, str]]) -> list:
    """Nav entries for the API pages: a split package is a section holding its submodules."""
    entries: dict[str, dict] = {}
    nav: list = [{"Overview": "api/index.md"}]
    for name, _ in modules:
        entry = {name: f"api/{name}.md"}
        if name in SPLIT_PACKAGES:
            entry = {name: [entry]}
            entries[name] = entry
        parent = _split_parent(name)
        (entries[parent][parent] if parent else nav).append(entry)
    return nav


def on_config(config):
    docs_dir = Path(config["docs_dir"])
    tutorials = _tutorials(docs_dir)
    modules = api_pages()
    _state.update(tutorials=tutorials, modules=modules)
    if config["nav"] is not None:
        _replace_nav_section(config["nav"], "Tutorials", _tutorial_nav(tutorials))
        _replace_nav_section(config["nav"], "API reference", _api_nav(modules))
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


def _load_catalogue():
    """``loralab/exercises/_catalogue.py`` by its path: the list of exercises, in course order."""
    path = ROOT / "loralab" / "exercises" / "_catalogue.py"
    spec = importlib.util.spec_from_file_location("loralab_exercise_catalogue", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.EXERCISES


def exercises_index(exercises, tutorials: list[dict]) -> str:
    """The exercises' page: each exercise notebook with the numbers and titles of its exercises.

    ``exercises`` is the catalogue (``{key: Exercise}``, in course order: exercise N is the N-th);
    ``tutorials`` the executed notebooks, for their titles and pages.
    """
    pages = {Path(t["uri"]).name: t for t in tutorials if t["group"] == "exercises"}
    by_notebook: dict[str, list[str]] = {}
    for number, exercise in enumerate(exercises.values(), start=1):
        title = " and ".join(f"`{part}`" for part in exercise.title.split(" and "))
        by_notebook.setdefault(exercise.notebook, []).append(f"{number}. {title}")
    lines = [
        "# Exercises",
        "",
        "Each exercise asks for one or two functions, written in an exercise notebook under",
        "`tutorials/exercises/`; the check that follows them in the notebook says what passed or",
        "what differs, and what to do next. A notebook's file name starts with the number of its",
        "first exercise, and each tutorial links to the exercises that practise it.",
        "",
        "| Notebook | Exercises |",
        "| --- | --- |",
    ]
    for notebook, items in by_notebook.items():
        page = pages.get(notebook)
        name = f"[{page['title']}]({notebook})" if page else f"{notebook} (not built)"
        lines.append(f"| {name}<br>`{notebook}` | {'<br>'.join(items)} |")
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


def _public_names(package: str, default: list[str] | None = None) -> list[str]:
    """The literal ``__all__`` of ``package``; without one, ``default`` (or its re-exports)."""
    tree = ast.parse(_module_path(package).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            with contextlib.suppress(ValueError):
                return list(ast.literal_eval(node.value))
    return sorted(reexports(package)) if default is None else default


def split_package_page(name: str, summary: str) -> str:
    """A split package's page: its docstring, ``lead`` in full, then every other public name by
    group and by module, in tables linked to the module pages that document them."""
    spec = SPLIT_PACKAGES[name]
    blocks = [f"{summary}\n\n::: {name}\n    options:\n      members: false\n"]
    if spec["lead"]:
        blocks.append("## What you call first\n")
        blocks += [  # their source is on their module's page
            f"::: {name}.{obj}\n    options:\n      heading_level: 3\n      show_source: false\n"
            for obj in spec["lead"]
        ]
    rest = [n for n in _public_names(name) if n not in spec["lead"]]
    # names from private modules (or defined here) have no page elsewhere: documented here in full
    here = [n for n in rest if _private(defining_module(name, n), name)]
    rest = [n for n in rest if n not in here]
    grouped = {n for _, names in spec["groups"] for n in names}
    groups = [(title, [n for n in names if n in rest]) for title, names in spec["groups"]]
    by_module: dict[str, list[str]] = {}
    for n in rest:
        if n not in grouped:
            by_module.setdefault(defining_module(name, n), []).append(n)
    groups += [(f"From `{module}`", names) for module, names in by_module.items()]
    for title, names in groups:
        if not names:
            continue
        rows = []
        for n in names:
            module = defining_module(name, n)
            doc = _docstrings(module)[1].get(n, "") if module_exists(module) else ""
            link = f"{module}.md#{module}.{n}"
            rows.append(f"| [`{n}`]({link}) | {doc.replace('|', '/')} | `{module}` |")
        blocks.append(
            f"## {title}\n\n| Name | What it is | Documented in |\n| --- | --- | --- |\n"
            + "\n".join(rows)
            + "\n"
        )
    if here:
        blocks.append("## Also in this package\n")
        blocks += [f"::: {name}.{obj}\n    options:\n      heading_level: 3\n" for obj in here]
    return "\n".join(blocks)


def _private(module: str, package: str) -> bool:
    return module == package or any(part.startswith("_") for part in module.split("."))


def documented_at(name: str, member: str, pages: list[str]) -> str:
    """The module whose API page documents ``name.member``: a re-export from a module with a
    page of its own is documented there, once."""
    if name in SPLIT_PACKAGES:
        return defining_module(name, member)
    source = reexports(name).get(member) if _module_path(name).is_file() else None
    return source if source in pages and source != name else name


def _api_page(name: str, summary: str) -> str:
    if name in SPLIT_PACKAGES:
        return split_package_page(name, summary)
    pages = [n for n, _ in _state.get("modules", [])]
    exported = set(_public_names(name, default=[]))  # names only imported for use are no exports
    elsewhere = {
        n: m
        for n in reexports(name)
        if n in exported and (m := documented_at(name, n, pages)) != name
    }
    filters = ["!^_"] + [f"!^{n}$" for n in elsewhere]
    blocks = [
        f"::: {name}\n    options:\n      show_submodules: false\n"
        f"      filters: {json.dumps(filters)}\n"
    ]
    if elsewhere:
        rows = [
            f"| [`{n}`]({m}.md#{m}.{n}) | {_docstrings(m)[1].get(n, '')} | `{m}` |"
            for n, m in elsewhere.items()
        ]
        blocks.append(
            "## Also importable from here\n\n| Name | What it is | Documented in |\n"
            "| --- | --- | --- |\n" + "\n".join(rows) + "\n"
        )
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
    if any(t["group"] == "exercises" for t in tutorials):
        text = exercises_index(_load_catalogue(), tutorials)
        files.append(File.generated(config, EXERCISES_INDEX, content=text))
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


def readme_example(readme: Path = ROOT / "README.md") -> str:
    """The README's "Ten lines of LoRA" code block, fenced, as the README writes it."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(r"^## Ten lines of LoRA\n\n(```python\n.*?^```)\n", text, re.S | re.M)
    if match is None:
        raise ValueError(f"{readme}: no python block right under '## Ten lines of LoRA'")
    return match.group(1) + "\n"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "index.md":
        markdown = markdown.replace(README_EXAMPLE_MARKER, readme_example())
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


HEADING = re.compile(r'<h([1-6]) id="([^"]+)"[^>]*>(.*?)</h\1>', flags=re.S)


def headings_toc(content: str) -> list[dict]:
    """Table-of-contents tokens (mkdocs' ``get_toc`` input) for the headings of rendered HTML.

    A title is its heading's text with inline code kept as text, without the ``¶`` anchor link.
    """
    root: list[dict] = []
    stack: list[dict] = []
    for level, anchor, inner in HEADING.findall(content):
        inner = re.sub(r'<a class="anchor-link"[^>]*>.*?</a>', "", inner, flags=re.S)
        name = " ".join(re.sub(r"<[^>]+>", "", inner).split())
        token = {"level": int(level), "id": anchor, "name": name, "children": []}
        while stack and stack[-1]["level"] >= token["level"]:
            stack.pop()
        (stack[-1]["children"] if stack else root).append(token)
        stack.append(token)
    return root


def on_page_content(content, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return content
    page.toc = get_toc(headings_toc(content))
    content = _relink_notebook_page(content, page, files)
    name = Path(page.file.src_uri).name
    source = next(
        (t["source"] for t in _state.get("tutorials", []) if t["uri"] == page.file.src_uri), name
    )
    bar = (
        '<p class="loralab-notebook-links">'
        f'<a class="md-button" href="{html.escape(name)}" download>Download the notebook</a></p>\n'
        f'<p class="loralab-notebook-source">This page is <code>{html.escape(source)}</code>, with '
        "the outputs of a run made when this site was built.</p>\n"
    )
    # under the notebook's title, on lines of their own
    head, h1, rest = content.partition("</h1>")
    return head + h1 + bar + rest if h1 else bar + content
