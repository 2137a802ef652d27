"""The built wheel ships every module and data file, installs on its own and runs ``tqc``.

The expected contents are read from the source tree (every ``.py`` under ``tqc/``, ``passes/``, ``compiler/``,
``models/`` and every file under a package's ``data/`` folder), so a new subpackage or data file that
setup.py failed to pick up fails here. The wheel is installed into a target folder and run with ``python -S``
and an explicit path: neither the source tree nor the editable install of the test environment can stand in
for a file the wheel lacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tqc import __version__

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"tqc": "tqc", "passes": "tqc/passes", "compiler": "tqc/compiler", "models": "tqc/models"}
SKIP_PARTS = {"__pycache__", ".pytest_cache"}


def expected_files() -> set[str]:
    """Wheel paths of every module and data file in the source tree."""
    expected = set()
    for folder, installed in FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if not path.is_file() or SKIP_PARTS & set(path.parts) or path.suffix == ".pyc":
                continue
            relative = path.relative_to(REPO / folder)
            if path.suffix == ".py" or "data" in relative.parts[:-1]:
                expected.add(f"{installed}/{relative.as_posix()}")
    return expected


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    # A copy: the build writes build/ and *.egg-info, and a stale build/ in the tree could hide a missing file.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "tests", "bench", "*.onnx", "*.onnx.data"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(work / "dist"), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list((work / "dist").glob("tqc-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_files()
    assert {"tqc/passes/fuse/__init__.py", "tqc/models/data/calib_sentences.txt",
            "tqc/compiler/core/data/trt10_onnx_ops.json"} <= expected  # the derivation itself sees the tree
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert wheel.name.startswith(f"tqc-{__version__}-")
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "tqc = tqc.compiler.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_tqc(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # python -S: no site-packages processing, so the test environment's editable finder (.pth) is not loaded;
    # the dependencies come from the environment's site-packages folders, named explicitly after the target.
    site_dirs = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    site_dirs |= {p for p in sys.path if p.endswith("site-packages")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sorted(site_dirs)])}
    env.pop("PYTHONHOME", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=tmp_path)

    probe = run("-c", "import tqc, tqc.passes.fuse, tqc.models.export\n"
                      "from importlib import resources\n"
                      "print(tqc.__file__)\n"
                      "print(resources.files('tqc.models').joinpath('data/calib_sentences.txt').is_file())")
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, has_sentences = probe.stdout.split()
    assert Path(where).is_relative_to(target), where
    assert has_sentences == "True"
    script = target / "bin" / "tqc"  # the console script pip wrote from the wheel's entry point
    version = run(str(script), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"tqc, version {__version__}"
    passes = run(str(script), "passes")
    assert passes.returncode == 0, passes.stderr[-2000:]
    listed = {line.split()[0] for line in passes.stdout.splitlines() if line and not line.startswith(" ")}
    assert {"fold", "fuse", "fp16", "qdq"} <= listed
