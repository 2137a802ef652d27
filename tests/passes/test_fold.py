import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph, to_model
from tqc.passes.base import PassContext
from tqc.passes.fold import Fold, merge_duplicates, remove_identities

from ..conftest import make_mlp


def run(model, feed):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def apply_fold(model):
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    result = Fold().run(graph, PassContext())
    return to_model(graph, like=model), result


def test_fold_removes_constant_math_and_identity_exactly():
    model = make_mlp()
    folded, result = apply_fold(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["MatMul", "Add", "Relu", "MatMul"]
    assert result.stats["nodes_before"] == 6 and result.stats["nodes_after"] == 4
    assert result.stats["identity_removed"] == 1
    feed = {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, feed)[0], run(folded, feed)[0])


def test_identity_feeding_graph_output_keeps_the_output_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
                              "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, result = apply_fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Relu"]
    assert folded.graph.node[0].output[0] == "y"
    assert result.stats["identity_removed"] == 1


def test_identity_from_graph_input_to_output_stays():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, result = apply_fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Identity"]
    assert result.stats["identity_removed"] == 0


def test_shape_of_static_dimension_folds_and_the_batch_read_becomes_a_copy():
    # Reshape(x, Concat(Gather(Shape(x), 0), [-1])) with a dynamic batch and static features:
    # the static dim folds into a constant, the batch read becomes 0 (Reshape's copy: x has the batch there,
    # fold_dims.py): no Shape arithmetic is left (before that rule, the two equal Shape chains merged).
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array([2], np.int64), "i2")]
    nodes = []
    for tag, out in (("a", "y"), ("b", "z")):
        nodes += [
            helper.make_node("Shape", ["x"], [f"s_{tag}"]),
            helper.make_node("Gather", [f"s_{tag}", "i0"], [f"b_{tag}"], axis=0),
            helper.make_node("Gather", [f"s_{tag}", "i1"], [f"f1_{tag}"], axis=0),
            helper.make_node("Gather", [f"s_{tag}", "i2"], [f"f2_{tag}"], axis=0),
            helper.make_node("Mul", [f"f1_{tag}", f"f2_{tag}"], [f"f_{tag}"]),
            helper.make_node("Concat", [f"b_{tag}", f"f_{tag}"], [f"shape_{tag}"], axis=0),
            helper.make_node("Reshape", ["x", f"shape_{tag}"], [out]),
        ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    folded, result = apply_fold(model)
    ops = sorted(n.op_type for n in folded.graph.node)
    assert ops == ["Reshape", "Reshape"] and result.stats["reshape_dims_copied"] >= 1  # both graph outputs
    assert all(numpy_helper.to_array(t).tolist() == [0, 8] for t in folded.graph.initializer)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 4, 2)).astype(np.float32)}
    for a, b in zip(run(model, feed), run(folded, feed)):
        np.testing.assert_array_equal(a, b)


def test_merge_duplicates_leaves_graph_outputs_alone():
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    a = gs.Variable("a", dtype=np.float32, shape=[2])
    b = gs.Variable("b", dtype=np.float32, shape=[2])
    graph = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[a]), gs.Node("Relu", inputs=[x], outputs=[b])],
                     inputs=[x], outputs=[a, b], opset=17)
    assert merge_duplicates(graph) == 0


def test_remove_identities_reroutes_consumers():
    graph = to_graph(make_mlp())
    assert remove_identities(graph) == 1
    assert not any(n.op == "Identity" for n in graph.nodes)
