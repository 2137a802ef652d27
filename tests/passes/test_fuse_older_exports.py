"""The new families as an older transformers exports them (5.17, torch 2.11: tests/fixtures/transformers_5_17,
made by its make.py on the GPU machine), through a user's own ``torch.onnx.export``: every attention fuses,
exactly, on ORT and on the standard targets. DeBERTa's export there holds ``If`` nodes on ``q.size(-2) !=
k.size(-2)``; ``fold`` decides them from the symbolic shapes (``decide_dims``), else nothing of DeBERTa fused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

from .test_fuse_new_families import LAYERS, outputs_on, seeded_feeds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "transformers_5_17"
FAMILIES = {"deberta-v3": "deberta-v2", "modernbert": "modernbert", "mpnet": "mpnet"}


@pytest.mark.parametrize("fixture", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_older_transformers_exports_fuse_every_attention_exactly(fixture, target):
    model = load_model(FIXTURES / f"{fixture}-tiny.onnx")
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target=target), verify="numeric")
    fused = manager.run(model)
    fold, fuse = (record.stats for record in manager.records)
    assert fuse["attention"] == fuse["attention_blocks"] == LAYERS[FAMILIES[fixture]]
    if fixture == "deberta-v3":
        assert sum(n.op_type == "If" for n in model.graph.node) == 2  # one per layer, as exported
        assert fold["dims_decided"] == 2 and not any(n.op_type == "If" for n in fused.graph.node)
    feeds = seeded_feeds(model)
    padded = {name: value.copy() for name, value in feeds[1].items()}
    padded["attention_mask"][1, 25:] = 0  # right padding: a row of 25 real tokens in 40
    for before, after in zip(outputs_on(model, feeds + [padded]), outputs_on(fused, feeds + [padded])):
        assert np.abs(before - after).max() <= 1e-4


def test_a_size_test_between_different_dimensions_is_left_alone():
    """decide_dims decides only what the shapes prove: Shape(a)[1] == Shape(b)[1] with a's and b's second
    dimensions two different graph inputs' symbols stays an Equal, and the graph's answer follows the data."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper

    from tqc.compiler.io.graph import to_graph, to_model
    from tqc.passes.fold_dims import decide_dims, symbol_shapes

    const = lambda name, value: helper.make_tensor(name, TensorProto.INT64, [1], [value])  # noqa: E731
    nodes = [helper.make_node("Shape", [x], [f"{x}_shape"]) for x in "ab"]
    nodes += [helper.make_node("Slice", [f"{x}_shape", "one", "two"], [f"{x}_dim"]) for x in "ab"]
    nodes += [helper.make_node("Equal", ["a_dim", "b_dim"], ["same"]),
              helper.make_node("Equal", ["a_dim", "a_dim_again"], ["same_a"]),
              helper.make_node("Slice", ["a_shape", "one", "two"], ["a_dim_again"])]
    graph = helper.make_graph(nodes, "sizes", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "s"]),
                                               helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", "t"])],
                              [helper.make_tensor_value_info("same", TensorProto.BOOL, [1]),
                               helper.make_tensor_value_info("same_a_out", TensorProto.BOOL, [1])],
                              initializer=[const("one", 1), const("two", 2)])
    graph.node.append(helper.make_node("Identity", ["same_a"], ["same_a_out"]))
    g = to_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    equals = [n for n in g.nodes if n.op == "Equal"]
    # a's second dimension against itself; 's' against 't' is not decided
    assert decide_dims(equals, g, symbol_shapes(g)) == 1
    identity = next(n for n in g.nodes if n.op == "Identity")
    assert isinstance(identity.inputs[0], gs.Constant) and identity.inputs[0].values.tolist() == [True]
    assert any(n.op == "Equal" and n.outputs[0].name == "same" for n in g.nodes)  # still computed
    import onnxruntime as ort

    session = ort.InferenceSession(to_model(g).SerializeToString(), providers=["CPUExecutionProvider"])
    for t, want in ((5, True), (6, False)):
        got = session.run(None, {"a": np.zeros((2, 5), np.float32), "b": np.zeros((2, t), np.float32)})
        assert bool(got[0][0]) is want and bool(got[1][0]) is True
