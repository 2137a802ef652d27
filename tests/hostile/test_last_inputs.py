"""The last hostile inputs of issue #20's held-out matrix, and the small CLI truths found with them.

Each user mistake is exit 2 with one ``tqc: error: ...`` line, no traceback, every input byte-identical and
nothing left behind (``tests/hostile/harness.py``); data that is accepted but odd gets a ``tqc: note: ...``.

* a string model input under ``--verify numeric`` (compile; diff draws inputs the same way);
* an external-data tensor declaring [1e6, 1e6] (3.6 TiB), for the lean loader (compile, calibrate) and the full
  one (inspect, check, diff): refused before anything is allocated;
* ``tqc export`` of a folder whose ``pytorch_model.bin`` is a malicious pickle (plain and in torch's zip
  format): refused in one line, and the code in it never ran (its marker file does not exist);
* ``--max-length`` beyond the model's positions: refused (compile, calibrate); at the positions accepted;
* a calibration ``.txt`` of random binary bytes, of NUL bytes, of Latin-1: refused; one with control characters
  accepted with a note (shown with ``-q`` too);
* external data referenced from subgraph bodies (If branches): ``..``, absolute, a symlink out of the folder, a
  short file, dims beyond memory - refused by every loading command; valid ones compiled and run by ORT with
  the source's outputs;
* ``bench a.onnx b.xml`` refuses the IR before measuring anything;
* an OpenVINO IR ``.xml`` (or its ``.bin``) given to a command that loads ONNX: one line saying what it is;
* ``serve --provider openvino`` is no choice any more (OpenVINO serving is issue #19's work).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import make_mlp
from tests.hostile.harness import EXIT_OK, assert_unchanged, assert_user_error, run_inprocess, snapshot


def refused(capsys, args, root: Path, *words: str) -> str:
    """``tqc -q ARGS``: exit 2, one error line holding every one of ``words``, nothing under ``root`` changed."""
    before = snapshot(root)
    outcome = run_inprocess(["-q", *map(str, args)], capsys)
    assert_user_error(outcome)
    line = outcome.error_lines[0]
    assert line.startswith("tqc: error: "), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    assert "internal" not in line
    assert_unchanged(before, snapshot(root))
    return line


# ---------------------------------------------------------------- a string input

def _string_model(path: Path) -> Path:
    """A float path and a string path: s[batch] -> Identity -> t, x[batch, 4] -> Relu -> y."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"], name="ident"), helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_string_input_under_numeric_verification_is_one_line(tmp_path, capsys):
    model = _string_model(tmp_path / "s.onnx")
    refused(capsys, ["compile", model, "-p", "fold", "--verify", "numeric", "-o", tmp_path / "o.onnx"], tmp_path,
            "input 's'", "strings", "--verify structure")
    refused(capsys, ["diff", model, model], tmp_path, "input 's'", "strings", "--data")
    # what the line suggests works: the structure-verified output computes what the source does
    outcome = run_inprocess(["-q", "compile", model, "-p", "fold", "--verify", "structure", "-o",
                             tmp_path / "o.onnx"], capsys)
    assert outcome.code == EXIT_OK, outcome.err
    import onnxruntime as ort

    feed = {"s": np.array(["a", "bc"], dtype=object), "x": np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], np.float32)}
    want = ort.InferenceSession(str(model)).run(None, feed)
    got = ort.InferenceSession(str(tmp_path / "o.onnx")).run(None, feed)
    assert list(got[0]) == list(want[0]) == ["a", "bc"]
    np.testing.assert_array_equal(got[1], want[1])


# ---------------------------------------------------------------- dims beyond memory in external data

def _huge_external(folder: Path) -> Path:
    """The MLP with its weights in ``m.data``; 'wa' declares [1e6, 1e6] float32 (3.64 TiB), no length."""
    path = folder / "m.onnx"
    onnx.save(make_mlp(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    _declare_huge(next(t for t in model.graph.initializer if t.name == "wa"))
    path.write_bytes(model.SerializeToString())
    return path


def _declare_huge(tensor: onnx.TensorProto) -> None:
    """An external tensor that declares [1e6, 1e6] (3.64 TiB in float32) and no length of its own."""
    del tensor.dims[:]
    tensor.dims.extend([10**6, 10**6])
    for entry in list(tensor.external_data):
        if entry.key == "length":
            tensor.external_data.remove(entry)


@pytest.mark.parametrize("cmd", ["compile", "calibrate", "inspect", "check", "diff"])
def test_external_tensor_beyond_memory_is_refused_before_allocation(cmd, tmp_path, capsys):
    model = _huge_external(tmp_path)
    make_mlp(tmp_path / "good.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    args = {"compile": ["compile", model, "-p", "fold", "-o", tmp_path / "o.onnx"],
            "calibrate": ["calibrate", model, "--data", tmp_path / "x.npz", "-o", tmp_path / "t.json"],
            "inspect": ["inspect", model], "check": ["check", model], "diff": ["diff", model, tmp_path / "good.onnx"]}
    refused(capsys, args[cmd], tmp_path, "input model is invalid", "initializer 'wa'", "[1000000, 1000000]",
            "3.64 TiB", "memory")


# ---------------------------------------------------------------- a malicious pickle as weights

class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a malicious pytorch_model.bin does, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _bert_config() -> str:
    import json

    return json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8,
                       "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16,
                       "vocab_size": 50, "max_position_embeddings": 16, "type_vocab_size": 2})


@pytest.mark.parametrize("form", ["pickle", "torch-zip"])
def test_export_of_a_malicious_pickle_is_refused_and_never_runs(form, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "config.json").write_text(_bert_config())
    payload = {"embeddings.word_embeddings.weight": _Payload(marker)}
    if form == "pickle":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, folder / "pytorch_model.bin")
    assert not marker.exists()  # pickling ran nothing
    # the payload is live: an unrestricted unpickler would run it (checked on a copy, in this test only)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "LIVE")))
    assert (tmp_path / "LIVE").exists()
    (tmp_path / "LIVE").unlink()
    line = refused(capsys, ["export", folder, "-o", tmp_path / "e.onnx"], tmp_path, "pytorch_model.bin",
                   "not a plain tensor file", "refused to unpickle")
    assert "bug" not in line
    assert not marker.exists(), "the pickle's code ran"


# ---------------------------------------------------------------- calibration text

@pytest.fixture(scope="module")
def odd_texts(text_world) -> Path:
    """``text_world`` (tests/hostile/conftest.py) with odd and broken text files beside its sentences."""
    folder = text_world
    (folder / "random.txt").write_bytes(  # no NUL among them: refused as not UTF-8
        np.random.default_rng(0).integers(1, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "nul.txt").write_bytes(b"\0" * 1024)
    (folder / "nul_inside.txt").write_bytes(b"a sentence\nanother\0one\n")
    (folder / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (folder / "control.txt").write_text("a bell \x07 in a sentence\nplain text\nescape \x1b[31m red\n")
    return folder


@pytest.mark.parametrize("cmd", ["compile", "calibrate"])
def test_max_length_beyond_the_positions_is_refused(cmd, text_world, capsys):
    out = text_world / ("o.onnx" if cmd == "compile" else "t.json")
    args = (["compile", text_world / "tok30k.onnx", "-p", "fold,qdq", "--target", "ort-cpu", "-o", out, "--calib"]
            if cmd == "compile" else ["calibrate", text_world / "tok30k.onnx", "-o", out, "--data"])
    refused(capsys, [*args, text_world / "long.txt", "--tokenizer", "minilm", "--max-length", "1000"], text_world,
            "--max-length 1000", "16 positions", "at most 16")
    # at the positions: accepted, nothing said, 16-token sequences
    before = snapshot(text_world)
    try:
        outcome = run_inprocess(["-q", *map(str, args), str(text_world / "long.txt"), "--tokenizer", "minilm",
                                 "--max-length", "16"], capsys)
        assert outcome.code == EXIT_OK, outcome.err
        assert outcome.err == "", outcome.err
        assert_unchanged(before, snapshot(text_world), [out])
    finally:
        out.unlink(missing_ok=True)


def test_max_length_help_states_the_rule(capsys):
    for cmd in ("compile", "calibrate"):
        outcome = run_inprocess([cmd, "--help"], capsys)
        text = " ".join(outcome.out.split())
        assert "default: 128, or the model's positions when fewer" in text
        assert "beyond the model's positions is refused" in text


@pytest.mark.parametrize("name, words", [("random.txt", ("not UTF-8 text", "offset")),
                                         ("nul.txt", ("NUL bytes", "not a text file")),
                                         ("nul_inside.txt", ("NUL bytes", "offset 18")),
                                         ("latin1.txt", ("not UTF-8 text", "0xe9"))])
@pytest.mark.parametrize("cmd", ["compile", "calibrate", "diff"])
def test_calibration_text_that_is_not_text_is_refused(cmd, name, words, odd_texts, capsys):
    text_world = odd_texts
    model, data = text_world / "tok30k.onnx", text_world / name
    args = {"compile": ["compile", model, "-p", "fold,qdq", "-o", text_world / "o.onnx", "--calib", data],
            "calibrate": ["calibrate", model, "--data", data, "-o", text_world / "t.json"],
            "diff": ["diff", model, model, "--data", data]}[cmd]
    refused(capsys, [*args, "--tokenizer", "minilm"], text_world, f"data '{data}'", *words)


def test_control_characters_are_noted_even_with_quiet(odd_texts, capsys):
    text_world = odd_texts
    out = text_world / "t.json"
    try:
        before = snapshot(text_world)
        outcome = run_inprocess(["-q", "calibrate", text_world / "tok30k.onnx", "--data", text_world / "control.txt",
                                 "--tokenizer", "minilm", "-o", out], capsys)
        assert outcome.code == EXIT_OK, outcome.err
        notes = [line for line in outcome.err.splitlines() if line.startswith("tqc: note: ")]
        assert len(notes) == 1, outcome.err  # once, though calibration reads the data twice
        assert "2 of 3 sentences hold control characters (the first is sentence 1)" in notes[0]
        assert_unchanged(before, snapshot(text_world), [out])
        import json

        assert json.loads(out.read_text())["samples"] == 3
    finally:
        out.unlink(missing_ok=True)


# ---------------------------------------------------------------- external data in subgraph bodies

def _branch(name: str, value: float) -> onnx.GraphProto:
    constant = numpy_helper.from_array(np.full((4,), value, np.float32), f"{name}_c")
    return helper.make_graph([helper.make_node("Identity", [f"{name}_c"], [f"{name}_out"], name=f"{name}_id")],
                             name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])],
                             initializer=[constant])


def _subgraph_model(folder: Path, location=None, truncate: int | None = None) -> Path:
    """y = x + If(cond, then: [2]*4, else: [-3]*4), each branch's constant in ``m.data`` (``location`` may
    rewrite where the then-branch's points)."""
    nodes = [helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=_branch("then", 2.0),
                              else_branch=_branch("else", -3.0)),
             helper.make_node("Add", ["x", "branch"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    then = next(a for a in model.graph.node[0].attribute if a.name == "then_branch").g.initializer[0]
    assert then.data_location == TensorProto.EXTERNAL  # onnx stored the subgraph's tensor outside
    if location is not None:
        next(e for e in then.external_data if e.key == "location").value = location
        path.write_bytes(model.SerializeToString())
    if truncate is not None:
        data = folder / "m.data"
        data.write_bytes(data.read_bytes()[:truncate])
    return path


def _subgraph_case(kind: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    outside = folder.parent / "outside.bin"
    outside.write_bytes(np.full(4, 7, np.float32).tobytes())
    if kind == "parent":
        return _subgraph_model(folder, "../outside.bin"), ("outside the model's folder",)
    if kind == "absolute":
        return _subgraph_model(folder, str(outside)), ("absolute path",)
    if kind == "symlink":
        os.symlink(outside, folder / "link.bin")
        return _subgraph_model(folder, "link.bin"), ("outside the model's folder",)
    if kind == "short":
        return _subgraph_model(folder, truncate=20), ("needs bytes",)
    if kind == "huge":
        path = _subgraph_model(folder)
        model = onnx.load(str(path), load_external_data=False)
        _declare_huge(next(a for a in model.graph.node[0].attribute if a.name == "then_branch").g.initializer[0])
        path.write_bytes(model.SerializeToString())
        return path, ("memory",)
    raise ValueError(kind)  # pragma: no cover


@pytest.mark.parametrize("cmd", ["compile", "calibrate", "inspect", "check", "diff", "bench"])
@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "short", "huge"])
def test_external_data_of_subgraph_bodies_is_checked(kind, cmd, tmp_path, capsys):
    folder = tmp_path / "w"
    folder.mkdir()
    model, words = _subgraph_case(kind, folder)
    np.savez(folder / "d.npz", cond=np.array(True), x=np.ones((2, 4), np.float32))
    args = {"compile": ["compile", model, "-p", "fold", "-o", folder / "o.onnx"],
            "calibrate": ["calibrate", model, "--data", folder / "d.npz", "-o", folder / "t.json"],
            "inspect": ["inspect", model], "check": ["check", model], "diff": ["diff", model, model],
            "bench": ["bench", model, "--shapes", "2x4", "--runs", "1", "--warmup", "0"]}[cmd]
    line = refused(capsys, args, tmp_path, "input model is invalid", "initializer 'then_c' in subgraph 'then'",
                   *words)
    assert "7.0" not in line


def test_valid_external_data_of_subgraph_bodies_compiles_and_runs(tmp_path, capsys):
    import onnxruntime as ort

    folder = tmp_path / "w"
    folder.mkdir()
    model = _subgraph_model(folder)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    outcome = run_inprocess(["-q", "compile", model, "-p", "fold", "-o", out], capsys)
    assert outcome.code == EXIT_OK, outcome.err
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        want = ort.InferenceSession(str(model)).run(None, feed)[0]
        np.testing.assert_array_equal(want, x + (2.0 if cond else -3.0))
        np.testing.assert_array_equal(ort.InferenceSession(str(out)).run(None, feed)[0], want)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx"]  # read into the output, no stale reference
    assert run_inprocess(["-q", "inspect", model], capsys).code == EXIT_OK


# ---------------------------------------------------------------- bench validates every input first

def test_bench_refuses_a_later_ir_before_measuring(tmp_path, capsys):
    make_mlp(tmp_path / "a.onnx")
    (tmp_path / "b.xml").write_text('<?xml version="1.0"?>\n<net name="b" version="11"><layers/></net>\n')
    before = snapshot(tmp_path)
    outcome = run_inprocess(["bench", tmp_path / "a.onnx", tmp_path / "b.xml", "--shapes", "2x4", "--runs", "1",
                             "--warmup", "0"], capsys)  # not quiet: a measurement would print a progress line
    assert_user_error(outcome, contains="is OpenVINO IR: bench it with --provider openvino")
    assert "on cpu" not in outcome.err and outcome.out == "", outcome.err
    assert_unchanged(before, snapshot(tmp_path))


# ---------------------------------------------------------------- OpenVINO IR where ONNX is loaded

@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> Path:
    """A real OpenVINO IR of the MLP (``m.xml`` + ``m.bin``) when OpenVINO is installed, else the XML header
    OpenVINO writes (what tqc reads to recognise the format)."""
    folder = tmp_path_factory.mktemp("ir")
    try:
        import openvino as ov
    except ImportError:
        (folder / "m.xml").write_text('<?xml version="1.0"?>\n<net name="mlp" version="11"><layers/></net>\n')
        (folder / "m.bin").write_bytes(np.ones(64, np.float32).tobytes())
        return folder / "m.xml"
    make_mlp(folder / "src.onnx")
    ov.save_model(ov.convert_model(str(folder / "src.onnx")), str(folder / "m.xml"))
    (folder / "src.onnx").unlink()
    return folder / "m.xml"


@pytest.mark.parametrize("which", ["xml", "bin"])
@pytest.mark.parametrize("cmd", ["compile", "calibrate", "inspect", "check", "diff", "export-triton", "build"])
def test_openvino_ir_given_for_onnx_is_named(cmd, which, ir, tmp_path, capsys):
    model = ir if which == "xml" else ir.with_suffix(".bin")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    args = {"compile": ["compile", model, "-p", "fold", "-o", tmp_path / "o.onnx"],
            "calibrate": ["calibrate", model, "--data", tmp_path / "x.npz", "-o", tmp_path / "t.json"],
            "inspect": ["inspect", model], "check": ["check", model], "diff": ["diff", model, model],
            "export-triton": ["export-triton", model, "-o", tmp_path / "repo"],
            "build": ["build", model, "-o", tmp_path / "m.plan", "--timing-cache", tmp_path / "c.cache"]}[cmd]
    before = snapshot(ir.parent)
    line = refused(capsys, args, tmp_path, "openvino ir", "not onnx", "give the .onnx model")
    assert "wire type" not in line
    assert_unchanged(before, snapshot(ir.parent))


# ---------------------------------------------------------------- serve --provider

def test_serve_offers_exactly_the_runtimes_it_has(tmp_path, capsys):
    """OpenVINO serving landed (#19): the help offers it, and a runtime serve does not have is refused."""
    helptext = " ".join(run_inprocess(["serve", "--help"], capsys).out.split())
    assert "[cpu|cuda|openvino]" in helptext and "hook" not in helptext
    make_mlp(tmp_path / "m.onnx")
    refused(capsys, ["serve", tmp_path / "m.onnx", "--provider", "tensorrt"], tmp_path, "'tensorrt' is not one of")
