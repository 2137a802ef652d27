"""fold's Reshape targets read from Shape: a part that reads the dimension the reshaped tensor has at the same
position becomes 0 (copy), checked by running the graph before and after at several shapes; a part that reads
another dimension, or one inference cannot name, stays as it was."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext


def heads_split(first_read: int):
    """h [B, S, 8] -> x = h @ W [B, S, 24] -> Reshape(x, [Shape(h)[first_read], Shape(h)[1], 3, 2, 4])."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 24)).astype(np.float32), "w")]
    for name, value in (("i0", first_read), ("i1", 1), ("ax", [0]), ("rest", [3, 2, 4])):
        inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    nodes = [helper.make_node("MatMul", ["h", "w"], ["x"]), helper.make_node("Shape", ["h"], ["hs"]),
             helper.make_node("Gather", ["hs", "i0"], ["d0"], axis=0), helper.make_node("Gather", ["hs", "i1"], ["d1"], axis=0),
             helper.make_node("Unsqueeze", ["d0", "ax"], ["u0"]), helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"]),
             helper.make_node("Concat", ["u0", "u1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "sequence", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, h):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]


def test_a_reshape_target_read_from_shapes_becomes_copies_and_keeps_the_answer():
    model = heads_split(first_read=0)
    graph = to_graph(model)
    result = parse_pipeline("fold")[0].run(graph, PassContext())
    folded = to_model(graph)
    assert result.stats["reshape_dims_copied"] == 1
    assert not any(n.op_type in ("Shape", "Gather", "Concat") for n in folded.graph.node)
    target = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.name.endswith("_target"))
    assert target.tolist() == [0, 0, 3, 2, 4]
    for shape in ((1, 5, 8), (3, 11, 8)):
        h = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        assert np.array_equal(run(model, h), run(folded, h))


def test_a_read_of_another_dimension_is_left_alone():
    model = heads_split(first_read=1)  # [S, S, 3, 2, 4]: position 0 reads the sequence, x has the batch there
    graph = to_graph(model)
    result = parse_pipeline("fold")[0].run(graph, PassContext())
    assert result.stats["reshape_dims_copied"] == 0
    assert any(n.op == "Shape" for n in graph.nodes)
    h = np.random.default_rng(2).standard_normal((4, 4, 8)).astype(np.float32)  # runs only where B == S
    assert np.array_equal(run(model, h), run(to_model(graph), h))
