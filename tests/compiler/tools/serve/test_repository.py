"""The python-backend repository ``tqc serve`` writes: limits read from the model, fused or not."""

from __future__ import annotations

import json
import subprocess
import sys

from tqc.compiler.tools.serve.repository import ServeOptions, model_facts, write_repository


def test_limits_come_from_the_model_plain_and_fused(exports, tmp_path):
    plain = exports.get("bert-tiny")
    fused = tmp_path / "fused.onnx"
    subprocess.run([sys.executable, "-m", "tqc", "-q", "compile", str(plain), "-p", "fold,fuse", "--target",
                    "ort-cpu", "-o", str(fused)], check=True, capture_output=True)
    for path in (plain, fused):
        facts = model_facts(path)
        assert (facts.vocab, facts.type_vocab, facts.max_positions) == (1000, 2, 128), path
        assert [i["name"] for i in facts.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    written = write_repository(ServeOptions(model=str(fused), name="tiny"), tmp_path / "repo", [])
    assert written["models"] == {"tiny": "raw"}  # no tokenizer recorded for random weights: no text endpoint
    conf = json.loads((tmp_path / "repo" / "tiny" / "1" / "serve.json").read_text())
    assert conf["max_length"] == 128 and conf["vocab"] == 1000
    config = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "allow_ragged_batch: true" in config
    assert "max_queue_delay_microseconds: 0" not in config  # queue delay 0 and no preferred sizes: no batcher
