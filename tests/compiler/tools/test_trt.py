"""TensorRT readiness check, profiles, plan metadata, Triton configs; the real build where TensorRT exists."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.cli.main import main
from tqc.compiler.core.errors import TqcError
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model, save_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.core.profiles import Profile, parse_shapes, resolve_profiles
from tqc.compiler.tools.triton import export_triton, parse_pbtxt
from tqc.compiler.tools.trt import plan_metadata
from tqc.compiler.tools.trt_check import check_trt, support_table
from tqc.models.recipes import CLASSIC_FAMILIES, RECIPES
from tqc.passes.base import PassContext

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


def compiled(path, pipeline, target):
    from tqc.compiler.runtime.feeds import synthesize_feeds

    model = load_model(path)
    ctx = PassContext(target=target)
    if "qdq" in pipeline:
        ctx.calibration_source = synthesize_feeds(model, count=2)
    return PassManager(parse_pipeline(pipeline), ctx).run(model)


def codes(report, severity="error"):
    return {f.code for f in report.findings if f.severity == severity}


def test_support_table_is_data_with_its_source():
    table = support_table()
    assert "TensorRT 10" in table["source"] and table["opset_max"] >= 20
    assert {"LayerNormalization", "Gelu", "QuantizeLinear", "MatMul", "Softmax"} <= set(table["supported"])
    assert "MatMulInteger" in table["unsupported"]


@pytest.mark.parametrize("family", sorted(CLASSIC_FAMILIES))  # attention the fuse rules know
@pytest.mark.parametrize("pipeline", ["fold,fuse", "fold,fuse,qdq"])
def test_trt_outputs_pass_the_check(family, pipeline, exports):
    model = compiled(exports.get(family, size="tiny"), pipeline, "trt")
    report = check_trt(model)
    assert report.ok, [f.message for f in report.findings if f.severity == "error"]
    assert set(report.dynamic_inputs) == set(RECIPES[family].inputs)
    assert len(report.attention) == 2
    if "qdq" in pipeline:
        assert report.qdq_pairs > 0 and all(b["int8_mha"] for b in report.attention)  # head size 16


def test_ort_contrib_graph_fails_with_the_reason(exports):
    model = compiled(exports.get("bert", size="tiny"), "fold,fuse", "ort-cpu")
    report = check_trt(model)
    assert not report.ok and "domain" in codes(report)
    assert any("com.microsoft::Attention" in f.message and "--target trt" in f.message for f in report.findings)


def test_asymmetric_and_uint8_qdq_fail(exports):
    model = compiled(exports.get("bert", size="tiny"), "fold,fuse,qdq", "ort-cpu")
    report = check_trt(model)
    assert {"qdq-type", "qdq-asymmetric"} & codes(report)


def _qdq_model(zero_point=0, per_channel_activation=False, q_feeds_matmul=False, axis=1):
    w = np.ones((4, 3), np.int8)
    scale = np.full(4 if per_channel_activation else 1, 0.1, np.float32).reshape(-1) if per_channel_activation else np.array(0.1, np.float32)
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.array(zero_point, np.int8), "zp"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(3, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(3, np.int8), "wzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], axis=1),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], axis=1),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=axis),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_rules():
    assert check_trt(_qdq_model()).ok
    assert "qdq-asymmetric" in codes(check_trt(_qdq_model(zero_point=3)))
    assert "qdq-per-channel-activation" in codes(check_trt(_qdq_model(per_channel_activation=True)))
    assert "qdq-axis" in codes(check_trt(_qdq_model(axis=0)))  # 3 scales on axis 0 of a [4, 3] weight


def test_check_cli_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    save_model(_qdq_model(), good)
    save_model(_qdq_model(zero_point=3), bad)
    with pytest.raises(SystemExit) as info:
        main(["check", str(good), "--json"])
    assert info.value.code == 0 and json.loads(capsys.readouterr().out)["ok"] is True
    with pytest.raises(SystemExit) as info:
        main(["check", str(bad)])
    assert info.value.code == 1 and "zero-point must be 0" in capsys.readouterr().out


def test_profiles_parsing():
    profiles = parse_shapes(["input_ids:1x16,8x128,32x512", "attention_mask:1x16,8x128,32x512"])
    assert profiles["input_ids"] == Profile((1, 16), (8, 128), (32, 512))
    assert parse_shapes("4x64")["*"] == Profile((4, 64), (4, 64), (4, 64))
    resolved = resolve_profiles({"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
                                parse_shapes("1x16,8x128,32x512"))
    assert resolved["attention_mask"].max == (32, 512)
    for bad, message in [("x:1x16,8x8", "one shape or three"), ("1x0", "<= 0"), ("8x128,1x16,32x512", "min <= opt"),
                         ("1xa", "is not a shape")]:
        with pytest.raises(TqcError, match=message):
            parse_shapes(bad)
    with pytest.raises(TqcError, match="give --shapes input_ids"):
        resolve_profiles({"input_ids": ["batch", "sequence"]}, {})
    with pytest.raises(TqcError, match="rank 3"):
        resolve_profiles({"input_ids": ["batch", "sequence"]}, parse_shapes("1x2x3"))


def test_plan_metadata_fields():
    meta = plan_metadata("sha256:abc", {"input_ids": Profile((1, 16), (8, 128), (32, 512))}, True, False, "10.9",
                         3, 1 << 30)
    assert meta["source_model_hash"] == "sha256:abc" and meta["tensorrt_version"] == "10.9"
    assert meta["profiles"]["input_ids"]["max"] == [32, 512]
    assert meta["network"].startswith("strongly-typed")


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is importable here: the missing-TensorRT error does not apply")
def test_build_without_tensorrt_is_one_line(tmp_path, mlp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-q", "build", str(mlp_path), "-o", str(tmp_path / "m.plan")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "TensorRT 10 is not installed" in err
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not importable on this machine (PyPI's tensorrt wheels "
                                         "download from NVIDIA's index, which is unreachable here)")
def test_real_build_and_run(exports, tmp_path):
    from tqc.compiler.tools.benchmark import TrtPlanRunner, token_inputs
    from tqc.compiler.tools.trt import build_plan

    model = compiled(exports.get("bert", size="tiny"), "fold,fuse,qdq", "trt")
    save_model(model, tmp_path / "q.onnx")
    meta = build_plan(tmp_path / "q.onnx", tmp_path / "q.plan", shapes=["1x16,2x16,4x64"],
                      timing_cache=tmp_path / "cache")
    assert meta["network"].startswith("strongly-typed") and (tmp_path / "q.plan.json").exists()
    runner = TrtPlanRunner(tmp_path / "q.plan")
    runner.prepare(token_inputs(runner.input_names, 2, 16))()


def test_triton_repository_for_onnx(exports, tmp_path):
    path = exports.get("bert", size="tiny")
    info = export_triton(path, tmp_path / "repo", name="bert_tiny", max_batch=16)
    folder = tmp_path / "repo" / "bert_tiny"
    assert (folder / "1" / "model.onnx").exists()
    config = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 16
    assert [i["name"] for i in config["input"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert config["input"][0] == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]}
    assert config["output"][0] == {"name": "last_hidden_state", "data_type": "TYPE_FP32", "dims": [-1, 64]}
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 100}
    assert info["config"]["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    with pytest.raises(TqcError, match="exists"):
        export_triton(path, tmp_path / "repo", name="bert_tiny")


def test_triton_repository_for_a_plan_reads_its_metadata(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")  # only the metadata is read; no engine is built or run here
    ports = {"inputs": [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1, -1]}],
             "outputs": [{"name": "last_hidden_state", "data_type": "TYPE_FP16", "dims": [-1, -1, 384]}]}
    (tmp_path / "m.plan.json").write_text(json.dumps(ports))
    export_triton(plan, tmp_path / "repo")
    config = parse_pbtxt((tmp_path / "repo" / "m" / "config.pbtxt").read_text())
    assert config["platform"] == "tensorrt_plan" and config["output"][0]["dims"] == [-1, 384]
    (tmp_path / "n.plan").write_bytes(b"x")
    with pytest.raises(TqcError, match="is missing"):
        export_triton(tmp_path / "n.plan", tmp_path / "repo")


def test_bench_cli_on_cpu(exports, tmp_path, capsys):
    path = exports.get("bert", size="tiny")
    with pytest.raises(SystemExit) as info:
        main(["-q", "bench", str(path), str(path), "--shapes", "1x16,2x32", "--runs", "5", "--budget", "1",
              "--lengths", "uniform", "--json", str(tmp_path / "b.json")])
    assert info.value.code == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] for r in rows)
    assert "1.00x" in capsys.readouterr().out


@pytest.fixture(scope="module")
def long_bert(tmp_path_factory):
    """bert-tiny with 1024 positions: TensorRT's INT8 MHA stops at sequence 512."""
    pytest.importorskip("transformers")
    from tqc.models.export import ExportSpec, export
    from tqc.models.recipes import find_recipe

    folder = tmp_path_factory.mktemp("long")
    config = find_recipe("bert").config("tiny")
    config.max_position_embeddings = 1024
    config.save_pretrained(folder / "cfg")
    export(ExportSpec(str(folder / "cfg" / "config.json")), folder / "long.onnx")
    return folder / "long.onnx"


def _long_qdq(path, shapes=None, seq=16):
    from tqc.compiler.runtime.feeds import synthesize_feeds

    model = load_model(path)
    feeds = synthesize_feeds(model, count=2, seq=seq)
    ctx = PassContext(target="trt", verification_feeds=feeds)
    ctx.calibration_source = feeds
    if shapes:
        ctx.shapes = parse_shapes(shapes)
    manager = PassManager(parse_pipeline("fold,fuse,qdq"), ctx)
    return model, manager.run(model), manager.records[-1].stats, ctx


def test_int8_attention_follows_the_sequences_the_model_allows(long_bert):
    """Regression: 1024 positions at sequence 700 ran TensorRT's INT8 attention past its 512 limit (cosine 0.81)
    while `tqc check` called the blocks eligible."""
    import onnxruntime as ort

    from tqc.compiler.core import target as target_facts
    from tqc.compiler.runtime.feeds import synthesize_feeds
    from tqc.compiler.tools import trt_check
    from tqc.passes import qdq
    from tqc.passes.qdq import plan

    # one fact, one place: no local copies or aliases of TensorRT's INT8 MHA limits
    assert not hasattr(qdq, "TRT_MHA_MAX_SEQUENCE") and not hasattr(trt_check, "INT8_MHA_MAX_SEQUENCE")
    assert not hasattr(plan, "TRT_INT8_MHA") and not hasattr(plan, "TRT_INT8_MHA_MAX_SEQUENCE")  # plan asks the Target
    assert trt_check.TRT_INT8_MHA is target_facts.Target.named("trt").int8_mha is target_facts.TRT_INT8_MHA
    model, q, stats, ctx = _long_qdq(long_bert)  # calibrated on 16 tokens; the position table allows 1024
    assert stats["attention_bmm"] == 0 and stats["linear"] == 8
    assert any("sequences up to 1024 (the position table (1024 positions))" in m for m in ctx.messages)
    report = check_trt(q)
    assert not any(b["int8_mha"] for b in report.attention)
    assert "int8-mha-sequence" not in codes(report, "warning")  # nothing quantized there to warn about
    # Numbers at sequence 700 (ORT CPU): the INT8 linears with float attention stay close to FP32.
    feeds = synthesize_feeds(model, count=1, batch=1, seq=700, seed=3)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, q)]
    a, b = (r.run(None, feeds[0])[0].reshape(-1).astype(np.float64) for r in runs)
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.99
    # A profile that stops at 256 allows INT8 attention, and `tqc check` reads the same limit from it.
    _, q256, stats, _ = _long_qdq(long_bert, shapes="input_ids:1x16,8x128,8x256")
    assert stats["attention_bmm"] == 4
    assert all(b["int8_mha"] for b in check_trt(q256, parse_shapes("input_ids:1x16,8x128,8x256")).attention)
    report = check_trt(q256)  # without profiles: the position table's 1024
    assert not any(b["int8_mha"] for b in report.attention) and "int8-mha-sequence" in codes(report, "warning")
    assert "sequences up to 1024" in report.attention[0]["note"]


def test_check_cli_reads_shapes(long_bert, tmp_path, capsys):
    _, q256, _, _ = _long_qdq(long_bert, shapes="input_ids:1x16,8x128,8x256")
    save_model(q256, tmp_path / "q.onnx")
    with pytest.raises(SystemExit) as info:
        main(["check", str(tmp_path / "q.onnx"), "--json", "--shapes", "input_ids:1x16,8x128,8x256"])
    assert info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert all(b["int8_mha"] for b in report["attention"]) and len(report["attention"]) == 2


def test_standard_models_keep_int8_attention(exports):
    """512 positions (bert-base; RoBERTa's 514 rows start at 2) and bert-tiny's 128 stay within the limit."""
    from tqc.compiler.tools.trt_check import model_sequence_bound

    assert model_sequence_bound(load_model(exports.get("bert", size="tiny")))[0] == 128
    assert model_sequence_bound(load_model(exports.get("roberta", size="tiny")))[0] == 130 - 2
    for family, positions in (("bert", 128), ("roberta", 128)):
        fused = compiled(exports.get(family, size="tiny"), "fold,fuse", "trt")
        assert model_sequence_bound(fused)[0] == positions
