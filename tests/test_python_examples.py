"""The Python examples of the README and of docs/python-api.md run, against the installed package.

README.md's Python example sits between ``<!-- python-api:begin -->`` and ``<!-- python-api:end -->``;
docs/python-api.md opens with the same block (between the same markers) and continues with a longer tour.
Each document's ``python`` blocks run in order, as one script, in a fresh interpreter (this venv's python)
whose working folder is a temporary one holding what the examples read (``models/data/``), so ``import tqc``
is the installed package, never the checkout. The README's example imports only ``tqc`` and ``tqc.passes``;
the tour may also use numpy and onnx (to build arrays and models to hand to tqc).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GUIDE = REPO / "docs" / "python-api.md"
BEGIN, END = "<!-- python-api:begin -->", "<!-- python-api:end -->"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
README_MODULES = {"tqc", "tqc.passes"}
GUIDE_MODULES = README_MODULES | {"numpy", "onnx"}


def marked(text: str) -> str | None:
    """The text between the python-api markers, or None when the document has none."""
    if BEGIN not in text:
        return None
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    return text[start:end]


def python_blocks(text: str) -> list[str]:
    return [block for block in BLOCK.findall(text)]


def readme_blocks() -> list[str]:
    """The README's marked Python example (none before the README carries the markers)."""
    section = marked(README.read_text()) if README.exists() else None
    return python_blocks(section) if section is not None else []


def guide_blocks() -> list[str]:
    return python_blocks(GUIDE.read_text())


def imported_modules(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    return found


def run_script(source: str, folder: Path) -> subprocess.CompletedProcess:
    """``source`` in a fresh interpreter of this venv, in ``folder`` given a copy of ``models/data``."""
    shutil.copytree(REPO / "models" / "data", folder / "models" / "data")
    script = folder / "example.py"
    script.write_text(source)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the installed tqc, not the checkout
    return subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=1200)


def test_the_guide_opens_with_the_readme_example() -> None:
    guide = marked(GUIDE.read_text())
    assert guide is not None and len(python_blocks(guide)) == 1, "docs/python-api.md must mark its first example"
    readme = marked(README.read_text())
    if readme is not None:  # once the README carries the block, the two stay the same
        assert python_blocks(readme) == python_blocks(guide)


def test_examples_import_only_the_public_api() -> None:
    for block in readme_blocks() + python_blocks(marked(GUIDE.read_text())):
        assert imported_modules(block) <= README_MODULES, block
    for block in guide_blocks():
        assert imported_modules(block) <= GUIDE_MODULES, block


@pytest.mark.parametrize("document", ["README.md", "docs/python-api.md"])
def test_python_examples_run(document: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")  # the examples export models
    blocks = readme_blocks() if document == "README.md" else guide_blocks()
    if not blocks:
        pytest.skip(f"{document} has no marked Python example yet")
    done = run_script("\n\n".join(blocks), tmp_path)
    assert done.returncode == 0, f"{document}'s Python examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if document == "README.md" or blocks[0] == python_blocks(marked(GUIDE.read_text()))[0]:
        # the README example prints the report, then the held-out output cosine of INT8 MiniLM
        assert "fold" in done.stdout and "qdq" in done.stdout and "cos " in done.stdout
        cosine = float(next(line for line in done.stdout.splitlines() if re.fullmatch(r"0\.\d+", line.strip())))
        assert 0.99 < cosine < 1.0
        import onnx

        saved = onnx.load(str(tmp_path / "minilm.int8.onnx"))
        assert sum(node.op_type == "QuantizeLinear" for node in saved.graph.node) > 0
