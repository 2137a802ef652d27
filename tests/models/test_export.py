"""Real exports: the packaged MiniLM, every family from tiny configs, BERT/RoBERTa-base with both exporters."""

import json

import numpy as np
import onnx
import pytest

from tqc.compiler.cli.main import main
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.model import load_model
from tqc.models.recipes import RECIPES, find_recipe

FAMILIES = sorted(RECIPES)


def compile_numeric(model_path, tmp_path, capsys, pipeline="fold"):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(model_path), "-p", pipeline, "-o", str(out), "--verify", "numeric",
              "--report", str(report)])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    return json.loads(report.read_text()), out


def test_minilm_real_weights_export_and_fold(exports, tmp_path, capsys):
    path = exports.get("minilm")
    model = load_model(path)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["tqc.family"] == "minilm" and "real weights" in meta["tqc.source"]
    report, out = compile_numeric(path, tmp_path, capsys)
    stage = report["stages"][0]
    assert stage["verify"]["numeric"]["passed"]
    assert stage["stats"]["nodes_after"] < stage["stats"]["nodes_before"]
    assert stage["seconds"] > 0 and report["total_seconds"] > 0
    # Real weights: a known property of all-MiniLM-L6-v2's word embeddings (not random init).
    inits = {t.name: t for t in model.graph.initializer}
    embedding = next(t for name, t in inits.items() if "word_embeddings" in name)
    values = onnx.numpy_helper.to_array(embedding)
    assert values.shape == (30522, 384)
    assert abs(float(values.std()) - 0.02) > 0.005  # random init would be N(0, 0.02)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_every_family_tiny_exports_and_folds(family, exporter, exports, tmp_path, capsys):
    path = exports.get(family, exporter=exporter, size="tiny")
    model = load_model(path)
    assert tuple(i.name for i in model.graph.input) == RECIPES[family].inputs
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    report, _ = compile_numeric(path, tmp_path, capsys)
    assert report["stages"][0]["verify"]["numeric"]["passed"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations(attn, exports, tmp_path, capsys):
    path = exports.get("bert", size="tiny", attn=attn)
    ops = {n.op_type for n in load_model(path).graph.node}
    assert "Softmax" in ops
    report, _ = compile_numeric(path, tmp_path, capsys)
    assert report["stages"][0]["verify"]["numeric"]["passed"]


@pytest.mark.parametrize("opset", [14, 20])
def test_opsets(opset, exports):
    model = load_model(exports.get("bert", size="tiny", opset=opset))
    assert model.opset_import[0].version == opset


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_base_models_both_exporters(family, exporter, exports, tmp_path, capsys):
    path = exports.get(family, exporter=exporter)
    model = load_model(path)
    hidden = model.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    assert hidden == 768
    report, _ = compile_numeric(path, tmp_path, capsys)
    stage = report["stages"][0]
    assert stage["verify"]["numeric"]["passed"]
    assert stage["verify"]["numeric"]["outputs"]["last_hidden_state"]["max_abs"] <= 1e-5


def test_config_json_and_model_dir_sources(tmp_path):
    from tqc.models.export import ExportSpec, export

    config = find_recipe("roberta").config("tiny")
    config.save_pretrained(tmp_path / "cfg")
    info = export(ExportSpec(str(tmp_path / "cfg" / "config.json")), tmp_path / "a.onnx")
    assert info["family"] == "roberta" and "random weights" in info["source"]
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "dir")
    info = export(ExportSpec(str(tmp_path / "dir")), tmp_path / "b.onnx")
    assert info["family"] == "roberta" and str(tmp_path / "dir") in info["source"]


def test_export_errors(tmp_path):
    from tqc.models.export import ExportSpec, export

    with pytest.raises(TqcError, match="unknown model family 'bret' \\(did you mean 'bert'\\?\\)"):
        export(ExportSpec("bret"), tmp_path / "x.onnx")
    with pytest.raises(TqcError, match="without config.json"):
        export(ExportSpec(str(tmp_path)), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_is_deterministic(tmp_path):
    from tqc.models.export import ExportSpec, export

    export(ExportSpec("bert-tiny"), tmp_path / "a.onnx")
    export(ExportSpec("bert-tiny"), tmp_path / "b.onnx")
    a = load_model(tmp_path / "a.onnx")
    b = load_model(tmp_path / "b.onnx")
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb))
