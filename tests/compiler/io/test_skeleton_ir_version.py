"""The skeleton verification runs keeps an IR version older ONNX Runtimes load.

Found on the GPU machine (onnx 1.23.1, onnxruntime-gpu 1.31.1): ``onnx.helper.make_model`` stamps IR version 14,
ORT 1.31 loads at most 13, so every verified ``tqc compile`` there failed inside the reference run.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper

from tqc.compiler.io.graph import skeleton_of_graph


def _graph(ir_version: int) -> tuple[gs.Graph, onnx.ModelProto]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], np.arange(6, dtype=np.float32))
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return gs.import_onnx(model), model


def test_skeleton_without_a_source_model_stays_at_ir_10_or_less():
    graph, _ = _graph(8)
    assert skeleton_of_graph(graph).ir_version <= 10


def test_skeleton_keeps_the_source_models_ir_version_and_runs():
    graph, model = _graph(8)
    skeleton = skeleton_of_graph(graph, like=model)
    assert skeleton.ir_version == 10  # max(source 8, the cap 10): what to_model writes too
    x = np.ones((2, 3), np.float32)
    out = ort.InferenceSession(skeleton.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, x + np.arange(6, dtype=np.float32).reshape(2, 3))
    graph, model = _graph(11)
    assert skeleton_of_graph(graph, like=model).ir_version == 11  # a newer source keeps its own
