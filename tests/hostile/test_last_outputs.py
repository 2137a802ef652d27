"""The last hostile output cases of issue #20, and the exit rule of ``tqc serve``.

* ``--dump-dir`` on a full disk (a real 64 kB tmpfs, root only): a new dump folder is removed whole, an existing
  one keeps exactly the files it had; no ``-o`` output either. A successful run keeps its dump, and a failed
  verification keeps it too (it is the evidence), each file a real stage.
* the TensorRT timing cache is an output like the plan and its ``.plan.json``: refused before any work where
  it would write over the model or the plan, is a folder or a device; staged by the output guard (moved into
  place with the other outputs on success, never on failure, its new folder removed again). TensorRT is not
  installed here: nothing of TensorRT is faked, the tests drive the same staging functions the build calls.
* ``tqc serve``: SIGTERM or SIGINT while the server is still starting exits 143 or 130 and leaves no process
  and no temporary folder (a signal to a serving server is its normal end: exit 0, tested in
  ``tests/compiler/tools/serve/test_serve.py``).
"""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import onnx
import pytest

from tests.conftest import make_mlp
from tests.hostile.models import make_token_model
from tests.hostile.harness import (EXIT_CHECK_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, assert_unchanged,
                                   assert_user_error, break_fold, child_pids, group_pids, run_inprocess, snapshot,
                                   start_subprocess, tmpfs)


# ---------------------------------------------------------------- --dump-dir: all or nothing

@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 64 kB tmpfs: room for a small model's first stages, not for a 100 kB one's."""
    with tmpfs(tmp_path / "disk", "64k") as folder:
        yield folder


def test_full_disk_removes_a_new_dump_folder(tmp_path, small_disk, capsys):
    make_mlp(tmp_path / "m.onnx", hidden=2000)  # 96 kB: its first dumped stage does not fit
    before = snapshot(tmp_path / "m.onnx")
    outcome = run_inprocess(["-q", "compile", tmp_path / "m.onnx", "-p", "fold", "-o", tmp_path / "o.onnx",
                             "--dump-dir", small_disk / "runs" / "dump"], capsys)
    assert_user_error(outcome, contains="No space left on device")
    assert list(small_disk.iterdir()) == [], "the dump folder (or its parent) was left behind"
    assert not (tmp_path / "o.onnx").exists()
    assert_unchanged(before, snapshot(tmp_path / "m.onnx"))


def test_full_disk_keeps_only_what_an_existing_dump_folder_had(tmp_path, small_disk, capsys):
    make_mlp(tmp_path / "m.onnx", hidden=2000)
    (small_disk / "notes.txt").write_text("the user's own file\n")
    (small_disk / "inputs.json").write_text("[]\n")  # a name tqc dumps: an older dump, kept as it was
    before = snapshot(small_disk)
    outcome = run_inprocess(["-q", "compile", tmp_path / "m.onnx", "-p", "fold", "-o", tmp_path / "o.onnx",
                             "--dump-dir", small_disk], capsys)
    assert_user_error(outcome, contains="No space left on device")
    assert_unchanged(before, snapshot(small_disk))
    assert sorted(p.name for p in small_disk.iterdir()) == ["inputs.json", "notes.txt"]


def test_dump_is_kept_on_success_and_on_a_failed_check(tmp_path, capsys, monkeypatch):
    make_mlp(tmp_path / "m.onnx")
    dump = tmp_path / "ok" / "dump"
    outcome = run_inprocess(["-q", "compile", tmp_path / "m.onnx", "-p", "fold", "-o", tmp_path / "o.onnx",
                             "--dump-dir", dump], capsys)
    assert outcome.code == EXIT_OK, outcome.err
    stage = onnx.load(str(dump / "01_fold.onnx"))
    assert len(stage.graph.node) < len(onnx.load(str(tmp_path / "m.onnx")).graph.node)  # the folded stage
    break_fold(monkeypatch)  # a pass that changes the answer: the failed check keeps the dump as evidence
    dump = tmp_path / "failed" / "dump"
    outcome = run_inprocess(["-q", "compile", tmp_path / "m.onnx", "-p", "fold", "-o", tmp_path / "o2.onnx",
                             "--dump-dir", dump], capsys)
    assert outcome.code == EXIT_CHECK_FAILED, outcome.err
    assert (dump / "01_fold.onnx").is_file() and (dump / "inputs.json").is_file()
    assert not (tmp_path / "o2.onnx").exists()


# ---------------------------------------------------------------- the TensorRT timing cache

@pytest.mark.parametrize("where", ["model", "plan", "folder", "device"])
def test_timing_cache_that_would_clobber_is_refused_before_work(where, tmp_path, capsys):
    make_mlp(tmp_path / "m.onnx")
    cache = {"model": tmp_path / "m.onnx", "plan": tmp_path / "m.plan", "folder": tmp_path,
             "device": Path("/dev/null")}[where]
    words = {"model": "never writes over a file it reads", "plan": "are the same file",
             "folder": "is a directory", "device": "character device"}[where]
    before = snapshot(tmp_path)
    outcome = run_inprocess(["-q", "build", tmp_path / "m.onnx", "-o", tmp_path / "m.plan", "--timing-cache",
                             cache], capsys)
    assert_user_error(outcome, contains=words)  # before the TensorRT check: one line, whatever is installed
    assert "timing cache" in outcome.error_lines[0]
    assert_unchanged(before, snapshot(tmp_path))


def test_timing_cache_is_staged_with_the_plan(tmp_path):
    """What ``build_plan`` does after TensorRT built the engine, with the bytes it would write: the three
    outputs wait for the commit; a failure leaves none of them, nor the cache's new folder."""
    from tqc.compiler.io.model import write_bytes_atomic, write_text_atomic
    from tqc.compiler.io.output_guard import cleanup_temps, command
    from tqc.compiler.tools.trt import declare_plan_outputs, write_timing_cache

    plan, cache = tmp_path / "m.plan", tmp_path / "cache" / "sub" / "trt.cache"
    with pytest.raises(RuntimeError, match="after the cache"):
        with command("build") as guard:
            declare_plan_outputs(guard, plan, cache)
            write_bytes_atomic(b"plan", plan)
            write_timing_cache(b"cache v2", cache)
            assert not plan.exists() and not cache.exists()  # staged
            raise RuntimeError("a failure after the cache was written")
    cleanup_temps()  # what the CLI does when a command ends with an error
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))

    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"cache v1")
    with command("build") as guard:
        declare_plan_outputs(guard, plan, cache)
        old = cache.read_bytes()  # what the build reads first
        write_bytes_atomic(b"plan", plan)
        write_timing_cache(old + b" v2", cache)
        write_text_atomic("{}\n", Path(str(plan) + ".json"))
        assert cache.read_bytes() == b"cache v1"  # unchanged until the commit
    assert cache.read_bytes() == b"cache v1 v2" and plan.read_bytes() == b"plan"
    assert sorted(p.name for p in cache.parent.iterdir()) == ["trt.cache"]  # no temp file beside it


# ---------------------------------------------------------------- serve: a signal while starting

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)])
def test_serve_interrupted_while_starting_exits_128_plus_signal(sig, code, tmp_path):
    from tqc.compiler.core.errors import TqcError
    from tqc.compiler.tools.serve.triton_dist import find_triton

    try:
        find_triton()
    except TqcError as exc:
        pytest.skip(f"tritonserver is not installed here: {exc}")
    make_token_model(tmp_path / "m.onnx")
    leftovers = set(Path(tempfile.gettempdir()).glob("tqc-serve-*"))
    proc = start_subprocess(["serve", tmp_path / "m.onnx", "--endpoints", "raw", "--port", "0", "--grpc-port", "0",
                             "--metrics-port", "0"])
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or "starting tritonserver" in line:
            break
    assert seen and "starting tritonserver" in seen[-1], "".join(seen)
    proc.send_signal(sig)  # at once: the server needs about a second more to be ready
    servers = child_pids(proc.pid)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err)
    assert "serving on" not in out
    assert f"tqc: interrupted ({signal.Signals(sig).name})" in err and "Traceback" not in err
    for pid in servers:  # tritonserver runs in its own session: its group is itself and its python stubs
        assert group_pids(pid) == [], f"tritonserver {pid} or its stubs outlived tqc serve"
    assert set(Path(tempfile.gettempdir()).glob("tqc-serve-*")) <= leftovers, "a temporary repository was left"


def test_serve_help_states_the_exit_rule(capsys):
    text = " ".join(run_inprocess(["serve", "--help"], capsys).out.split())
    assert "A signal stops a serving server cleanly with exit 0" in text
    assert "130 (SIGINT) or 143 (SIGTERM)" in text
