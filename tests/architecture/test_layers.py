"""Imports run one way, following the data (ARCHITECTURE.md). A back edge fails here.

    core (errors, target facts, profiles)
      -> io (model files, skeletons, graph conversion, output guard)
      -> models (export recipes, the packaged MiniLM)
      -> runtime (sessions, feeds, comparison) -> analysis (calibration, sensitivity)
      -> passes -> pipeline (spec, manager, compile) -> tools (diff, bench, check, TensorRT, Triton,
         OpenVINO, serve) -> api (``tqc`` itself and ``tqc.api``: compile, diff, export from Python) -> cli

The package version lives in ``tqc.version`` (core), so that every layer may read it while ``tqc``, the public
API, sits above the tools it calls.

A module may import its own layer and the layers below it, never one above. Every import counts, also the
lazy ones inside functions. Private names (``_x``) are not imported across modules. No two modules import each
other, directly or through others (a cycle, lazy imports counted): a cycle fails with its modules and lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"tqc": REPO / "tqc", "tqc.passes": REPO / "passes", "tqc.compiler": REPO / "compiler",
         "tqc.models": REPO / "models"}

# Lowest first. The longest matching prefix decides a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("tqc.version", "tqc.compiler", "tqc.compiler.core")),
    ("io", ("tqc.compiler.io",)),
    ("models", ("tqc.models",)),
    ("runtime", ("tqc.compiler.runtime",)),
    ("analysis", ("tqc.compiler.analysis",)),
    ("passes", ("tqc.passes",)),
    ("pipeline", ("tqc.compiler.pipeline",)),
    ("tools", ("tqc.compiler.tools",)),
    ("api", ("tqc", "tqc.api")),
    ("cli", ("tqc.compiler.cli", "tqc.__main__")),
]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, module
    return rank


def modules(roots: dict[str, Path] = ROOTS) -> dict[str, Path]:
    found = {}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            if "data" in path.relative_to(folder).parts[:-1]:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path, known: set[str]):
    """(imported module, imported name or None, line) for every tqc import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tqc":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tqc":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None, node.lineno) if sub in known else (target, alias.name, node.lineno)


def back_edges(roots: dict[str, Path] = ROOTS, base: Path = REPO) -> list[str]:
    found = modules(roots)
    problems = []
    for module, path in sorted(found.items()):
        if path.name == "stub_model.py":  # runs inside Triton's python backend: imports nothing of tqc
            continue
        own = layer_of(module)
        for target, name, line in imports_of(module, path, set(found)):
            where = f"{path.relative_to(base)}:{line}"
            if layer_of(target) > own:
                problems.append(f"{where}: {module} ({LAYERS[own][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]}), a layer above")
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                problems.append(f"{where}: {module} imports the private name {target}.{name}")
    return problems


def import_graph(roots: dict[str, Path] = ROOTS, base: Path = REPO) -> dict[str, dict[str, str]]:
    """module -> {tqc module it imports: 'file:line' of the first such import}; lazy imports count."""
    found = modules(roots)
    graph: dict[str, dict[str, str]] = {}
    for module, path in sorted(found.items()):
        edges = graph.setdefault(module, {})
        for target, _, line in imports_of(module, path, set(found)):
            if target in found and target != module:
                edges.setdefault(target, f"{path.relative_to(base)}:{line}")
    return graph


def strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Groups of modules that reach each other (Tarjan), each of two or more, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, {}):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def shortest_cycle(graph: dict[str, dict[str, str]], group: list[str]) -> list[str]:
    """The shortest cycle through the group's first module, within the group (breadth first)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module]):
                if target == start:
                    return paths[module] + [start]
                if target in members and target not in paths:
                    paths[target] = paths[module] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {group}")


def cycles(roots: dict[str, Path] = ROOTS, base: Path = REPO) -> list[str]:
    """One line per group of modules importing each other: a shortest cycle, each import with its line."""
    graph = import_graph(roots, base)
    lines = []
    for group in strongly_connected(graph):
        cycle = shortest_cycle(graph, group)
        steps = " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
        others = [m for m in group if m not in cycle]
        others = f"; also in this group: {', '.join(others)}" if others else ""
        lines.append(f"import cycle: {steps} -> {cycle[0]}{others}")
    return lines


def test_imports_run_one_way() -> None:
    problems = back_edges()
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_a_back_edge_is_caught(tmp_path: Path) -> None:
    """The checker itself: an io module importing a pass (lazily, inside a function) and a private name."""
    (tmp_path / "compiler" / "io").mkdir(parents=True)
    (tmp_path / "passes").mkdir()
    for folder in ("compiler", "compiler/io", "passes"):
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "passes" / "fold.py").write_text("def _helper():\n    pass\n")
    (tmp_path / "compiler" / "io" / "model.py").write_text(
        "def load():\n    from tqc.passes.fold import _helper\n    return _helper\n")
    roots = {"tqc.passes": tmp_path / "passes", "tqc.compiler": tmp_path / "compiler"}
    problems = back_edges(roots, tmp_path)
    assert problems == [
        "compiler/io/model.py:2: tqc.compiler.io.model (io) imports tqc.passes.fold (passes), a layer above",
        "compiler/io/model.py:2: tqc.compiler.io.model imports the private name tqc.passes.fold._helper",
    ]


def test_no_import_cycle() -> None:
    problems = cycles()
    assert not problems, "modules importing each other (lazy imports count):\n" + "\n".join(problems)


def test_a_cycle_is_caught(tmp_path: Path) -> None:
    """The cycle checker itself: a registry importing two passes lazily, both importing the registry back (one
    group, its shortest cycle named with the other member); a module importing the registry is no part of it."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("")
    (tmp_path / "passes" / "registry.py").write_text(
        "def load():\n    from tqc.passes import fold, qdq\n    return fold, qdq\n")
    for name in ("fold", "qdq", "spec"):
        (tmp_path / "passes" / f"{name}.py").write_text("from tqc.passes.registry import load\n")
    roots = {"tqc.passes": tmp_path / "passes"}
    assert back_edges(roots, tmp_path) == []  # one layer: only the cycle checker sees it
    assert cycles(roots, tmp_path) == [
        "import cycle: tqc.passes.fold (passes/fold.py:1) -> tqc.passes.registry (passes/registry.py:2) -> "
        "tqc.passes.fold; also in this group: tqc.passes.qdq"]
    (tmp_path / "passes" / "fold.py").write_text("")
    assert cycles(roots, tmp_path) == [
        "import cycle: tqc.passes.qdq (passes/qdq.py:1) -> tqc.passes.registry (passes/registry.py:2) -> "
        "tqc.passes.qdq"]
    (tmp_path / "passes" / "qdq.py").write_text("")
    assert cycles(roots, tmp_path) == []
