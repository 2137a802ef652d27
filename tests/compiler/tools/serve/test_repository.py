"""The python-backend repository ``tqc serve`` writes: limits read from the model, fused or not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.serve.repository import (ServeOptions, model_facts, sentence_encoder, tokenizer_folder,
                                                 write_repository)


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


def _encoder_folder(folder, pooling: dict, normalize: bool):
    folder.mkdir()
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 384, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, **pooling}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


def test_sentence_encoder_pooling_modes_max_kept_others_refused(exports, tmp_path):
    """max stays max (it was read as mean); a pooling the host cannot do is refused when serving text."""
    assert sentence_encoder(_encoder_folder(tmp_path / "max", {"pooling_mode_max_tokens": True}, False)) == {
        "normalize": False, "pooling": "max"}
    assert sentence_encoder(_encoder_folder(tmp_path / "cls", {"pooling_mode_cls_token": True}, True)) == {
        "normalize": True, "pooling": "cls"}
    minilm = exports.get("minilm")
    for name, modes in (("sqrt", {"pooling_mode_mean_sqrt_len_tokens": True}),
                        ("two", {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True})):
        folder = _encoder_folder(tmp_path / name, modes, False)
        assert sentence_encoder(folder)["pooling"] == " + ".join(modes)
        for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            source = tokenizer_folder(None, minilm) / file
            if source.exists():
                (folder / file).write_bytes(source.read_bytes())
        with pytest.raises(TqcError, match="pools with pooling_mode_"):
            write_repository(ServeOptions(model=str(minilm), tokenizer=str(folder), endpoints=("text",)),
                             tmp_path / f"repo-{name}", [])


def test_a_pooled_model_serves_its_own_pooling(exports, tmp_path):
    """The pool pass's metadata decides: only that output is run; another pooling asked for is refused; a
    tokenizer folder that declares another normalisation is noted, and the graph's is served."""
    minilm = exports.get("minilm")
    pooled = tmp_path / "pooled.onnx"
    subprocess.run([sys.executable, "-m", "tqc", "-q", "compile", str(minilm), "-p", "pool{normalize=false}",
                    "--verify", "structure", "-o", str(pooled)], check=True, capture_output=True)
    written = write_repository(ServeOptions(model=str(pooled), name="p", endpoints=("text",)), tmp_path / "r1", [])
    conf = json.loads((tmp_path / "r1" / "p_text" / "1" / "serve.json").read_text())
    assert (conf["output"], conf["run_outputs"], conf["pooling"], conf["normalize"]) == (
        "sentence_embedding", ["sentence_embedding"], "graph", False)
    assert written["text"]["pooling"] == "mean (in the graph)"
    assert any("normalize True" in note for note in written["text"]["notes"])  # the packaged MiniLM's folder
    config = (tmp_path / "r1" / "p_text" / "config.pbtxt").read_text()
    assert 'name: "embeddings"' in config and "dims: [ 384 ]" in config
    with pytest.raises(TqcError, match="pools in its graph"):
        write_repository(ServeOptions(model=str(pooled), name="p", endpoints=("text",), pooling="cls"),
                         tmp_path / "r2", [])
