"""``pool``: the pooled output equals sentence-transformers' pooling of the token output (numpy, written here from
its formulas), on real sentences with padding, after fuse, qdq and fp16; on MiniLM it equals
``SentenceTransformer(...).encode`` of the packaged folder. The manager verifies the pass against that pooling."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import tqc.passes.pool as pool
from tqc.passes.pool import MODES
from tqc.compiler.core.errors import TqcError, VerificationError
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.tools.trt_check import check_trt
from tqc.passes.base import PassContext, PreconditionError

from ..conftest import CALIB_SENTENCES


def numpy_pool(tokens, mask, mode, normalize):
    """sentence-transformers' Pooling and Normalize modules, in float64."""
    h, m = tokens.astype(np.float64), mask.astype(np.float64)[:, :, None]
    if mode == "mean":
        out = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    elif mode == "max":
        out = np.where(m > 0, h, -1e9).max(1)
    else:
        out = h[:, 0]
    if normalize:
        out = out / np.clip(np.sqrt((out * out).sum(1, keepdims=True)), 1e-12, None)
    return out


def run_all(model: onnx.ModelProto, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def sentence_feeds(samples=64, vocab=None):
    """The packaged sentences, tokenized by MiniLM's tokenizer, padded to the longest of each batch of 16; ids
    folded into ``vocab`` for a tiny model (the padding is the sentences' own)."""
    from transformers import AutoTokenizer

    from tqc.compiler.io.packaged import packaged_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    texts = CALIB_SENTENCES.read_text().splitlines()[:samples]
    feeds = [{k: np.asarray(v, np.int64) for k, v in tokenizer(texts[i:i + 16], padding=True, truncation=True,
                                                                  max_length=128, return_tensors="np").items()}
             for i in range(0, len(texts), 16)]
    assert all((f["attention_mask"] == 0).any() for f in feeds)  # every batch has padded positions
    if vocab is not None:
        feeds = [dict(f, input_ids=f["input_ids"] % vocab) for f in feeds]
    return feeds


def compile_pipeline(model, pipeline, target, feeds):
    ctx = PassContext(target=target, verification_feeds=feeds[:2])
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric")
    return manager.run(model), manager, ctx


@pytest.fixture(scope="module")
def minilm(exports):
    model = load_model(exports.get("minilm"))
    return model, sentence_feeds()


@pytest.mark.parametrize("pipeline", ["fold,fuse,pool{keep_tokens=true}", "fold,fuse,qdq,pool{keep_tokens=true}",
                                      "fold,fuse,fp16,pool{keep_tokens=true}", "fold,fuse,qdq,fp16,pool{keep_tokens=true}"])
def test_minilm_pooled_output_is_the_pooling_of_its_token_output(pipeline, minilm):
    model, feeds = minilm
    compiled, manager, _ = compile_pipeline(model, pipeline, "ort-cpu", feeds)
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in compiled.graph.output]
    assert outputs == [("last_hidden_state", TensorProto.FLOAT), ("sentence_embedding", TensorProto.FLOAT)]
    record = manager.records[-1]
    assert record.verify["numeric"]["passed"] and "sentence_embedding" in record.verify["numeric"]["outputs"]
    assert record.verify["outputs"]["removed"] == []
    for feed, out in zip(feeds, run_all(compiled, feeds)):
        expected = numpy_pool(out["last_hidden_state"], feed["attention_mask"], "mean", True)
        np.testing.assert_allclose(out["sentence_embedding"], expected, atol=1e-5, rtol=0)


def test_minilm_equals_sentence_transformers_encode(minilm):
    st = pytest.importorskip("sentence_transformers")
    from tqc.compiler.io.packaged import packaged_minilm_path

    model, feeds = minilm
    compiled, manager, _ = compile_pipeline(model, "fold,fuse,pool", "ort-cpu", feeds)
    assert [o.name for o in compiled.graph.output] == ["sentence_embedding"]  # keep_tokens=false: [batch, hidden] only
    dims = [d.dim_value or d.dim_param for d in compiled.graph.output[0].type.tensor_type.shape.dim]
    assert dims[1] == 384
    ours = np.concatenate([out["sentence_embedding"] for out in run_all(compiled, feeds)])
    texts = CALIB_SENTENCES.read_text().splitlines()[:len(ours)]
    theirs = st.SentenceTransformer(str(packaged_minilm_path()), device="cpu").encode(texts, batch_size=16)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert len(ours) == 64 and 1 - cosine.min() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 17, 18])  # axes as attributes (< 13), mixed (13..17), inputs (>= 18)
@pytest.mark.parametrize("mode, normalize", [("mean", True), ("mean", False), ("cls", True), ("max", True),
                                             ("max", False)])
def test_tiny_modes_on_standard_onnx(mode, normalize, opset, exports):
    model = load_model(exports.get("bert", size="tiny", opset=opset, attn="eager" if opset < 14 else "sdpa"))
    feeds = sentence_feeds(samples=32, vocab=1000)
    # fuse writes Unsqueeze with an axes input, which opset 11 does not take: pool after fold alone there
    spec = (f"fold,{'fuse,' if opset >= 13 else ''}pool{{mode={mode},normalize={str(normalize).lower()},"
            f"keep_tokens=true}}")
    compiled, manager, _ = compile_pipeline(model, spec, "trt", feeds)
    assert manager.records[-1].verify["numeric"]["passed"]
    assert all(n.domain in ("", "ai.onnx") for n in compiled.graph.node)  # runs on every target
    report = check_trt(compiled)  # every op in onnx-tensorrt's supported table
    assert report.ok, [f.message for f in report.findings]
    for feed, out in zip(feeds, run_all(compiled, feeds)):
        expected = numpy_pool(out["last_hidden_state"], feed["attention_mask"], mode, normalize)
        np.testing.assert_allclose(out["sentence_embedding"], expected, atol=1e-5, rtol=0)


def test_pool_before_fp16_and_qdq_still_verifies(exports):
    model = load_model(exports.get("bert", size="tiny"))
    feeds = sentence_feeds(samples=32, vocab=1000)
    for spec in ("fold,pool,fuse,qdq", "fold,fuse,pool,fp16"):
        compiled, manager, _ = compile_pipeline(model, spec, "ort-cpu", feeds)
        assert [o.name for o in compiled.graph.output] == ["sentence_embedding"]
        assert all(r.verify["numeric"]["passed"] for r in manager.records)


def test_a_wrong_pooling_fails_verification(exports, monkeypatch):
    """The manager judges the added output against its reference: a reference that disagrees is exit 1."""
    model = load_model(exports.get("bert", size="tiny"))
    feeds = sentence_feeds(samples=16, vocab=1000)
    real = pool.pool_reference
    monkeypatch.setattr(pool, "pool_reference", lambda *args: real(*args) + 1e-4)
    with pytest.raises(VerificationError, match="sentence_embedding"):
        compile_pipeline(model, "fold,pool", "ort-cpu", feeds)


def test_sentence_transformers_export_is_left_as_it_is(tmp_path):
    pytest.importorskip("sentence_transformers")
    from tqc.models.export import ExportSpec, export

    path = tmp_path / "st.onnx"
    export(ExportSpec("minilm", task="sentence-embedding"), path)
    model = load_model(path)
    feeds = sentence_feeds(samples=16)
    compiled, manager, ctx = compile_pipeline(model, "fold,pool", "ort-cpu", feeds)
    assert [o.name for o in compiled.graph.output] == ["token_embeddings", "sentence_embedding"]
    assert manager.records[-1].stats["already_pooled"] is True and not manager.records[-1].modified
    assert any("already returns the pooled output 'sentence_embedding'" in m for m in ctx.messages)
    with pytest.raises(TqcError, match="mode cannot apply to it: give output=NAME"):
        compile_pipeline(model, "pool{mode=max}", "ort-cpu", feeds)
    # a second pooling of the token output, under another name, next to the model's own
    compiled, _, _ = compile_pipeline(model, "pool{output=cls,mode=cls,keep_tokens=true}", "ort-cpu", feeds)
    out = run_all(compiled, feeds[:1])[0]
    np.testing.assert_allclose(out["cls"], numpy_pool(out["token_embeddings"], feeds[0]["attention_mask"], "cls",
                                                      True), atol=1e-5)


def two_token_outputs() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", 4]) for n in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
                              "g", [x], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("spec, message", [
    ("pool{mdoe=max}", "pass 'pool' has no option 'mdoe' (did you mean 'mode'?)"),
    ("pool{mode=avg}", "option 'mode' of pass 'pool' must be one of mean, cls, max"),
    ("pool{normalize=maybe}", "option 'normalize' of pass 'pool' takes a boolean, got 'maybe'"),
    ("pool{source=c}", "pass 'pool': source 'c' is not a graph output"),
    ("pool{output= }", "option 'output' of pass 'pool' must be a name"),
    ("pool", "which output to pool is ambiguous: 'a' [batchxsequencex4] float32, 'b' [batchxsequencex4] float32; "
             "give source=NAME"),
])
def test_option_errors_are_one_line(spec, message):
    with pytest.raises(TqcError) as info:
        PassManager(parse_pipeline(spec), PassContext(), verify="structure").run(two_token_outputs())
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
@pytest.mark.parametrize("opset", [11, 18])
def test_float16_token_output_pools_in_float32(mode, opset):
    """A model whose token output is declared FP16: pooled in FP32 after a Cast, the pooled output FP32."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "sequence", 4])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", "sequence", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["h"])], "g", [x, mask], [h]),
                              opset_imports=[helper.make_opsetid("", opset)])
    compiled = PassManager(parse_pipeline(f"pool{{mode={mode}}}"), PassContext()).run(model)
    assert compiled.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    rng = np.random.default_rng(0)
    feed = {"x": (rng.standard_normal((3, 6, 4)) * 100).astype(np.float16),
            "attention_mask": np.array([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5], np.int64)}
    out = run_all(compiled, [feed])[0]["sentence_embedding"]
    expected = numpy_pool(np.maximum(feed["x"], 0).astype(np.float32), feed["attention_mask"], mode, True)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_manager_holds_a_pass_to_the_output_change_it_declares():
    from tqc.passes.base import AddedOutput, Pass, PassResult

    class Claims(Pass):
        """Declares an added output it never adds."""

        name = "claims"

        def run(self, graph, ctx):
            return PassResult(True, added_outputs=(AddedOutput("c", lambda outputs, feed: outputs["a"], "a"),))

    with pytest.raises(VerificationError, match=r"graph outputs are \['a', 'b'\]; the pass declared \['a', 'b', 'c'\]"):
        PassManager([Claims()], PassContext(), verify="none").run(two_token_outputs())


def test_source_chosen_when_ambiguous_and_no_token_output_refused():
    compiled = PassManager(parse_pipeline("pool{source=b,mode=max,normalize=false}"), PassContext()).run(
        two_token_outputs())
    assert [o.name for o in compiled.graph.output] == ["a", "sentence_embedding"]
    recorded = {p.key: p.value for p in compiled.metadata_props}  # what tqc serve reads
    assert json.loads(recorded["tqc.pool"]) == {"output": "sentence_embedding", "mode": "max", "normalize": False,
                                                "source": "b"}
    assert recorded["tqc.outputs"] == "a,sentence_embedding"  # the outputs the written graph has
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    out = run_all(compiled, [{"x": x}])[0]
    np.testing.assert_allclose(out["sentence_embedding"], (-x).max(1), atol=1e-6)  # no mask input: every position
    compiled = PassManager(parse_pipeline("pool{source=a,normalize=false}"), PassContext()).run(two_token_outputs())
    np.testing.assert_allclose(run_all(compiled, [{"x": x}])[0]["sentence_embedding"], np.maximum(x, 0).mean(1),
                               atol=1e-6)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    classifier = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [logits]),
                                   opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PreconditionError) as info:
        PassManager(parse_pipeline("pool"), PassContext()).run(classifier)
    assert str(info.value) == ("pass 'pool' requires a float [batch, sequence, hidden] graph output to pool: the "
                               "graph's outputs are 'logits' [batchx4] float32")


def test_cli_explain_and_stats_lines(exports, tmp_path, capsys):
    from tqc.compiler.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["compile", str(exports.get("bert", size="tiny")), "-p", "fold,pool{mode=cls}", "--target", "trt",
              "-o", str(tmp_path / "p.onnx"), "--explain", "pool"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert info.value.code == 0
    assert "source=last_hidden_state, output=sentence_embedding, mode=cls, normalize=True, mask=None" in text
    assert ("pool: 'last_hidden_state' [batchxsequencex64] float32 -> 'sentence_embedding' [batchx64] float32: "
            "cls of 'last_hidden_state', L2-normalised, 4 node(s), opset 17") in text
    with pytest.raises(SystemExit) as info:
        main(["passes"])
    assert info.value.code == 0 and "\npool       Pool token outputs" in capsys.readouterr().out


def test_pool_verifies_on_openvino(exports):
    """The pooled graph runs on OpenVINO CPU (FP32), judged there against numpy pooling of OpenVINO's own token
    output of the stage before."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tqc[openvino]')")
    model = load_model(exports.get("bert", size="tiny"))
    feeds = sentence_feeds(samples=16, vocab=1000)
    for mode in MODES:
        ctx = PassContext(target="openvino", verification_feeds=feeds)
        manager = PassManager(parse_pipeline(f"fold,fuse,pool{{mode={mode}}}"), ctx, runtime="openvino")
        manager.run(model)
        assert manager.records[-1].verify["numeric"]["passed"], mode
        assert manager.records[-1].verify["numeric"]["outputs"]["sentence_embedding"]["shape"] == [16, 64]
