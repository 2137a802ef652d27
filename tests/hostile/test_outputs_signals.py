"""SIGINT and SIGTERM in the middle of tqc commands (issue #11, process behaviour), in child processes.

12 cases. Each child is a real ``tqc`` process; to signal it at a known point deterministically, one function
on the path (``os.fsync`` while writing, ``compare.run_model`` during verification, ``calibrate``,
``shutil.copyfile`` while assembling a Triton repository, ``os.replace`` during the commit) is wrapped to
print a ``[ pause ...`` line and sleep; the test waits for that line and sends the signal. One case signals a
real ``tqc export`` (torch exporting bert-tiny) once its progress line says the export started.

Each asserts: exit 130 (SIGINT) or 143 (SIGTERM), one ``tqc: interrupted (...)`` line and no traceback, every
input byte-identical, and nothing left behind: no ``.tmp`` file, no staged output, no ``tqc-*`` temp folder
(``TMPDIR`` points into the test's folder and is snapshotted), no partial output. The commit case asserts
all-or-none instead: signals are held while staged outputs are renamed, so either every output is in place or
none is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_mlp
from tests.hostile.harness import EXIT_SIGINT, EXIT_SIGTERM, Outcome, assert_unchanged, assert_user_error, snapshot

PAUSING_TQC = """
import importlib, sys, time
module_name, attr, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
target = importlib.import_module(module_name)
original = getattr(target, attr)
calls = {"n": 0}
def paused(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 1:
        print(f"[ pause in {attr}", file=sys.stderr, flush=True)
        time.sleep(seconds)
    return original(*args, **kwargs)
setattr(target, attr, paused)
from tqc.compiler.cli.main import main
main(sys.argv[4:])
"""


@pytest.fixture
def work(tmp_path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    (tmp_path / "tmp").mkdir()
    make_mlp(w / "m.onnx")
    make_mlp(w / "m2.onnx", seed=1)
    np.savez(w / "data.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    return w


def _env(tmp_path: Path) -> dict:
    # tqc comes from the install (never from the checkout's parent folder: a clone named 'tqc' there would
    # shadow the installed package as a namespace package without __version__)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def signal_when(proc: subprocess.Popen, marker: str, signum: int, timeout: float = 240) -> Outcome:
    """Wait for a stderr line containing ``marker``, send ``signum``, collect the outcome."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            time.sleep(0.2)
            proc.send_signal(signum)
            break
        if time.monotonic() > deadline:
            break
    else:
        proc.wait(timeout=30)
        raise AssertionError(f"'{marker}' never came; stderr:\n{''.join(lines)}")
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return Outcome(proc.returncode, out, "".join(lines) + err)


def paused_run(tmp_path: Path, work: Path, module: str, attr: str, args: str, signum: int,
               seconds: float = 60) -> Outcome:
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_TQC, module, attr, str(seconds), *args.split()], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            stdin=subprocess.DEVNULL)
    return signal_when(proc, "[ pause in", signum)


def state(work: Path, tmp_path: Path) -> dict[str, str]:
    """Everything in the work folder, and what tqc could have left in TMPDIR (other libraries' files there,
    such as a session marker, are not tqc's)."""
    temp = {p: d for p, d in snapshot(tmp_path / "tmp").items()
            if Path(p).name.startswith(("tqc", ".tqc")) or p.endswith(".tmp") or Path(p) == tmp_path / "tmp"
            or "/tqc-" in p}
    return {**snapshot(work), **temp}


def assert_interrupted(outcome: Outcome, signum: int) -> None:
    code = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}[signum]
    assert_user_error(outcome, code, f"interrupted ({signal.Signals(signum).name})")


CASES = [
    # (id, module, function paused, command)
    ("write-compile-output", "os", "fsync", "compile m.onnx -p fold -o o.onnx --report r.json"),
    ("verification", "tqc.compiler.runtime.compare", "run_model",
     "compile m.onnx -p fold --verify numeric -o o.onnx --report r.json --dump-dir d"),
    ("calibration", "tqc.compiler.analysis.calibration", "calibrate", "calibrate m.onnx --data data.npz -o t.json"),
    ("triton-copy", "shutil", "copyfile", "export-triton m.onnx -o repo"),
    ("diff-polygraphy-files", "tqc.compiler.tools.diff", "save_polygraphy_files", "diff m.onnx m2.onnx --json j.json"),
]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_signal_mid_command_removes_everything(case, signum, work, tmp_path):
    _id, module, attr, args = case
    before = state(work, tmp_path)
    outcome = paused_run(tmp_path, work, module, attr, args, signum)
    assert_interrupted(outcome, signum)
    # --dump-dir files already complete may stay (they are diagnostics written as they come), nothing else
    allowed = [work / "d"] if "--dump-dir" in args else []
    after = state(work, tmp_path)
    assert_unchanged(before, after, allowed_new=allowed)
    assert not [p for p in after if p.endswith(".tmp") or "/." in p.replace(str(tmp_path), "")]


def test_signal_during_commit_is_all_or_none(work, tmp_path):
    before = state(work, tmp_path)
    outcome = paused_run(tmp_path, work, "os", "replace", "compile m.onnx -p fold -o o.onnx --report r.json",
                         signal.SIGTERM, seconds=3)
    assert_interrupted(outcome, signal.SIGTERM)
    after = state(work, tmp_path)
    written = [p for p in (work / "o.onnx", work / "r.json") if p.exists()]
    assert len(written) in (0, 2), written
    assert_unchanged(before, after, allowed_new=written)


@pytest.mark.slow
def test_sigterm_during_a_real_export_removes_the_export_folder(work, tmp_path):
    pytest.importorskip("torch")
    before = state(work, tmp_path)
    # Paused where torch's exporter is entered (the model built, the export folder made): a tiny model exports
    # in a fraction of a second, so a signal timed from the "exporting" line could land after tqc finished.
    outcome = paused_run(tmp_path, work, "torch.onnx", "export", "export bert-tiny -o bt.onnx", signal.SIGTERM)
    assert "exporting bert-tiny" in outcome.err
    assert_interrupted(outcome, signal.SIGTERM)
    after = state(work, tmp_path)
    assert_unchanged(before, after)
