"""A Constant node whose value is saved as external data (``onnx.save_model(..., save_as_external_data=True)``
moves node attributes too; large exports such as XLM-R large have them) passes load-time validation and
compiles: the checker's skeleton makes that value a stand-in as it does for initializers."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.cli.main import main


def test_external_constant_attribute_compiles_with_fp16(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    bias = rng.standard_normal((64,)).astype(np.float32) * 0.1
    nodes = [helper.make_node("Constant", [], ["w"], name="Constant_w", value=numpy_helper.from_array(weight, "w")),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                              initializer=[numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = tmp_path / "model.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0, convert_attribute=True)
    saved = onnx.load(str(source), load_external_data=False)
    assert saved.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    out = tmp_path / "model.fp16.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", str(source), "-p", "fp16", "-o", str(out)])
    assert exit_info.value.code == 0
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weight + bias, atol=2e-2)
