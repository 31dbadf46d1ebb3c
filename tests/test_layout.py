"""The package's rooms and the direction of their imports, read from the code with ``ast``.

Imports run one way, from the command line down to small shared modules:

    __main__ -> cli -> sweeps -> report / export / serve -> training -> tunelab (the lazy public
    API) -> api -> config -> tasks -> evaluation -> methods / data -> models -> registry
    -> errors / runtime / results

A module may import its own room and any room below it; rooms on one floor (methods and data;
report, export and serve) may not import each other. Imports inside functions count too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"

FLOORS = [  # lowest first
    {"errors", "runtime", "results"},
    {"registry"},
    {"models"},
    {"methods", "data"},
    {"evaluation"},
    {"tasks"},
    {"config"},
    {"api"},
    {"__init__"},
    {"training"},
    {"report", "export", "serve"},
    {"sweeps"},
    {"cli"},
    {"__main__"},
]
TOP_LIMIT = 8


def room(module: str) -> str:
    """The room of 'tunelab.a.b' is 'a'; of 'tunelab' itself, '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(module: str) -> int:
    r = room(module)
    for i, rooms in enumerate(FLOORS):
        if r in rooms:
            return i
    raise AssertionError(f"{module}: room '{r}' is on no floor of tests/test_layout.py (add it)")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (top-level and inside functions)."""
    mods = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        is_pkg = p.name == "__init__.py"
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = m.split(".") if is_pkg else m.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from pkg import name`, the package
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for n in names:
                if n.split(".")[0] != root.name:
                    continue
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m:
                    graph[m].add(n)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def against_direction(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            if room(m) == room(t):
                continue
            if floor(t) >= floor(m):
                bad.append(f"{m} imports {t} ({room(t)} is not below {room(m)})")
    return bad


def test_no_import_circles():
    found = circles(import_graph(PACKAGE))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_run_one_way():
    bad = against_direction(import_graph(PACKAGE))
    assert not bad, "imports against the direction of the rooms:\n" + "\n".join(bad)


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LIMIT, f"{len(top)} modules at the top of src/tunelab: {top}"


def test_every_room_is_on_a_floor():
    for m in import_graph(PACKAGE):
        floor(m)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "tunelab"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_checks_find_a_circle_and_an_import_upwards(tmp_path):
    """The rule itself can fail: a planted circle (also through a lazy import) and an import from a
    lower room into a higher one are both named."""
    root = _tree(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/loading.py": "def f():\n    from tunelab.training.loop import run\n",
        "training/__init__.py": "",
        "training/loop.py": "from tunelab.models import loading\n",
    })
    graph = import_graph(root)
    assert circles(graph) == [["tunelab.models.loading", "tunelab.training.loop"]]
    bad = against_direction(graph)
    assert bad == ["tunelab.models.loading imports tunelab.training.loop (training is not below models)"]


@pytest.mark.parametrize("rel, text, target", [
    ("data/readers.py", "from ..models import loading\n", "tunelab.models.loading"),
    ("data/readers.py", "from tunelab.models.loading import load\n", "tunelab.models.loading"),
    ("data/readers.py", "import tunelab.models.loading\n", "tunelab.models.loading"),
    ("data/readers.py", "from tunelab import attach\n", "tunelab"),
])
def test_every_import_form_is_read(tmp_path, rel, text, target):
    root = _tree(tmp_path, {"__init__.py": "", "models/__init__.py": "", "models/loading.py": "",
                            "data/__init__.py": "", rel: text})
    assert target in import_graph(root)["tunelab.data.readers"]
