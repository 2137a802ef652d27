"""fp16 and qdq in one pipeline: an FP16 graph with INT8 islands whose Q/DQ scales are float16 (opset 19),
valid for TensorRT's strongly typed networks and ONNX Runtime, checked numerically on ORT CPU."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.tools.trt_check import check_trt
from tqc.passes.base import PassContext


def _run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds]).astype(np.float64)


@pytest.mark.parametrize("target", ["trt", "ort-cuda"])
@pytest.mark.parametrize("order", ["fp16,qdq", "qdq,fp16"])
def test_fp16_graph_with_int8_islands(target, order, exports):
    path = exports.get("bert", size="tiny")
    model = load_model(path)
    feeds = synthesize_feeds(model, count=2)
    ctx = PassContext(target=target, verification_feeds=feeds)
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline(f"fold,fuse,{order}"), ctx, verify="numeric")
    q = manager.run(model)  # before: shape inference stopped on a float16 scale (both orders)
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert all(r.verify["numeric"]["passed"] for r in manager.records)
    qdq_stats = next(r.stats for r in manager.records if r.name == "qdq")
    assert qdq_stats["quantized_matmuls"] >= 2 * 3
    # Every Q/DQ scale has the float type of the tensor it quantizes: float16 inside the FP16 graph.
    consts = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    scales = [consts[n.input[1]].dtype for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(dtype == np.float16 for dtype in scales)
    matmul_weights = [consts[n.input[1]] for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    assert all(w.dtype == np.float16 for w in matmul_weights)  # float MatMuls left are FP16 too
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in q.graph.output)  # FP32 outputs kept
    if target == "trt":
        report = check_trt(q)
        assert report.ok, [f.message for f in report.findings]
    # Numbers: the mixed graph against FP32 on inputs it was not calibrated on.
    held_out = synthesize_feeds(model, count=2, seed=7)
    reference, mixed = _run(model, held_out).reshape(-1), _run(q, held_out).reshape(-1)
    cosine = reference @ mixed / np.linalg.norm(reference) / np.linalg.norm(mixed)
    assert cosine >= 0.99
