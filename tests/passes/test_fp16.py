"""fp16 without a ModelProto of the weights: the overflow guard runs the graph itself (weights lent to ORT) and
ONNX Runtime's converter runs on a skeleton whose large constants are shape-only stand-ins; the real arrays are
converted afterwards exactly as the converter converts them. Checked against the converter run on the full
model (the former implementation) and against FP32 on ORT CPU."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import tqc.compiler.runtime.activations as activations
import tqc.passes.fp16 as fp16
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.io.structure import infer_shapes
from tqc.passes.base import PassContext


def _run(model: onnx.ModelProto, feeds) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds]).astype(np.float64)


def _fused_graph(path, feeds):
    """bert-tiny after fold,fuse (ort-cuda), as the fp16 pass receives it."""
    from tqc.compiler.pipeline.manager import PassManager

    ctx = PassContext(target="ort-cuda", verification_feeds=feeds)
    manager = PassManager(parse_pipeline("fold,fuse"), ctx, verify="structure")
    return infer_shapes(manager.run(load_model(path)), strict=False)


def _former_fp16(model: onnx.ModelProto, blocked: list[str], keep_fp32=()) -> onnx.ModelProto:
    """The former implementation: ORT's converter on the full ModelProto (weights inside)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    fp16._unshare_initializers(model, set(blocked))
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            for attr in node.attribute:
                if attr.name == "stash_type":
                    attr.i = 1
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked,
                                    op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32)))


def _no_full_model(monkeypatch):
    """Fail if the pass exports a ModelProto of the weights or serializes one for the guard."""
    def refuse(*args, **kwargs):
        raise AssertionError("fp16 built a ModelProto of the weights")

    monkeypatch.setattr(fp16, "to_model", refuse)
    monkeypatch.setattr(activations, "exposed_model_bytes", refuse)


@pytest.mark.parametrize("margin", [0.5, 1e-5])  # 1e-5: the guard keeps many nodes (and shared weights) in FP32
def test_fp16_matches_former_converter_without_a_full_model(margin, exports, monkeypatch):
    path = exports.get("bert", size="tiny")
    feeds = synthesize_feeds(load_model(path), count=2)
    fused = _fused_graph(path, feeds)
    graph = to_graph(fused)
    fp16_pass = parse_pipeline(f"fp16{{margin={margin}}}")[0]
    _no_full_model(monkeypatch)
    result = fp16_pass.run(graph, PassContext(target="ort-cuda", verification_feeds=feeds))
    monkeypatch.undo()
    blocked = result.stats["fp32_nodes_guarded"]
    assert (blocked == 0) if margin == 0.5 else (blocked >= 3), blocked
    new = to_model(graph)

    # The guard's choice, recomputed the former way (a serialized full model) gives the same blocked nodes.
    named = to_model(to_graph(fused))
    for index, node in enumerate(named.graph.node):
        node.name = node.name or f"tqc_node_{index}"
    peaks = activations.max_abs_per_tensor(named, feeds)
    producers = {out: node.name for node in named.graph.node for out in node.output}
    blocked_names = sorted({producers[n] for n, v in peaks.items() if v > margin * fp16.FP16_MAX and n in producers})
    assert len(blocked_names) == blocked
    _assert_same_as_former(to_model(graph), named, blocked_names, feeds)


def _assert_same_as_former(new: onnx.ModelProto, named: onnx.ModelProto, blocked_names: list[str], feeds) -> None:
    former = to_model(to_graph(_former_fp16(named, blocked_names)).toposort())
    # Same graph: nodes (ops, inputs, outputs), and every initializer byte-identical.
    assert [(n.op_type, list(n.input), list(n.output)) for n in new.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in former.graph.node]
    new_weights = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    former_weights = {t.name: numpy_helper.to_array(t) for t in former.graph.initializer}
    assert new_weights.keys() == former_weights.keys()
    for name, value in former_weights.items():
        assert new_weights[name].dtype == value.dtype and np.array_equal(new_weights[name], value), name
    assert any(v.dtype == np.float16 and v.size > 1024 for v in new_weights.values())
    np.testing.assert_array_equal(_run(new, feeds), _run(former, feeds))


def test_fp16_large_weight_shared_by_a_guarded_node(monkeypatch):
    """A large weight used by an FP16 MatMul and by one the guard keeps in FP32: the FP32 node gets its own
    FP32 copy of the real array (the skeleton's copy is only a stand-in)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 64)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w"], ["c"], name="second"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
                              initializer=[numpy_helper.from_array(weight, "w")])
    model = infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), strict=False)
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(2)]
    a = [f["x"] @ weight for f in feeds]
    peak_a, peak_c = max(np.abs(v).max() for v in a), max(np.abs(v @ weight).max() for v in a)
    assert peak_c > 2 * peak_a
    margin = (peak_a + peak_c) / 2 / fp16.FP16_MAX
    fp16_graph = to_graph(model)
    _no_full_model(monkeypatch)
    result = parse_pipeline(f"fp16{{margin={margin}}}")[0].run(fp16_graph, PassContext(verification_feeds=feeds))
    monkeypatch.undo()
    assert result.stats["fp32_nodes_guarded"] == 2  # second and the Relu after it
    new = to_model(fp16_graph)
    weights = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert weights["w"].dtype == np.float16 and np.array_equal(weights["w_tqc_fp32"], weight)
    _assert_same_as_former(new, model, ["relu", "second"], feeds)


def test_fp16_against_fp32_on_held_out_inputs(exports, monkeypatch):
    from tqc.compiler.pipeline.manager import PassManager

    path = exports.get("bert", size="tiny")
    model = load_model(path)
    feeds = synthesize_feeds(model, count=2)
    manager = PassManager(parse_pipeline("fold,fuse,fp16"), PassContext(target="ort-cuda", verification_feeds=feeds),
                          verify="structure")
    _no_full_model(monkeypatch)  # the pass exports nothing (the manager's final export is its own)
    converted = manager.run(model)
    monkeypatch.undo()
    held_out = synthesize_feeds(model, count=2, seed=7)
    reference, half = _run(model, held_out).reshape(-1), _run(converted, held_out).reshape(-1)
    cosine = reference @ half / np.linalg.norm(reference) / np.linalg.norm(half)
    assert cosine > 0.9999
    assert np.abs(reference - half).max() < 0.05
    weights = [numpy_helper.to_array(t) for t in converted.graph.initializer]
    assert all(w.dtype != np.float32 for w in weights if w.size > 1024)  # every large weight is FP16


def test_to_float16_matches_ort_converter_in_chunks(monkeypatch):
    from onnxruntime.transformers.float16 import convert_np_to_float16

    monkeypatch.setattr(fp16, "_CHUNK", 1000)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((37, 101)) * 10.0 ** rng.integers(-9, 7, (37, 101))).astype(np.float32)
    values[0, :4] = [np.inf, -np.inf, 1e-9, -70000.0]
    np.testing.assert_array_equal(fp16.to_float16(values), convert_np_to_float16(values))


def test_a_mask_fill_beyond_fp16_stays_finite_where_it_enters_fp16():
    """Eager attention's masked_fill with torch.finfo(float32).min: the guard keeps the Where in FP32, and the
    value is clipped to -65504 where it enters FP16 (a Cast would make it -inf; a row masked whole would then be
    all -inf, NaN after Softmax on ORT's CUDA kernels). The masked-whole row keeps its FP32 answer: uniform."""
    from onnx import TensorProto, helper

    fill = np.float32(np.finfo(np.float32).min)
    nodes = [helper.make_node("Where", ["keep", "scores", "fill"], ["masked"], name="mask_fill"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"], name="context")]
    graph = helper.make_graph(
        nodes, "masked_softmax",
        [helper.make_tensor_value_info("keep", TensorProto.BOOL, [4, 8]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [4, 8]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        initializer=[numpy_helper.from_array(np.array(fill), "fill")])
    model = infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), strict=False)
    rng = np.random.default_rng(3)
    keep = rng.random((4, 8)) > 0.4
    keep[2] = False  # a row masked whole, as a padded query row of DeBERTa's [query x key] mask
    feed = {"keep": keep, "scores": rng.standard_normal((4, 8)).astype(np.float32),
            "v": rng.standard_normal((8, 16)).astype(np.float32)}
    fp16_graph = to_graph(model)
    result = parse_pipeline("fp16")[0].run(fp16_graph, PassContext(verification_feeds=[feed]))
    assert result.stats["fp32_nodes_guarded"] == 1 and result.stats["casts_saturated"] == 1
    new = to_model(fp16_graph)
    cast = next(n for n in new.graph.node if n.op_type == "Cast" and n.output[0] == "masked")
    assert next(n for n in new.graph.node if cast.input[0] in n.output).op_type == "Clip"
    new.graph.output.append(helper.make_empty_tensor_value_info("masked"))  # the FP16 scores Softmax takes
    got, masked = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert masked.dtype == np.float16 and np.isfinite(masked).all() and masked.min() == -fp16.FP16_MAX
    want = _run(model, [feed])
    assert np.allclose(want[2], feed["v"].mean(axis=0), atol=1e-5)  # FP32: the masked-whole row is uniform
    assert np.isfinite(got).all() and np.abs(got - want).max() < 0.02
