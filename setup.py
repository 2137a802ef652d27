"""Package discovery for tqc's one-namespace layout (metadata and dependencies live in setup.cfg).

The top-level folders install under one import name::

    tqc/       -> tqc
    passes/    -> tqc.passes      passes/fuse/ -> tqc.passes.fuse, ...
    compiler/  -> tqc.compiler
    models/    -> tqc.models

setup.cfg cannot express "every subpackage of a remapped folder" (``find:`` knows one root and no renaming), so
the subpackages are found here, with ``find_packages`` on each folder, and every file under a package's
``data/`` folder ships as package data. A new subpackage or data file needs no edit here.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
ROOTS = {"tqc": "tqc", "tqc.passes": "passes", "tqc.compiler": "compiler", "tqc.models": "models"}


def packages() -> list[str]:
    names = []
    for package, folder in ROOTS.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(str(HERE / folder))]
    return sorted(names)


def folder_of(package: str) -> Path:
    """tqc.passes.fuse -> passes/fuse: the longest mapped prefix, then one folder per name part."""
    root = max((r for r in ROOTS if package == r or package.startswith(r + ".")), key=len)
    rest = package[len(root):].lstrip(".")
    return HERE / ROOTS[root] / Path(*rest.split(".")) if rest else HERE / ROOTS[root]


def data_files_of(package: str) -> list[str]:
    """Every file under the package's ``data/`` folder (recursively), relative to the package."""
    folder = folder_of(package)
    data = folder / "data"
    if not data.is_dir():
        return []
    return sorted(path.relative_to(folder).as_posix() for path in data.rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc")


setup(
    packages=packages(),
    package_dir=dict(ROOTS),
    package_data={name: files for name in packages() if (files := data_files_of(name))},
)
