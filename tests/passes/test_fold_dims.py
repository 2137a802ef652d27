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


def merged_heads(second_read: int):
    """q [B, S, 12] -> Transpose(Reshape(q, [0, 0, 3, 4]), [0, 2, 1, 3]) [B, 3, S, 4] -> Reshape(., [-1,
    Shape(r)[second_read], Shape(r)[-1]]) (DeBERTa's heads merged into the batch when ``second_read`` is 1)."""
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), n)
             for n, v in (("heads", [0, 0, 3, 4]), ("i", second_read), ("ax", [0]), ("minus", [-1]),
                          ("last", [-1]), ("end", [2**62]))]
    nodes = [helper.make_node("Reshape", ["q", "heads"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Shape", ["r"], ["rs"]), helper.make_node("Gather", ["rs", "i"], ["d1"], axis=0),
             helper.make_node("Unsqueeze", ["d1", "ax"], ["u1"]),
             helper.make_node("Slice", ["rs", "last", "end"], ["d3"]),
             helper.make_node("Concat", ["minus", "u1", "d3"], ["target"], axis=0),
             helper.make_node("Reshape", ["t", "target"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "merge", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "sequence", 12])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dimension_factors_work_back_through_a_reshape_by_minus_one():
    """Inference names y's first dimension unk__N; its factors are batch * 3, which is what a run gives; with
    the other dimension read, the -1 is batch * sequence."""
    from tqc.passes.fold_dims import dimension_factors, symbol_shapes

    graph = to_graph(merged_heads(second_read=1))
    shapes = symbol_shapes(graph)
    y = next(t for t in graph.tensors().values() if t.name == "y")
    assert str(shapes["y"][0]).startswith("unk__")
    assert dimension_factors(y, 0, shapes) == (3, ("batch",))
    assert dimension_factors(y, 1, shapes) == (1, ("sequence",))
    q = np.zeros((5, 7, 12), np.float32)
    out = ort.InferenceSession(merged_heads(1).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"q": q})[0]
    assert out.shape == (5 * 3, 7, 4)
    other = to_graph(merged_heads(second_read=2))  # [-1, 3, 4]
    shapes = symbol_shapes(other)
    y = next(t for t in other.tensors().values() if t.name == "y")
    assert dimension_factors(y, 0, shapes) == (1, ("batch", "sequence"))
