"""qdq{split}'s float part recomputed from the layer that produces the split channels (``split_producer``): an FFN
output layer's outlier channels come from a few columns of the FFN input layer and its GELU, so OpenVINO keeps that
layer's fused INT8 chain (its output leaves as u8) and the float part reads the float input instead of gathering
the GELU output."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.passes.qdq.split_producer import find_producer, recompute
from tqc.passes.rewrite import NodeBuilder

from .test_qdq_shift import quantized, run

K, H, N = 16, 32, 8


def ffn_model() -> onnx.ModelProto:
    """x [b, 4, K] -> MatMul(W1) -> Add(b1) -> GELU (the Erf form an opset-17 export has) -> g -> MatMul(W2) ->
    Add(b2) -> y. Input channel 0 is a flag (10 at the first token, 0 elsewhere) that W1 turns into 30 in g's
    channel 7 there: the [CLS] outlier of an FFN output layer's input."""
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((K, H)) / 4).astype(np.float32)
    w1[0] = 0.0
    w1[0, 7] = 3.0
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal(H).astype(np.float32) / 4, "b1"),
             numpy_helper.from_array((rng.standard_normal((H, N)) / 4).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="ffn1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="ffn1_bias"),
             helper.make_node("Div", ["h", "sqrt2"], ["d"], name="gelu_div"),
             helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
             helper.make_node("Mul", ["h", "e1"], ["m"], name="gelu_mul"),
             helper.make_node("Mul", ["m", "half"], ["g"], name="gelu_half"),
             helper.make_node("MatMul", ["g", "w2"], ["y0"], name="ffn2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="ffn2_bias")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, N])], initializer=inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def ffn_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal((16, 4, K)).astype(np.float32)
        x[..., 0] = 0.0
        x[:, 0, 0] = 10.0
        out.append({"x": x})
    return out


def g_of(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["g"], feed)[0]


def test_the_producer_recomputes_the_channels_exactly_with_per_channel_constants_sliced():
    model = ffn_model()
    graph = gs.import_onnx(model)
    producer = find_producer(graph, "g", (3, 7))
    assert producer is not None and producer.input == "x" and producer.root == "h0"
    assert [n.op for n in producer.nodes] == ["Add", "Div", "Erf", "Add", "Mul", "Mul"]
    np.testing.assert_array_equal(producer.columns, numpy_helper.to_array(model.graph.initializer[0])[:, [3, 7]])
    assert producer.nodes[0].inputs[1].shape == (2,)  # the bias, on the two channels; the scalars stay
    build = NodeBuilder(graph, "probe")
    part = recompute(graph, producer, build, np.float32)
    part.name = "part"
    graph.outputs.append(part)
    probe = gs.export_onnx(graph.cleanup())
    import onnxruntime as ort

    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = ffn_feeds(1, 3)[0]
    np.testing.assert_allclose(session.run(["part"], feed)[0], g_of(model, feed)[..., [3, 7]], rtol=1e-6, atol=1e-6)
    # x is a graph input (no MatMul before it), h0 is the MatMul's output itself: nothing to recompute
    assert find_producer(graph, "x", (0,)) is None and find_producer(graph, "h0", (7,)) is None


@pytest.mark.parametrize("target", ["openvino", "ort-cpu"])
@pytest.mark.parametrize("spec, layers", [("qdq{smooth=0}", {"ffn2"}), ("qdq{smooth=0,split=true}", {"ffn1", "ffn2"})])
def test_openvino_and_ort_cpu_split_the_produced_channels_by_default_and_recomputes_them(target, spec, layers):
    """Without SmoothQuant (which here, with an ordinary weight row behind the outlier, takes most of the error
    itself: 0.63 without the split, 0.80 with, ORT CPU, smooth_cap=1), so that the split's own effect shows."""
    model, calib, held_out = ffn_model(), ffn_feeds(4, 0), ffn_feeds(2, 1)
    plain, _ = quantized(model, target, "qdq{smooth=0,split=false}", calib)
    split, stats = quantized(model, target, spec, calib)
    # ffn2's channel 7 comes from ffn1 (recomputed: no Gather); ffn1's input channel 0 is a graph input, split
    # only on request (gathered)
    gathers = [n for n in split.graph.node if n.op_type == "Gather"]
    assert stats["split_channels"] == len(layers) and len(gathers) == len(layers) - 1, stats
    floats = [n for n in split.graph.node if n.op_type == "MatMul" and n.name.startswith("ffn2_tqc_split")]
    assert len(floats) == 1  # the recomputed columns of ffn1
    errors = [sum(float(((run(q, f) - run(model, f)) ** 2).sum()) for f in held_out) for q in (plain, split)]
    print(f"{target} {spec}: held-out squared error {errors[1]:.4g} split, {errors[0]:.4g} without")
    assert errors[1] < errors[0] / 2, errors


def test_the_recomputed_part_on_trt_is_not_used():
    """OpenVINO and ORT CPU recompute (measured there); trt gathers (TensorRT's cost of either is not measured)."""
    model, calib = ffn_model(), ffn_feeds(4, 0)
    for target in ("trt",):
        split, stats = quantized(model, target, "qdq{split=true}", calib)
        assert stats["split_channels"] == 2 and sum(n.op_type == "Gather" for n in split.graph.node) == 2, target
