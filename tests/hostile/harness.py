"""Shared harness of the hostile-input matrix: run tqc, snapshot a folder, assert the outcome.

Every case asserts the same four things:

* the exit code (``EXIT_*`` below, the documented codes);
* for errors, exactly one ``tqc: ...`` line on stderr (progress lines start with ``[``) and no traceback;
* every input byte-identical afterwards (``snapshot`` before, ``assert_unchanged`` after);
* nothing left behind (no temp files, no partial outputs): only the paths a case allows are new.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pytest

EXIT_OK = 0
EXIT_CHECK_FAILED = 1   # a verification or quality check failed
EXIT_USER = 2           # a user mistake: one line, no traceback
EXIT_INTERNAL = 3       # a tqc bug: says so and points to --debug
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        """stderr without progress lines (``[  1.2s] ...``) and without empty lines."""
        return [line for line in self.err.splitlines() if line.strip() and not line.startswith("[")]


def run_inprocess(args: Sequence[str], capsys: pytest.CaptureFixture) -> Outcome:
    """``tqc ARGS`` in this process (fast; for everything but signals and process-level behaviour)."""
    from tqc.compiler.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = info.value.code
    return Outcome(0 if code is None else int(code), captured.out, captured.err)


def run_subprocess(args: Sequence[str], cwd: Path | None = None, timeout: float = 300,
                   env: dict[str, str] | None = None) -> Outcome:
    """``python -m tqc ARGS`` in a child process."""
    proc = subprocess.run([sys.executable, "-m", "tqc", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def start_subprocess(args: Sequence[str], cwd: Path | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
    """A child ``tqc`` to signal mid-run (read its stderr to know where it is)."""
    return subprocess.Popen([sys.executable, "-m", "tqc", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            stdin=subprocess.DEVNULL)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under ``roots`` (recursively), by path; symlinks and devices by kind."""
    digests: dict[str, str] = {}
    for root in roots:
        paths = [root] if not root.is_dir() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_symlink():
                digests[str(path)] = "symlink:" + os.readlink(path)
            elif path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                digests[str(path)] = "dir"
            elif path.exists():
                digests[str(path)] = "special"
    return digests


def assert_unchanged(before: dict[str, str], after: dict[str, str], allowed_new: Iterable[Path | str] = ()) -> None:
    """Every path of ``before`` is still there, byte-identical; new paths only where ``allowed_new`` says
    (a path or a folder whose contents may be new)."""
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"inputs changed or removed: {changed}"
    allowed = [str(Path(a)) for a in allowed_new]
    new = sorted(p for p in after if p not in before
                 and not any(p == a or p.startswith(a.rstrip(os.sep) + os.sep) for a in allowed))
    assert not new, f"left behind: {new}"


def assert_user_error(outcome: Outcome, code: int = EXIT_USER, contains: str | None = None) -> None:
    """One readable line, the expected code, no traceback."""
    assert outcome.code == code, f"exit {outcome.code}, expected {code}; stderr:\n{outcome.err}"
    assert "Traceback" not in outcome.err, outcome.err
    lines = outcome.error_lines
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{outcome.err}"
    assert lines[0].startswith("tqc: "), lines[0]
    if contains is not None:
        assert contains.lower() in lines[0].lower(), f"{contains!r} not in {lines[0]!r}"


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A real small file system mounted on ``folder`` (a full disk, a read-only folder) for the block; the test
    is skipped, with the reason, where this process may not mount one (not root, no mount permission)."""
    if os.geteuid() != 0:
        pytest.skip(f"a {size} tmpfs needs root (mount -t tmpfs)")
    folder.mkdir(parents=True, exist_ok=True)
    options = f"ro,size={size}" if readonly else f"size={size}"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name: state, ppid, pgrp, ...) of every process."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (e.g. the tritonserver a ``tqc serve`` started)."""
    return [child for child, fields in _proc_stats() if int(fields[1]) == pid]


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    return [member for member, fields in _proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def break_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass bug on purpose: ``fold`` also adds 1 to a weight, so numeric verification must fail (exit 1)."""
    import onnx_graphsurgeon as gs

    from tqc.passes.fold import Fold

    original = Fold.run

    def wrong_fold(self, graph, ctx):
        result = original(self, graph, ctx)
        weight = next(t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.values.size > 4)
        weight.values = weight.values + 1.0
        return result

    monkeypatch.setattr(Fold, "run", wrong_fold)
