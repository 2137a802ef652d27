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
lazy ones inside functions. Private names (``_x``) are not imported across modules.
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
