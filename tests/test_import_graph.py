"""loralab's import graph, read from the source with ``ast``: layered, without cycles.

Every import counts, also one inside a function (a lazy import is still a dependency). A "part"
is a top-level module or package of loralab (``loralab.nn``, ``loralab.lora``, ...); the package
``loralab/__init__.py`` itself is the facade that re-exports them and is left out.

0.1's import paths (``loralab.nn.LoRALinear``, ``loralab.lora.adapter``, ...) are resolved by name
in ``loralab/_deprecated.py``, which ``ast`` cannot see: its tables are read instead, and each edge
is counted for the module that owns the old name (``loralab.nn`` for ``loralab.nn.LoRALinear``).
"""

import ast
import re
from pathlib import Path

from loralab._deprecated import MOVED_MODULES, MOVED_NAMES

ROOT = Path(__file__).resolve().parents[1] / "loralab"
CORE = ("loralab.tensor", "loralab.functional", "loralab.nn", "loralab.optim", "loralab.lora")
FACADE = ("loralab", "loralab._deprecated")  # left out as parts: they only re-export and alias
# The only upward edges: a student's 0.1 code reaching the names that moved up into loralab.lora,
# by name, only when it touches them (with a DeprecationWarning). Removed in 0.3.
DEPRECATED_EDGES = {("loralab.nn", "loralab.lora"), ("loralab.functional", "loralab.lora")}


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """The loralab modules that ``path`` imports anywhere (``from loralab import nn`` -> loralab.nn)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loralab"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                )
                base = base.rstrip(".")
            if not base.startswith("loralab"):
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # a submodule, if it is one
    return found


def deprecated_imports():
    """owner module -> the modules its deprecated 0.1 names are looked up in, by name."""
    found: dict[str, set[str]] = {}
    for owner, names in MOVED_NAMES.items():
        found.setdefault(owner, set()).update(new.rpartition(".")[0] for new in names.values())
    for old, new in MOVED_MODULES.items():
        found.setdefault(old.rpartition(".")[0], set()).add(new)
    return found


def graph():
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    for owner, targets in deprecated_imports().items():
        edges[owner] |= {t for t in targets if t in modules and t != owner}
    return edges


def part(name):
    return ".".join(name.split(".")[:2])


def find_cycle(edges):
    """A cycle as a list of nodes, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_imports():
    edges = graph()
    assert "loralab.lora.linear_layer" in edges["loralab.lora"]
    assert "loralab.nn.module" in edges["loralab.lora.linear_layer"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_cycle_between_loralabs_parts():
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        if name in FACADE:
            continue
        for target in targets:
            edge = (part(name), part(target))
            if target not in FACADE and edge[0] != edge[1] and edge not in DEPRECATED_EDGES:
                edges.setdefault(part(name), set()).add(part(target))
    assert find_cycle(edges) is None, f"import cycle between parts: {find_cycle(edges)}"


def test_the_deprecated_paths_reach_upward_only_where_listed():
    # A shim that reaches only where its module already imports (loralab.demo's old names, now in
    # loralab.models.digits) adds no edge.
    imported = {
        (part(name), part(target))
        for name, path in ((module_name(p), p) for p in ROOT.rglob("*.py"))
        for target in imports_of(path)
    }
    upward = {
        (part(owner), part(target))
        for owner, targets in deprecated_imports().items()
        for target in targets
        if part(owner) != part(target) and (part(owner), part(target)) not in imported
    }
    assert upward == DEPRECATED_EDGES
    assert "loralab.lora" in graph()["loralab.nn"]  # the graph sees them (and the tests allow them)


def test_no_cycle_inside_the_lora_package():
    edges = {
        name: {t for t in targets if t.startswith("loralab.lora.")}
        for name, targets in graph().items()
        if name.startswith("loralab.lora.")
    }
    assert find_cycle(edges) is None, find_cycle(edges)


def test_the_core_never_imports_the_torch_twin_not_even_lazily():
    offenders = {
        name: sorted(t for t in targets if t.startswith("loralab.torch"))
        for name, targets in graph().items()
        if name.startswith(CORE)
    }
    assert {n: t for n, t in offenders.items() if t} == {}


def test_the_engine_does_not_import_lora():
    engine = ("loralab.tensor", "loralab.functional", "loralab.nn", "loralab.optim")
    offenders = {
        name: sorted(
            t
            for t in targets
            if t.startswith("loralab.lora") and (part(name), part(t)) not in DEPRECATED_EDGES
        )
        for name, targets in graph().items()
        if name.startswith(engine)
    }
    assert {n: t for n, t in offenders.items() if t} == {}


def test_lora_ops_imports_nothing_of_loralab():
    assert graph()["loralab.lora.ops"] == set()


def test_contributings_map_names_every_module_of_the_lora_package():
    """CONTRIBUTING.md's map of the house has one line per file of loralab/lora/ (renames included)."""
    text = (ROOT.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    mapped = set(re.findall(r"^    (\w+\.py)\s", text, flags=re.MULTILINE))
    files = {p.name for p in (ROOT / "lora").glob("*.py")} - {"__init__.py"}
    assert files <= mapped, f"not in CONTRIBUTING's map: {sorted(files - mapped)}"
