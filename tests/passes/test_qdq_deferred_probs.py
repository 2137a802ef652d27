"""qdq's deferred normalization (``probs=deferred``): Softmax -> Q/DQ -> probs x V becomes exp(s - max s) -> Q/DQ
(1/127) -> MatMul -> Div by the quantized row sums. On a hand-built attention core the graph computes exactly that
formula, and where rows spread their attention its error to float softmax(s) V is lower than the normalized form's;
on a tiny BERT compiled for trt every core is deferred, both attention MatMuls stay INT8 and the INT8 graph's
error drops; targets that keep attention in float refuse the option."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext
from tqc.passes.qdq.deferred_probs import defer_normalization

from .test_qdq_value_equalize import outputs, token_batches

SHAPE_S, SHAPE_V = (2, 3, 6, 6), (2, 3, 6, 4)


def core(axis: int = -1, opset: int = 17) -> onnx.ModelProto:
    """scores, v -> Softmax -> Q/DQ (int8, 1/127) -> MatMul(probs, v) -> context: the trt placement's core."""
    scores = gs.Variable("scores", np.float32, SHAPE_S)
    v = gs.Variable("v", np.float32, SHAPE_V)
    probs, codes, dequantized = (gs.Variable(n, np.float32) for n in ("probs", "codes", "dequantized"))
    codes.dtype = np.int8
    context = gs.Variable("context", np.float32, (2, 3, 6, 4))
    scale, zero = gs.Constant("scale", np.array(1 / 127, np.float32)), gs.Constant("zero", np.array(0, np.int8))
    nodes = [gs.Node("Softmax", "softmax", {"axis": axis}, [scores], [probs]),
             gs.Node("QuantizeLinear", "q", inputs=[probs, scale, zero], outputs=[codes]),
             gs.Node("DequantizeLinear", "dq", inputs=[codes, scale, zero], outputs=[dequantized]),
             gs.Node("MatMul", "pv", inputs=[dequantized, v], outputs=[context])]
    graph = gs.Graph(nodes=nodes, inputs=[scores, v], outputs=[context], opset=opset)
    return gs.export_onnx(graph)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def spread_feeds(seed: int) -> dict[str, np.ndarray]:
    """Scores close to one another (attention spread over the row), a padded key masked off in one row."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 0.3, SHAPE_S).astype(np.float32)
    scores[0, :, :, -1] = -10000.0
    return {"scores": scores, "v": rng.normal(0.5, 1.0, SHAPE_V).astype(np.float32)}


@pytest.mark.parametrize("opset", [17, 18])
def test_deferred_core_computes_the_formula_and_lowers_the_error(opset):
    model = core(opset=opset)
    graph = to_graph(model)
    assert defer_normalization(graph) == 1
    assert not [n for n in graph.nodes if n.op == "Softmax"]
    deferred = to_model(graph, model)
    onnx.checker.check_model(deferred)
    errors = {"normalized": [], "deferred": []}
    for seed in range(4):
        feeds = spread_feeds(seed)
        s, v = feeds["scores"].astype(np.float64), feeds["v"].astype(np.float64)
        e = np.exp(s - s.max(-1, keepdims=True))
        codes = np.clip(np.rint(e * 127), -128, 127) / 127
        expected = (codes @ v) / codes.sum(-1, keepdims=True)
        got = run(deferred, feeds)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        exact = softmax(s) @ v
        errors["deferred"].append(np.abs(got - exact).mean())
        errors["normalized"].append(np.abs(run(model, feeds) - exact).mean())
    assert np.mean(errors["deferred"]) < 0.5 * np.mean(errors["normalized"]), errors


def test_other_softmax_forms_are_left_alone():
    model = core(axis=2)  # a Softmax over another axis
    graph = to_graph(model)
    assert defer_normalization(graph) == 0
    assert [n.op for n in graph.nodes].count("Softmax") == 1
    # without the probabilities' Q/DQ (attention in float) there is nothing to defer either
    graph = to_graph(core())
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear")
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    matmul.inputs = [graph.tensors()["probs"], matmul.inputs[1]]
    dq.outputs.clear()
    graph.cleanup()
    assert defer_normalization(graph) == 0
    # probabilities that are also a graph output keep their meaning and name
    graph = to_graph(core())
    graph.outputs.append(graph.tensors()["probs"])
    assert defer_normalization(graph) == 0 and "probs" in [t.name for t in graph.outputs]


@pytest.fixture(scope="module")
def fused(exports) -> onnx.ModelProto:
    model = load_model(exports.get("bert", size="tiny"))
    return PassManager(parse_pipeline("fold,fuse"), PassContext(target="trt"), verify="none").run(model)


def int8_run(model: onnx.ModelProto, probs: str, calib, target: str = "trt") -> tuple[onnx.ModelProto, dict]:
    ctx = PassContext(target=target)
    ctx.calibration_source = calib
    manager = PassManager(parse_pipeline(f"qdq{{probs={probs}}}"), ctx, verify="numeric")
    quantized = manager.run(model)
    return quantized, manager.records[-1].stats


def test_trt_defers_every_core_and_keeps_int8_attention(fused):
    calib, held_out = token_batches(4, seed=1), token_batches(2, seed=9)
    plain, plain_stats = int8_run(fused, "normalized", calib)
    deferred, stats = int8_run(fused, "deferred", calib)
    softmaxes = [n for n in fused.graph.node if n.op_type == "Softmax"]
    assert "probs_deferred" not in plain_stats and stats["probs_deferred"] == len(softmaxes) >= 2
    assert stats["attention_bmm"] == plain_stats["attention_bmm"] > 0  # both attention MatMuls stay INT8
    assert not [n for n in deferred.graph.node if n.op_type == "Softmax"]
    reference = outputs(fused, held_out)
    plain_error = float(np.mean((outputs(plain, held_out) - reference) ** 2))
    deferred_error = float(np.mean((outputs(deferred, held_out) - reference) ** 2))
    assert deferred_error < plain_error, (deferred_error, plain_error)


@pytest.mark.parametrize("target", ["openvino", "ort-cpu"])
def test_targets_with_float_attention_refuse(fused, target):
    with pytest.raises(TqcError, match="probs=deferred"):
        int8_run(fused, "deferred", token_batches(1, seed=1), target=target)
