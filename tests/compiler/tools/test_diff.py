"""tqc diff: metrics against hand computations, name alignment across passes, first divergence, polygraphy."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tqc.compiler.runtime import compare
from tqc.compiler.cli.main import main
from tqc.compiler.analysis.sensitivity import op_class
from tqc.compiler.tools.diff import diff, sensitivity, shared_tensors
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model, save_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext


def test_metrics_match_hand_computation():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    cand = np.array([1.0, 2.5, 3.0, 3.0])
    m = compare.tensor_metrics("t", ref, cand)  # cand - ref = [0, 0.5, 0, -1]
    assert m.max_abs == pytest.approx(1.0) and m.mean_abs == pytest.approx(1.5 / 4)
    assert m.rel_l2 == pytest.approx(math.sqrt(1.25) / math.sqrt(30))
    assert m.cosine == pytest.approx(float(ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))))
    assert m.sqnr_db == pytest.approx(10 * math.log10(30 / 1.25))
    same = compare.tensor_metrics("t", ref, ref)
    assert same.max_abs == 0 and math.isinf(same.sqnr_db) and same.as_dict()["sqnr_db"] == "inf"


def test_padding_rows_are_left_out():
    mask = np.array([[1, 1, 0]])
    ref = np.ones((1, 3, 2))
    cand = ref.copy()
    cand[0, 2] = 100.0  # garbage at the padded position
    assert compare.mask_padding(cand, mask)[0, 2].tolist() == [0, 0]
    m = compare.tensor_metrics("t", compare.mask_padding(ref, mask), compare.mask_padding(cand, mask))
    assert m.max_abs == 0


def compiled(model, pipeline, target, feeds):
    ctx = PassContext(target=target)
    ctx.calibration_source = feeds
    return PassManager(parse_pipeline(pipeline), ctx).run(model)


def test_names_line_up_across_fold_fuse_qdq(exports):
    path = exports.get("bert", size="tiny")
    reference = load_model(path)
    feeds = synthesize_feeds(reference, count=1)
    boundaries = [o.name for o in reference.graph.output]
    for pipeline, target in (("fold", "trt"), ("fold,fuse", "trt"), ("fold,fuse", "ort-cpu"),
                             ("fold,fuse,qdq", "trt"), ("fold,fuse,qdq", "ort-cpu")):
        shared = shared_tensors(reference, compiled(load_model(path), pipeline, target, feeds))
        assert set(boundaries) <= set(shared)
        # every layer's attention context and FFN output survive fusion by name
        contexts = [n for n in shared if n.endswith("attention/self/Reshape_4_output_0")]  # sdpa export
        ffn = [n for n in shared if n.endswith("output/dense/MatMul_output_0") and "attention" not in n]
        assert len(contexts) == 2 and len(ffn) == 2, (pipeline, target)


def test_first_divergence_names_the_corrupted_weight(exports, tmp_path):
    path = exports.get("bert", size="tiny")
    reference = compiled(load_model(path), "fold", "trt", None)
    broken = onnx.ModelProto()
    broken.CopyFrom(reference)
    target = next(n for n in broken.graph.node if n.op_type == "MatMul" and "layer.1/intermediate/dense" in n.name)
    weight = next(t for t in broken.graph.initializer if t.name == target.input[1])
    values = numpy_helper.to_array(weight).copy()
    values[3, :] *= 8.0  # one corrupted row
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    feeds = synthesize_feeds(reference, count=1)
    result, _, _ = diff(reference, broken, feeds, layerwise=True, threshold=0.01)
    assert result.first_divergence is not None
    assert result.first_divergence.producer == target.name
    before = [r for r in result.layers if r.index < result.first_divergence.index]
    assert before and all(r.metrics.max_abs == 0 for r in before)


def test_cli_diff_json_plot_and_polygraphy_agree(exports, tmp_path, capsys):
    path = exports.get("bert", size="tiny")
    fused, quant = tmp_path / "fused.onnx", tmp_path / "int8.onnx"
    feeds = synthesize_feeds(load_model(path), count=2)
    save_model(compiled(load_model(path), "fold,fuse", "trt", feeds), fused)
    save_model(compiled(load_model(path), "fold,fuse,qdq", "ort-cpu", feeds), quant)
    with pytest.raises(SystemExit) as info:
        main(["-q", "diff", str(path), str(fused), str(quant), "--layerwise", "--threshold", "0.001",
              "--json", str(tmp_path / "d.json"),
              "--plot", str(tmp_path / "d.png"), "--save-dir", str(tmp_path / "pg")])
    out = capsys.readouterr().out
    assert info.value.code == 0
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["candidate"] for r in data["results"]] == [str(fused), str(quant)]
    fused_row = data["results"][0]["outputs"][0]
    assert set(fused_row) >= {"name", "max_abs", "mean_abs", "rel_l2", "cosine", "sqnr_db", "producer"}
    assert fused_row["max_abs"] < 1e-4 and data["results"][0]["first_divergence"] is None
    assert data["results"][1]["first_divergence"] is not None
    assert (tmp_path / "d.png").stat().st_size > 10_000
    # The printed polygraphy commands run, and agree: the fused graph passes at atol 1e-3, the INT8 one fails.
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("polygraphy run")]
    polygraphy = str(Path(sys.executable).parent / "polygraphy")
    subprocess.run([polygraphy] + shlex.split(commands[0])[1:], check=True, capture_output=True)
    check = shlex.split(commands[1])
    fused_run = subprocess.run([polygraphy] + [str(fused) if a == str(fused) else a for a in check[1:]],
                               capture_output=True, text=True)
    assert fused_run.returncode == 0, fused_run.stdout[-1500:]
    int8_args = [str(quant) if a == str(fused) else a for a in check[1:]]
    assert subprocess.run([polygraphy] + int8_args, capture_output=True).returncode != 0


def test_sensitivity_ranks_and_its_exclude_option_works(exports, tmp_path):
    path = exports.get("bert", size="tiny")
    reference = load_model(path)
    feeds = synthesize_feeds(reference, count=2)
    quant = compiled(load_model(path), "fold,fuse,qdq{smooth=0}", "ort-cpu", feeds)
    ranking = sensitivity(reference, quant, feeds)
    # 6 MatMuls (attention output, FFN up and down) and 2 QAttention (INT8 QKV), ranked by their Attention's name
    assert len(ranking["nodes"]) == 8 and ranking["classes"]
    assert sum(1 for r in ranking["nodes"] if r["node"].startswith("tqc_attn")) == 2
    removed = [r["error_removed"] for r in ranking["nodes"]]
    assert removed == sorted(removed, reverse=True)
    assert {op_class(n) for n in ranking["exclude"]} == {r["class"] for r in ranking["classes"]}
    # The option string goes straight into a pipeline and keeps those MatMuls in float.
    option = ranking["qdq_option"].replace("qdq{", "qdq{smooth=0,")
    ctx = PassContext(target="ort-cpu")
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline(f"fold,fuse,{option}"), ctx)
    manager.run(load_model(path))
    stats = manager.records[-1].stats
    assert stats["quantized_matmuls"] + stats["qattention"] == 8 - 3  # quantized sites: MatMuls and QAttention
