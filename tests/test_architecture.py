"""The structure docs/architecture.md promises: every import follows its layer table (a module imports from its
own layer or the ones below), no import circle among lsms's modules (function-level imports included), and no
function longer than 120 lines except those the document names with its reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lsms

SRC = Path(lsms.__file__).parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MAX_LINES = 120


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the lsms modules it imports anywhere in its file (module, class or function level). Importing
    ``lsms.a.b`` also runs ``lsms.a``'s ``__init__``: an edge to it too, except to the module's own packages."""
    modules = _modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "lsms"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                if base.split(".")[0] == "lsms":
                    found |= {owner(f"{base}.{a.name}") for a in node.names}
        deps = {d for d in found if d is not None}
        deps |= {".".join(d.split(".")[:k]) for d in deps for k in range(2, d.count(".") + 1)}
        graph[name] = deps - {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    graph = import_graph()
    assert "lsms.export_metadata" in graph["lsms.backends"]  # the walk sees function-level imports
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions() -> dict[str, int]:
    out = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    out[f"{name}.{node.name}"] = lines
    return out


def _layers() -> list[list[str]]:
    """The layer table of docs/architecture.md, top to bottom: each row's modules as dotted names."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) > 3 and cells[1].strip() not in ("layer", "---") and "`" in cells[2]:
            names = re.findall(r"`([\w/.]+)`", cells[2])
            rows.append(["lsms." + n.removesuffix(".py").strip("/").replace("/", ".") for n in names])
    return rows


def test_imports_follow_the_layer_table():
    rows = _layers()
    assert rows and any("lsms.backends" in r for r in rows) and any("lsms.serve" in r for r in rows)

    def layer(module: str) -> int | None:
        found = [(len(p), i) for i, row in enumerate(rows) for p in row if module == p or module.startswith(p + ".")]
        return max(found)[1] if found else None

    graph = import_graph()
    unplaced = sorted(m for m in graph if layer(m) is None and m not in ("lsms", "lsms.__main__"))
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if layer(m) is not None and layer(d) is not None and layer(d) < layer(m))
    assert unplaced == [] and upward == []


def test_no_function_over_120_lines_unless_the_architecture_doc_says_why():
    # the document's "Long functions" list: one "- `module.function`: why" line each
    section = DOC.read_text(encoding="utf-8").split("## Long functions", 1)
    excused = set(re.findall(r"^- `([\w.]+)`: \S", section[1], re.M)) if len(section) == 2 else set()
    long = _long_functions()
    assert sorted(set(long) - excused) == [], long
    assert sorted(excused - set(long)) == [], "docs/architecture.md excuses functions that are short now"
