"""Hostile and mistaken INPUTS to every subcommand (issue #11, input side): 299 cases.

Each error case asserts, through the shared harness (``tests/hostile/harness.py``): the exit code (2, a
user error), exactly one ``tqc: error: ...`` line naming the problem, no traceback, every file of the case's
folder byte-identical afterwards (sha256) and nothing left behind (no output, no temp file). Runs in process
on tiny synthetic models (an MLP and a token model with word/type/position tables), in a few seconds.

Categories (cases):

* corrupt and hostile models x subcommands (21 x 8 = 168): a cycle, nodes out of order, a tensor or an
  initializer assigned twice, an undefined tensor or graph output, raw data shorter than its dims (small and
  streamed initializers), dims that cannot fit in memory (input, initializer), negative dims, a type conflict
  only the full checker sees; external data outside the model's folder (``..``, absolute, symlink), short,
  missing, a FIFO; a truncated file, an empty file, text - for compile, calibrate, inspect, diff, check,
  bench, export-triton and build alike, refused on load with "input model is invalid" before any pass runs;
  plus the valid model accepted by every command but build (7), a broken diff candidate, diff candidates
  taking other inputs or input types, diff drawing inputs within a short position table, and validation
  reading a skeleton (5).
* pipelines and pass options (21): every out-of-range pass option (percentile, smooth, budget, fp16 margin;
  below, above, NaN, infinity), type errors, unknown pass/option with did-you-mean, bad choices, and the same
  ranges from the Python API.
* numeric CLI options (31): ``--batch-size 0``, ``--samples 0``, ``--max-length 0``, ``--threshold nan``,
  ``--runs 0``, ``--warmup -1``, ``--budget nan``, ``--threads 0``, ``export --opset 0|99``, per-exporter
  opset ranges, ``--seed -1``, ``build --workspace 0|nan``, each with the allowed range in the message.
* calibration data (22): wrong names, dtypes, ranks, NaN, empty, no arrays, ids beyond the vocabulary,
  negative ids, token types beyond their table, sequences beyond the position table - through compile
  ``--calib``, ``calibrate --data`` and ``diff --data``; text longer than the position table truncated (with
  a note) and text tokenized for another vocabulary refused.
* calibration tables (14): NaN/infinite ranges, missing keys, min above max, negative amax, bad samples, not
  JSON, another model's table (refused; accepted with ``--allow-table-mismatch``), the same model's table.
* data loaders (17): raising, ``sys.exit(0)``, ``sys.exit(3)``, ``sys.exit("msg")`` at call or import time,
  failing mid-iteration, returning None / a dict / an int, yielding lists, a missing or non-callable
  function, an import or syntax error, an empty loader; the loader named in calibrate and diff too.
* bench inputs (11): ``--shapes 0x0``, ``-1x16``, ``1x0``, absurdly large, malformed, beyond the position
  table, a float-input model measured from its signature.
* export configs (3): hidden size not a multiple of the heads, a negative layer count, an absurd vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_mlp
from tests.hostile.harness import EXIT_OK, EXIT_USER, assert_unchanged, assert_user_error, run_inprocess, snapshot
from tests.hostile.models import BROKEN, broken_model, make_token_model

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers

@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A folder with a valid MLP (``mlp.onnx``), its data (``x.npz``), a token model (``tok.onnx``)."""
    folder = tmp_path / "w"
    folder.mkdir()
    make_mlp(folder / "mlp.onnx", with_identity=False)
    np.savez(folder / "x.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    make_token_model(folder / "tok.onnx")
    return folder


def refused(capsys, args, root: Path, *words: str) -> str:
    """Run ``tqc ARGS``: exit 2, one error line holding one of ``words``, nothing under ``root`` changed or new."""
    before = snapshot(root)
    outcome = run_inprocess(["-q", *map(str, args)], capsys)
    assert_user_error(outcome, EXIT_USER)
    line = outcome.error_lines[0].lower()
    assert not words or any(w.lower() in line for w in words), f"none of {words} in {line!r}"
    assert_unchanged(before, snapshot(root))
    return outcome.error_lines[0]


def accepted(capsys, args, root: Path, allowed_new=()) -> str:
    before = snapshot(root)
    outcome = run_inprocess(["-q", *map(str, args)], capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert "Traceback" not in outcome.err
    assert_unchanged(before, snapshot(root), allowed_new)
    return outcome.out + outcome.err


def command(name: str, model: Path, folder: Path, good: Path) -> list:
    return {
        "compile": ["compile", model, "-p", "fold", "-o", folder / "out.onnx"],
        "calibrate": ["calibrate", model, "--data", folder / "x.npz", "-o", folder / "t.json"],
        "inspect": ["inspect", model],
        "diff": ["diff", model, good],
        "check": ["check", model],
        "bench": ["bench", model, "--shapes", "2x4", "--runs", "1", "--warmup", "0"],
        "export-triton": ["export-triton", model, "-o", folder / "repo", "--max-batch", "0"],
        "build": ["build", model, "-o", folder / "o.plan", "--shapes", "x:1x4"],
    }[name]


COMMANDS = ("compile", "calibrate", "inspect", "diff", "check", "bench", "export-triton")
LOADING_COMMANDS = COMMANDS + ("build",)


# ---------------------------------------------------------------- corrupt and hostile models

@pytest.mark.parametrize("cmd", LOADING_COMMANDS)
@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_model_is_refused_on_load(kind, cmd, tmp_path, capsys):
    folder = tmp_path / "w"
    folder.mkdir()
    good = folder / "good.onnx"
    make_mlp(good)
    np.savez(folder / "x.npz", x=np.ones((2, 4), np.float32))
    model = broken_model(kind, folder)
    line = refused(capsys, command(cmd, model, folder, good), tmp_path, *BROKEN[kind])
    if kind not in ("truncated", "empty", "not_protobuf"):
        assert "input model is invalid" in line
    assert "verification failed" not in line and "internal" not in line


@pytest.mark.parametrize("cmd", COMMANDS)
def test_valid_model_is_accepted_by_every_command(cmd, world, capsys):
    model = world / "mlp.onnx"
    new = {"compile": [world / "out.onnx"], "calibrate": [world / "t.json"], "export-triton": [world / "repo"]}
    args = command(cmd, model, world, model)
    if cmd == "diff":
        args += ["--save-dir", world / "pg"]
        new[cmd] = [world / "pg"]
    accepted(capsys, args, world, new.get(cmd, ()))


def test_broken_candidate_in_diff_is_refused(world, capsys):
    bad = broken_model("duplicate_output", world)
    refused(capsys, ["diff", world / "mlp.onnx", bad], world, "input model is invalid")


def test_diff_of_models_with_other_inputs_is_refused(world, capsys):
    refused(capsys, ["diff", world / "mlp.onnx", world / "tok.onnx"], world, "takes input 'input_ids'")


def test_diff_of_a_candidate_with_other_input_types_is_refused(world, capsys):
    import onnx

    model = onnx.load(str(world / "tok.onnx"))
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT32  # attention_mask: Cast accepts it
    (world / "tok32.onnx").write_bytes(model.SerializeToString())
    refused(capsys, ["diff", world / "tok.onnx", world / "tok32.onnx"], world, "as int32")


def test_diff_draws_inputs_within_a_short_position_table(world, capsys):
    make_token_model(world / "tok8.onnx", positions=8)
    out = accepted(capsys, ["diff", world / "tok8.onnx", world / "tok8.onnx", "--save-dir", world / "pg"], world,
                   [world / "pg"])
    assert " y " in out


def test_validation_is_cheap_and_reads_no_weights_twice(world):
    """The lean load validates the skeleton: the weights are never copied into a second ModelProto."""
    from tqc.compiler.io.model import load_model_lean

    lean = load_model_lean(world / "tok.onnx")
    assert all(not t.HasField("raw_data") or len(t.raw_data) <= 4096 for t in lean.skeleton.graph.initializer)


# ---------------------------------------------------------------- pipelines and pass options

PIPELINE_CASES = {
    "qdq{percentile=150}": "[90, 100], got 150",
    "qdq{percentile=50}": "[90, 100], got 50",
    "qdq{percentile=nan}": "finite",
    "qdq{percentile=abc}": "takes a number",
    "qdq{smooth=-1}": "[0, 1], got -1",
    "qdq{smooth=1.5}": "[0, 1], got 1.5",
    "qdq{smooth=nan}": "finite",
    "qdq{smooth=inf}": "finite",
    "qdq{budget=2}": "[0, 1], got 2",
    "qdq{budget=-0.5}": "[0, 1], got -0.5",
    "fp16{margin=-1}": "(0, 1], got -1",
    "fp16{margin=0}": "(0, 1], got 0",
    "fp16{margin=nan}": "finite",
    "fp16{margin=1e400}": "finite",
    "qdq{smoth=0.5}": "did you mean 'smooth'",
    "fod": "did you mean 'fold'",
    "fold{x=1}": "takes no options",
    "qdq{method=maxx}": "did you mean 'max'",
    "fold,,fuse": "empty pass name",
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINE_CASES))
def test_pipeline_option_out_of_range_is_refused(pipeline, world, capsys):
    refused(capsys, ["compile", world / "mlp.onnx", "-p", pipeline, "-o", world / "o.onnx", "--calib",
                     world / "x.npz"], world, PIPELINE_CASES[pipeline])


def test_option_ranges_hold_from_python_too():
    from tqc.compiler.core.errors import TqcError
    from tqc.passes.fp16 import Fp16
    from tqc.passes.qdq import Qdq

    for make in (lambda: Qdq(percentile=150.0), lambda: Qdq(smooth=math.nan), lambda: Fp16(margin=-1.0)):
        with pytest.raises(TqcError, match="option"):
            make()
    assert Qdq(percentile=99.9, smooth=0.0, budget=1.0).values["percentile"] == 99.9


def test_every_numeric_pass_option_declares_a_range():
    from tqc.passes.registry import available

    for name, cls in available().items():
        if not cls.__module__.startswith("tqc.passes"):
            continue  # passes that tests register for themselves
        for key, option in cls.options.items():
            if option.type in (int, float):
                assert option.range_text(), f"{name}.{key} has no declared range"


# ---------------------------------------------------------------- numeric CLI options

CLI_CASES = {
    "compile --batch-size 0": (["compile", "{mlp}", "-p", "fold", "-o", "{o}", "--batch-size", "0"], "x>=1"),
    "compile --calib-samples 0": (["compile", "{mlp}", "-p", "fold", "-o", "{o}", "--calib-samples", "0"], "x>=1"),
    "compile --max-length 0": (["compile", "{mlp}", "-p", "fold", "-o", "{o}", "--max-length", "0"], "x>=1"),
    "compile --max-length -5": (["compile", "{mlp}", "-p", "fold", "-o", "{o}", "--max-length", "-5"], "x>=1"),
    "calibrate --samples 0": (["calibrate", "{mlp}", "--data", "{x}", "-o", "{t}", "--samples", "0"], "x>=1"),
    "calibrate --batch-size 0": (["calibrate", "{mlp}", "--data", "{x}", "-o", "{t}", "--batch-size", "0"], "x>=1"),
    "calibrate --max-length 0": (["calibrate", "{mlp}", "--data", "{x}", "-o", "{t}", "--max-length", "0"], "x>=1"),
    "diff --samples 0": (["diff", "{mlp}", "{mlp}", "--samples", "0"], "x>=1"),
    "diff --batch-size 0": (["diff", "{mlp}", "{mlp}", "--batch-size", "0"], "x>=1"),
    "diff --threshold nan": (["diff", "{mlp}", "{mlp}", "--threshold", "nan"], "finite"),
    "diff --threshold -1": (["diff", "{mlp}", "{mlp}", "--threshold", "-1"], "x>=0"),
    "bench --runs 0": (["bench", "{mlp}", "--runs", "0"], "x>=1"),
    "bench --runs -3": (["bench", "{mlp}", "--runs", "-3"], "x>=1"),
    "bench --warmup -1": (["bench", "{mlp}", "--warmup", "-1"], "x>=0"),
    "bench --budget 0": (["bench", "{mlp}", "--budget", "0"], "x>0"),
    "bench --budget nan": (["bench", "{mlp}", "--budget", "nan"], "finite"),
    "bench --budget inf": (["bench", "{mlp}", "--budget", "inf"], "finite"),
    "bench --threads 0": (["bench", "{mlp}", "--threads", "0"], "x>=1"),
    "export --opset 0": (["export", "bert-tiny", "-o", "{o}", "--opset", "0"], "7<=x<=23"),
    "export --opset 99": (["export", "bert-tiny", "-o", "{o}", "--opset", "99"], "7<=x<=23"),
    "export --opset -1": (["export", "bert-tiny", "-o", "{o}", "--opset", "-1"], "7<=x<=23"),
    "export legacy --opset 21": (["export", "bert-tiny", "-o", "{o}", "--opset", "21"], "opsets 7 to 20"),
    "export dynamo --opset 17": (["export", "bert-tiny", "-o", "{o}", "--exporter", "dynamo", "--opset", "17"],
                                 "opsets 18 to 23"),
    "export --seed -1": (["export", "bert-tiny", "-o", "{o}", "--seed", "-1"], "0<=x<="),
    "export --opset abc": (["export", "bert-tiny", "-o", "{o}", "--opset", "abc"], "not a valid integer"),
    "build --workspace 0": (["build", "{mlp}", "-o", "{p}", "--workspace", "0"], "x>0"),
    "build --workspace nan": (["build", "{mlp}", "-o", "{p}", "--workspace", "nan"], "finite"),
    "build --opt-level 9": (["build", "{mlp}", "-o", "{p}", "--opt-level", "9"], "0<=x<=5"),
    "compile --calib-samples 1.5": (["compile", "{mlp}", "-p", "fold", "-o", "{o}", "--calib-samples", "1.5"],
                                    "not a valid integer"),
    "diff --threshold inf": (["diff", "{mlp}", "{mlp}", "--threshold", "inf"], "finite"),
    "calibrate --samples -1": (["calibrate", "{mlp}", "--data", "{x}", "-o", "{t}", "--samples", "-1"], "x>=1"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_numeric_cli_option_out_of_range_is_refused(case, world, capsys):
    args, words = CLI_CASES[case]
    names = {"mlp": world / "mlp.onnx", "o": world / "o.onnx", "x": world / "x.npz", "t": world / "t.json",
             "p": world / "o.plan"}
    refused(capsys, [a.format(**names) for a in args], world, words)


# ---------------------------------------------------------------- calibration data

def _token_arrays(batch=4, seq=8, ids_high=50, seed=0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, ids_high, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def _data_case(kind: str, folder: Path) -> tuple[Path, Path, str]:
    """(model, data file, words of the error line)."""
    mlp, tok = folder / "mlp.onnx", folder / "tok.onnx"
    data = folder / f"{kind}.npz"
    x = np.ones((4, 4), np.float32)
    if kind == "wrong_name":
        np.savez(data, z=x)
        return mlp, data, "no data for model input 'x'"
    if kind == "extra_name":
        np.savez(data, x=x, extra=x)
        return mlp, data, "'extra' is not an input"
    if kind == "wrong_dtype":
        arrays = _token_arrays()
        arrays["input_ids"] = arrays["input_ids"].astype(np.float32)
        np.savez(data, **arrays)
        return tok, data, "expects integers"
    if kind == "wrong_rank":
        np.savez(data, x=np.ones((2, 2, 4), np.float32))
        return mlp, data, "rank 3"
    if kind == "wrong_size":
        np.savez(data, x=np.ones((2, 5), np.float32))
        return mlp, data, "expects 4"
    if kind == "nan":
        x[1, 2] = np.nan
        np.savez(data, x=x)
        return mlp, data, "nan"
    if kind == "empty":
        np.savez(data, x=np.ones((0, 4), np.float32))
        return mlp, data, "no samples"
    if kind == "no_arrays":
        np.savez(data)
        return mlp, data, "holds no arrays"
    if kind == "ids_beyond_vocab":
        arrays = _token_arrays()
        arrays["input_ids"][2, 3] = 50
        np.savez(data, **arrays)
        return tok, data, "outside the 50 rows"
    if kind == "negative_ids":
        arrays = _token_arrays()
        arrays["input_ids"][0, 0] = -1
        np.savez(data, **arrays)
        return tok, data, "holds -1"
    if kind == "types_beyond_table":
        arrays = _token_arrays()
        arrays["token_type_ids"][:, 4:] = 2
        np.savez(data, **arrays)
        return tok, data, "outside the 2 rows"
    if kind == "sequence_beyond_positions":
        np.savez(data, **_token_arrays(seq=20))
        return tok, data, "covers at most 16"
    if kind == "json_not_feeds":
        data = folder / "bad.json"
        data.write_text("[1, 2, 3]")
        return mlp, data, "polygraphy inputs"
    if kind == "unknown_format":
        data = folder / "data.csv"
        data.write_text("1,2,3\n")
        return mlp, data, "unknown format"
    raise ValueError(kind)  # pragma: no cover


DATA_KINDS = ("wrong_name", "wrong_dtype", "wrong_rank", "nan", "empty", "ids_beyond_vocab", "negative_ids",
              "types_beyond_table", "sequence_beyond_positions")
EXTRA_DATA_KINDS = ("extra_name", "wrong_size", "no_arrays", "json_not_feeds", "unknown_format")


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_bad_calibration_data_in_compile(kind, world, capsys):
    model, data, words = _data_case(kind, world)
    refused(capsys, ["compile", model, "-p", "fold,qdq", "-o", world / "o.onnx", "--calib", data], world, words)


@pytest.mark.parametrize("kind", EXTRA_DATA_KINDS + ("ids_beyond_vocab", "sequence_beyond_positions"))
def test_bad_data_in_calibrate(kind, world, capsys):
    model, data, words = _data_case(kind, world)
    refused(capsys, ["calibrate", model, "--data", data, "-o", world / "t.json"], world, words)


@pytest.mark.parametrize("kind", ("ids_beyond_vocab", "types_beyond_table", "sequence_beyond_positions"))
def test_bad_data_in_diff(kind, world, capsys):
    model, data, words = _data_case(kind, world)
    refused(capsys, ["diff", model, model, "--data", data], world, words)


def test_json_ids_beyond_vocab_in_a_later_item_are_refused(world, capsys):
    from polygraphy.json import save_json

    good, bad = _token_arrays(), _token_arrays(seed=1)
    bad["input_ids"][0, 0] = 999
    save_json([good, bad], str(world / "feeds.json"))
    refused(capsys, ["calibrate", world / "tok.onnx", "--data", world / "feeds.json", "-o", world / "t.json"],
            world, "item 1", "outside the 50 rows")


def test_text_longer_than_the_positions_is_truncated_with_a_note(text_world, capsys):
    out = text_world / "t.json"
    try:
        before = snapshot(text_world)
        outcome = run_inprocess(["calibrate", text_world / "tok30k.onnx", "--data", text_world / "long.txt",
                                 "--tokenizer", "minilm", "-o", out], capsys)
        assert outcome.code == EXIT_OK, outcome.err
        assert "truncated to 16 tokens" in outcome.err
        assert_unchanged(before, snapshot(text_world), [out])
        assert json.loads(out.read_text())["samples"] == 8
    finally:
        out.unlink(missing_ok=True)


def test_text_for_another_vocabulary_is_refused(text_world, world, capsys):
    refused(capsys, ["calibrate", world / "tok.onnx", "--data", text_world / "long.txt", "--tokenizer", "minilm",
                     "-o", world / "t.json"], world, "another model's tokenizer")


# ---------------------------------------------------------------- calibration tables

def _table(world: Path, capsys) -> dict:
    accepted(capsys, ["calibrate", world / "mlp.onnx", "--data", world / "x.npz", "-o", world / "t.json"], world,
             [world / "t.json"])
    return json.loads((world / "t.json").read_text())


def _break_table(data: dict, kind: str) -> tuple[str, str]:
    """Edit the table ``data`` in place; returns (replacement text or '', words of the error)."""
    name = sorted(data["tensors"])[0]
    entry = data["tensors"][name]
    if kind == "nan_amax":
        entry["amax"]["max"] = math.nan
        return "", "finite"
    if kind == "inf_max":
        entry["max"] = math.inf
        return "", "finite"
    if kind == "nan_channel":
        entry["channel_min"] = [math.nan] * len(entry["channel_min"] or [0])
        entry["channel_max"] = [0.0] * len(entry["channel_min"])
        return "", "finite"
    if kind == "missing_amax":
        del entry["amax"]
        return "", "lacks 'amax'"
    if kind == "missing_tensors":
        del data["tensors"]
        return "", "lacks 'tensors'"
    if kind == "min_above_max":
        entry["min"], entry["max"] = 5.0, -5.0
        return "", "above 'max'"
    if kind == "negative_amax":
        entry["amax"]["max"] = -1.0
        return "", "negative"
    if kind == "zero_samples":
        data["samples"] = 0
        return "", "positive integer"
    if kind == "string_range":
        entry["amax"]["max"] = "big"
        return "", "finite number"
    if kind == "not_json":
        return "{not json", "not json"
    if kind == "wrong_format":
        data["format"] = "something-else/9"
        return "", "not a tqc calibration table"
    raise ValueError(kind)  # pragma: no cover


TABLE_KINDS = ("nan_amax", "inf_max", "nan_channel", "missing_amax", "missing_tensors", "min_above_max",
               "negative_amax", "zero_samples", "string_range", "not_json", "wrong_format")


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_broken_calibration_table_is_refused(kind, world, capsys):
    data = _table(world, capsys)
    text, words = _break_table(data, kind)
    (world / "t.json").write_text(text or json.dumps(data))
    refused(capsys, ["compile", world / "mlp.onnx", "-p", "fold,qdq", "-o", world / "q.onnx", "--calib-table",
                     world / "t.json"], world, words)


def test_another_models_table_is_refused_then_allowed_explicitly(world, capsys):
    _table(world, capsys)
    other = world / "other.onnx"
    make_mlp(other, with_identity=False, seed=1)  # same structure, other weights
    args = ["compile", other, "-p", "fold,qdq", "-o", world / "q.onnx", "--calib-table", world / "t.json"]
    line = refused(capsys, args, world, "computed on another model")
    assert "--allow-table-mismatch" in line
    out = accepted(capsys, [*args, "--allow-table-mismatch"], world, [world / "q.onnx"])
    assert "quantized_matmuls=2" in out


def test_the_same_models_table_is_used(world, capsys):
    _table(world, capsys)
    out = accepted(capsys, ["compile", world / "mlp.onnx", "-p", "fold,qdq", "-o", world / "q.onnx",
                            "--calib-table", world / "t.json", "--verify", "numeric"], world, [world / "q.onnx"])
    assert "quantized_matmuls=2" in out


def test_tables_name_their_model_by_a_hash_of_its_weights(world, capsys):
    from tqc.compiler.io.model import model_hash

    data = _table(world, capsys)
    assert data["model_hash"] == model_hash(world / "mlp.onnx")  # file and external data: the weights too


# ---------------------------------------------------------------- data loaders (user code)

LOADERS = {
    "raises": ("def load():\n    raise ValueError('bad shard 7')\n", "load", "raised ValueError: bad shard 7"),
    "exit_0": ("import sys\ndef load():\n    sys.exit(0)\n", "load", "sys.exit(0)"),
    "exit_3": ("import sys\ndef load():\n    sys.exit(3)\n", "load", "sys.exit(3)"),
    "exit_message": ("import sys\ndef load():\n    sys.exit('no data here')\n", "load", "no data here"),
    "exit_at_import": ("import sys\nsys.exit(0)\ndef load():\n    return []\n", "load", "failed to import"),
    "raises_mid_iteration": ("import numpy as np\ndef load():\n    yield {'x': np.ones((2, 4), np.float32)}\n"
                             "    raise RuntimeError('disk gone')\n", "load", "while producing item 1"),
    "exit_mid_iteration": ("import numpy as np, sys\ndef load():\n    yield {'x': np.ones((2, 4), np.float32)}\n"
                           "    sys.exit(0)\n", "load", "sys.exit(0)"),
    "returns_none": ("def load():\n    return None\n", "load", "returned NoneType"),
    "returns_dict": ("import numpy as np\ndef load():\n    return {'x': np.ones((2, 4), np.float32)}\n", "load",
                     "returned dict"),
    "returns_int": ("def load():\n    return 3\n", "load", "returned int"),
    "yields_lists": ("def load():\n    yield [1, 2, 3]\n", "load", "yielded list"),
    "yields_nothing": ("def load():\n    return []\n", "load", "no samples"),
    "missing_function": ("def other():\n    return []\n", "load", "has no function 'load'"),
    "not_callable": ("load = 3\n", "load", "not a function"),
    "import_error": ("import not_a_module_anywhere\n", "load", "failed to import"),
    "syntax_error": ("def load(:\n", "load", "failed to import"),
}


@pytest.mark.parametrize("case", sorted(LOADERS))
def test_misbehaving_loader_is_one_line(case, world, capsys):
    source, function, words = LOADERS[case]
    (world / "loader.py").write_text(source)
    refused(capsys, ["compile", world / "mlp.onnx", "-p", "fold,qdq", "-o", world / "o.onnx", "--calib",
                     f"{world / 'loader.py'}:{function}"], world, words)


def test_loader_errors_name_the_loader_in_calibrate_and_diff(world, capsys):
    (world / "loader.py").write_text(LOADERS["exit_0"][0])
    spec = f"{world / 'loader.py'}:load"
    assert "loader.py:load" in refused(capsys, ["calibrate", world / "mlp.onnx", "--data", spec, "-o",
                                                world / "t.json"], world, "sys.exit(0)")
    assert "loader.py:load" in refused(capsys, ["diff", world / "mlp.onnx", world / "mlp.onnx", "--data", spec],
                                       world, "sys.exit(0)")


# ---------------------------------------------------------------- bench inputs

BENCH_SHAPES = {"0x0": "at least 1", "-1x16": "at least 1", "1x0": "at least 1", "100000x100000": "at most",
                "abc": "not BATCHxSEQUENCE", "1x16x2": "not BATCHxSEQUENCE", "": "not BATCHxSEQUENCE",
                "4096x4096": "at most"}


@pytest.mark.parametrize("shapes", sorted(BENCH_SHAPES))
def test_bench_shapes_out_of_range(shapes, world, capsys):
    refused(capsys, ["bench", world / "tok.onnx", "--shapes", shapes, "--runs", "1"], world, BENCH_SHAPES[shapes])


def test_bench_sequence_beyond_the_position_table(world, capsys):
    refused(capsys, ["bench", world / "tok.onnx", "--shapes", "1x8,1x17", "--runs", "1", "--warmup", "0"], world,
            "16 positions")


def test_bench_of_a_float_input_model_draws_from_its_signature(world, capsys):
    out = accepted(capsys, ["bench", world / "mlp.onnx", "--shapes", "3x5", "--runs", "2", "--warmup", "0"], world)
    assert "3x5" in out


def test_bench_token_model_ids_stay_in_the_vocabulary(world):
    import onnx

    from tqc.compiler.tools.benchmark import bench_inputs

    model = onnx.load(str(world / "tok.onnx"))
    feed = bench_inputs(model, ["input_ids", "attention_mask", "token_type_ids"], 4, 16, "uniform")
    assert feed["input_ids"].max() < 50 and feed["input_ids"].shape == (4, 16)


# ---------------------------------------------------------------- export configs

CONFIGS = {
    "heads": ({"hidden_size": 30, "num_attention_heads": 4}, "not a multiple of num_attention_heads"),
    "negative_layers": ({"num_hidden_layers": -1}, "'num_hidden_layers' must be an integer >= 0"),
    "absurd_vocab": ({"vocab_size": 10**12}, "memory"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_export_of_an_impossible_config(case, world, capsys):
    pytest.importorskip("transformers")
    config = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
              "intermediate_size": 37, "vocab_size": 100, "max_position_embeddings": 64}
    changes, words = CONFIGS[case]
    config.update(changes)
    (world / "config.json").write_text(json.dumps(config))
    refused(capsys, ["export", world / "config.json", "-o", world / "e.onnx"], world, words)
