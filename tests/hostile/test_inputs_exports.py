"""Data limits on real exports (7 cases): the limits tqc derives from the graph are exactly where ONNX Runtime
starts to fail, and data beyond them is one tqc line (exit 2), never ORT's own error output.

* bert-tiny (positions from a sliced arange buffer), roberta-tiny (positions = cumsum of the mask + padding
  index: two rows fewer) and the fused bert-tiny (EmbedLayerNormalization): ORT runs at the derived longest
  sequence and the largest token id, and fails one past them (3 cases);
* ``diff --data`` with ids beyond the vocabulary, in a child process so that anything ORT prints to the real
  stderr would be seen (1); ``calibrate`` with a sequence one past roberta's positions (1); ``bench`` one past
  the positions refused, at the limit measured (1); ``compile --calib`` text with a longer ``--max-length``
  than the model's positions refused, without one truncated to the positions, at the positions silent (1).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.hostile.harness import EXIT_OK, EXIT_USER, assert_unchanged, assert_user_error, run_inprocess, \
    run_subprocess, snapshot
from tqc.compiler.io.data_limits import model_limits
from tqc.compiler.runtime.feeds import input_specs


def _feed(model: onnx.ModelProto, seq: int, token: int) -> dict:
    feed = {}
    for spec in input_specs(model):
        name = spec.name.lower()
        value = np.ones((1, seq)) if "mask" in name else np.zeros((1, seq)) if "type" in name else \
            np.full((1, seq), token)
        feed[spec.name] = value.astype(spec.dtype)
    return feed


def _runs(session, feed) -> bool:
    try:
        return bool(np.isfinite(session.run(None, feed)[0]).all())
    except Exception:  # noqa: BLE001 - ORT's refusal is what is measured
        return False


@pytest.fixture(scope="module")
def fused_bert(exports, tmp_path_factory):
    from tqc.compiler.cli.main import main

    out = tmp_path_factory.mktemp("fused") / "bert.fused.onnx"
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(exports.get("bert", size="tiny")), "-p", "fold,fuse", "--target", "ort-cpu",
              "-o", str(out)])
    assert info.value.code == 0
    return out


@pytest.mark.parametrize("which", ["bert", "roberta", "fused-bert"])
def test_derived_limits_are_exactly_where_ort_fails(which, exports, fused_bert):
    path = fused_bert if which == "fused-bert" else exports.get(which, size="tiny")
    model = onnx.load(str(path))
    limits = model_limits(model)
    vocab = limits.rows("input_ids")
    longest = limits.max_sequence
    assert vocab and longest
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert _runs(session, _feed(model, longest, vocab - 1))
    assert not _runs(session, _feed(model, longest + 1, 5))
    assert not _runs(session, _feed(model, 8, vocab))


def test_diff_ids_beyond_vocabulary_print_no_ort_lines(exports, tmp_path):
    path = exports.get("bert", size="tiny")
    vocab = model_limits(onnx.load(str(path))).rows("input_ids")
    feed = _feed(onnx.load(str(path)), 8, 5)
    feed["input_ids"][0, 3] = vocab + 7
    np.savez(tmp_path / "d.npz", **feed)
    before = snapshot(tmp_path)
    outcome = run_subprocess(["diff", path, path, "--data", tmp_path / "d.npz"])
    assert_user_error(outcome, EXIT_USER, f"holds {vocab + 7}, outside the {vocab} rows")
    assert "onnxruntime" not in outcome.err.lower()
    assert_unchanged(before, snapshot(tmp_path))


def test_calibrate_sequence_beyond_roberta_positions(exports, tmp_path, capsys):
    path = exports.get("roberta", size="tiny")
    model = onnx.load(str(path))
    longest = model_limits(model).max_sequence
    np.savez(tmp_path / "d.npz", **_feed(model, longest + 1, 5))
    before = snapshot(tmp_path)
    outcome = run_inprocess(["calibrate", path, "--data", tmp_path / "d.npz", "-o", tmp_path / "t.json"], capsys)
    assert_user_error(outcome, EXIT_USER, f"sequence length {longest + 1}")
    assert_unchanged(before, snapshot(tmp_path))


def test_bench_one_past_the_positions_is_refused_and_the_limit_is_measured(exports, tmp_path, capsys):
    path = exports.get("roberta", size="tiny")
    longest = model_limits(onnx.load(str(path))).max_sequence
    outcome = run_inprocess(["bench", path, "--shapes", f"1x{longest + 1}", "--runs", "1", "--warmup", "0"], capsys)
    assert_user_error(outcome, EXIT_USER, f"{longest} positions")
    outcome = run_inprocess(["-q", "bench", path, "--shapes", f"1x{longest}", "--runs", "1", "--warmup", "0"],
                            capsys)
    assert outcome.code == EXIT_OK, outcome.err
    assert f"1x{longest}" in outcome.out


def test_text_is_truncated_to_the_positions_in_compile(exports, tmp_path, capsys):
    pytest.importorskip("transformers")
    path = exports.get("bert", size="tiny")
    longest = model_limits(onnx.load(str(path))).max_sequence
    words = " ".join(f"w{i}" for i in range(3 * longest))
    (tmp_path / "long.txt").write_text(f"{words}\n{words}\n")
    # bert-tiny's vocabulary is 1000 rows: a tokenizer folder of its own (ids below 1000).
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(900)]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "tok" / "vocab.txt")).save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "q.onnx"
    args = ["compile", path, "-p", "fold,qdq", "--target", "ort-cpu", "-o", out, "--calib", tmp_path / "long.txt",
            "--tokenizer", tmp_path / "tok"]
    # an explicit limit beyond the positions is a mistake (issue #20): refused, nothing written
    outcome = run_inprocess(["-q", *args, "--max-length", "4096"], capsys)
    assert_user_error(outcome, EXIT_USER, f"--max-length 4096 is beyond the model's {longest} positions")
    assert not out.exists()
    # without --max-length the limit is 128, or the positions when fewer (said in a progress line)
    outcome = run_inprocess(args, capsys)
    assert outcome.code == EXIT_OK, outcome.err
    if longest < 128:
        assert f"text is truncated to {longest} tokens" in outcome.err
    assert out.exists()
    out.unlink()
    outcome = run_inprocess(["-q", *args, "--max-length", str(longest)], capsys)  # at the positions: silent
    assert outcome.code == EXIT_OK and outcome.err == "", outcome.err
    assert out.exists()
