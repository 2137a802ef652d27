"""``passes/qdq/openvino.fold_zero_points``: a linear layer's UINT8 input zero point moves into its bias (zero point
0 at run time, OpenVINO's fast INT8 path) without changing the layer's output; and the openvino target does it."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph
from tqc.passes.qdq.openvino import fold_zero_points

from .test_qdq import quantize, two_consumers_model


def qdq_layers() -> onnx.ModelProto:
    """x ─► Q(u8, zp 131) ─► DQ ─► MatMul(DQ(W int8, per channel)) ─► Add(bias) ─► y1
                              └──► MatMul(DQ(W2 int8))                         ─► y2  (no bias)
       r ─► Q(u8, zp 0)   ─► DQ ─► MatMul(W3 float)                            ─► y3  (zero point 0: untouched)"""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.integers(-127, 128, (16, 8)).astype(np.int8) for _ in range(2))
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("s", np.array(0.05, np.float32)), ("zp", np.array(131, np.uint8)), ("zp0", np.array(0, np.uint8)),
        ("w1", w1), ("w2", w2), ("ws1", rng.uniform(0.001, 0.01, 8).astype(np.float32)),
        ("ws2", rng.uniform(0.001, 0.01, 8).astype(np.float32)), ("wzp", np.zeros(8, np.int8)),
        ("b1", rng.standard_normal(8).astype(np.float32)),
        ("w3", rng.standard_normal((16, 4)).astype(np.float32)))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w1", "ws1", "wzp"], ["w1d"], axis=1),
             helper.make_node("DequantizeLinear", ["w2", "ws2", "wzp"], ["w2d"], axis=1),
             helper.make_node("MatMul", ["xd", "w1d"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["y1"]),
             helper.make_node("MatMul", ["xd", "w2d"], ["y2"], name="mm2"),
             helper.make_node("QuantizeLinear", ["r", "s", "zp0"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "s", "zp0"], ["rd"], name="r_dq"),
             helper.make_node("MatMul", ["rd", "w3"], ["y3"], name="mm3")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 16]) for n in ("x", "r")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", w]) for n, w in (("y1", 8), ("y2", 8),
                                                                                           ("y3", 4))]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feed)


def test_zero_point_moves_into_the_bias_and_the_outputs_stay():
    model = qdq_layers()
    graph = to_graph(model)
    assert fold_zero_points(graph) == 1  # x's DQ (two linear consumers); r's zero point is 0 already
    graph.cleanup().toposort()
    folded = gs.export_onnx(graph)
    onnx.checker.check_model(folded)
    dq = {n.name: n for n in graph.nodes if n.op == "DequantizeLinear"}
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == "x")
    assert int(dq["x_dq"].inputs[2].values) == 0 and int(q.inputs[2].values) == 131  # codes stay asymmetric
    assert dq["x_dq"].inputs[2] is not q.inputs[2]
    assert [n.op for n in graph.nodes].count("Add") == 2  # mm2 had no bias: one Add of the correction
    rng = np.random.default_rng(1)
    feed = {"x": rng.uniform(-6, 6, (5, 16)).astype(np.float32), "r": rng.uniform(0, 12, (5, 16)).astype(np.float32)}
    before, after = run(model, feed), run(folded, feed)
    for a, b in zip(before, after):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))
    assert np.abs(before[0]).max() > 1.0  # the layers compute something: the shift x + zp*s is not small
    assert fold_zero_points(graph) == 0  # twice changes nothing


def test_a_dq_feeding_anything_but_linear_layers_keeps_its_zero_point():
    model = qdq_layers()
    extra = helper.make_node("Relu", ["xd"], ["y4"])
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("y4", TensorProto.FLOAT, ["b", 16]))
    graph = to_graph(model)
    assert fold_zero_points(graph) == 0
    assert int(next(n for n in graph.nodes if n.name == "x_dq").inputs[2].values) == 131


def test_openvino_target_folds_zero_points_and_keeps_the_numbers():
    """qdq --target openvino: every linear input's DequantizeLinear has zero point 0 and its Q keeps the asymmetric
    zero point; the quantized graph stays as close to the float graph as the asymmetric placement."""
    model = two_consumers_model()
    q, stats, _ = quantize(model, "openvino")  # verified numerically against the float graph by the manager
    assert stats["zero_points_folded"] >= 1
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    activation_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    assert activation_dqs and all(int(inits[n.input[2]]) == 0 for n in activation_dqs)
    assert any(int(inits[n.input[2]]) != 0 for n in q.graph.node if n.op_type == "QuantizeLinear")
