"""Passes ask a ``Target`` what it does, never which one it is (ARCHITECTURE.md, "A new target").

A comparison of a target with a target's name (``target == "trt"``, ``!=``, ``in ("ort-cpu", ...)``: one side
names something ``target``) under ``passes/`` or ``compiler/`` fails here, with its line; the facts live in
``compiler/core/target.py``. Other names that happen to be spelled alike (``budget_runtime == "openvino"``, a
runtime) are not targets.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tqc.compiler.core.target import TARGETS

REPO = Path(__file__).resolve().parents[2]


def names_compared(node: ast.Compare) -> list[str]:
    """The target names a comparison of a target tests against (either side; a tuple, list or set of them too)."""
    operands = [node.left, *node.comparators]
    if not any("target" in ast.unparse(operand).lower() for operand in operands):
        return []
    found = []
    for operand in operands:
        items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
        found += [i.value for i in items if isinstance(i, ast.Constant) and i.value in TARGETS]
    return found


def target_comparisons(folder: Path, base: Path = REPO) -> list[str]:
    problems = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Compare) and names_compared(node):
                problems.append(f"{path.relative_to(base)}:{node.lineno}: compares with target "
                                f"{', '.join(repr(n) for n in names_compared(node))}")
    return problems


def test_passes_and_compiler_ask_facts_not_names() -> None:
    problems = target_comparisons(REPO / "passes") + target_comparisons(REPO / "compiler")
    assert not problems, "target names compared (ask a Target fact instead):\n" + "\n".join(problems)


def test_a_name_comparison_is_caught(tmp_path: Path) -> None:
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "fuse.py").write_text(
        "def form(target, mask):\n"
        "    if target.contrib_ops and mask == 'raw':\n"       # a fact, and a non-target string: fine
        "        return 1\n"
        "    if runtime == 'openvino':\n"                        # a runtime spelled like a target: fine
        "        return 0\n"
        "    if target == 'ort-cuda':\n"
        "        return 2\n"
        "    return 3 if str(target) in ('trt', 'openvino') else 4\n")
    assert target_comparisons(tmp_path / "passes", tmp_path) == [
        "passes/fuse.py:6: compares with target 'ort-cuda'",
        "passes/fuse.py:8: compares with target 'trt', 'openvino'",
    ]
