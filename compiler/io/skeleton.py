"""Skeletons: a model without its large tensor data, for the checker and shape inference.

    model (440 MB)                          skeleton (kilobytes)
      initializer W [384, 1536] float32  ->   W: dtype + dims, data "external" in an empty file
      initializer axes [1] int64         ->   axes (small: kept, shape arithmetic reads it)

One rule decides what travels as a stand-in, for proto models (``skeleton``) and onnx-graphsurgeon graphs
(``tqc.compiler.io.graph.skeleton_of_graph``), at load (``tqc.compiler.io.lean``) and in load-time checks
(``tqc.compiler.io.model_check``) alike: more than ``STAND_IN_ELEMENTS`` elements. (It counts elements, not
bytes: the written models' layout depends on it, and it was the graph writer's rule.)
"""

from __future__ import annotations

import onnx


def travels_as_stand_in(dims) -> bool:
    """Whether a tensor of these dims is replaced by a shape-only stand-in in a skeleton."""
    count = 1
    for dim in dims:
        count *= int(dim)
    return count > STAND_IN_ELEMENTS


STAND_IN_ELEMENTS = 1024  # tensors above this many elements travel as shape-only stand-ins
SKELETON_DATA = "tqc-skeleton.bin"


def stand_in(name: str, data_type: int, dims) -> onnx.TensorProto:
    """A shape-only initializer: dtype and dims, its data 'external' in an empty file (``SKELETON_DATA``)."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", SKELETON_DATA
    return tensor


def model_header(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model's versions, opsets, metadata and functions, without its graph."""
    header = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(header, name, getattr(model, name))
    header.opset_import.extend(model.opset_import)
    header.metadata_props.extend(model.metadata_props)
    header.functions.extend(model.functions)
    return header


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large tensor data: same graph, same initializer names, types and dims.

    Checker and shape inference only need types and dims of weights (and the values of small, shape-like
    tensors, which stay). Working on the skeleton keeps verification of a 440 MB or 4 GB model in
    milliseconds and avoids copying its weights; large tensors point at an empty external file.
    """
    light = model_header(model)
    graph, source = light.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)  # types known from earlier passes (contrib op outputs)
    for tensor in source.initializer:
        if travels_as_stand_in(tensor.dims) or tensor.data_location == onnx.TensorProto.EXTERNAL:
            graph.initializer.append(stand_in(tensor.name, tensor.data_type, tensor.dims))
        else:
            graph.initializer.append(tensor)
    return light
