"""Intermediate activations of a model on real inputs: every float tensor exposed as an output.

Used by the ``fp16`` overflow guard (which tensors exceed the FP16 range), by ``tqc diff --layerwise`` and by
calibration. Statistics are reduced batch by batch, so memory stays bounded by the model, not the data.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx

from tqc.compiler.feeds import Feed

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def float_tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of every tensor whose type shape inference (or the graph) knows."""
    types: dict[str, int] = {}
    for value in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def with_intermediate_outputs(model: onnx.ModelProto, names: Iterable[str] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also outputs the named tensors (default: every float node output)."""
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    types = float_tensor_types(model)
    existing = {o.name for o in model.graph.output}
    wanted = list(names) if names is not None else [
        out for node in model.graph.node for out in node.output if out and types.get(out) in FLOAT_TYPES]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    added = []
    for name in wanted:
        if name in existing or name not in types:
            continue
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        added.append(name)
    return copy, [o.name for o in model.graph.output] + added


def stream_intermediates(model: onnx.ModelProto, feeds: Iterable[Feed], reduce: Callable[[str, np.ndarray], None],
                         names: Iterable[str] | None = None) -> list[str]:
    """Run on ORT CPU (optimizations off) and call ``reduce(name, value)`` for every exposed tensor."""
    import onnxruntime as ort

    exposed, output_names = with_intermediate_outputs(model, names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for feed in feeds:
        values = session.run(output_names, feed)
        for name, value in zip(output_names, values):
            reduce(name, value)
    return output_names


def max_abs_per_tensor(model: onnx.ModelProto, feeds: Iterable[Feed]) -> dict[str, float]:
    peaks: dict[str, float] = {}

    def reduce(name: str, value: np.ndarray) -> None:
        if value.size and np.issubdtype(value.dtype, np.floating):
            finite = np.abs(value[np.isfinite(value)]) if not np.all(np.isfinite(value)) else np.abs(value)
            peak = float(finite.max()) if finite.size else float("inf")
            peaks[name] = max(peaks.get(name, 0.0), peak)

    stream_intermediates(model, feeds, reduce)
    return peaks
