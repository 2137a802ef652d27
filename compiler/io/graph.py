"""Conversion between ``onnx.ModelProto`` and onnx-graphsurgeon graphs, keeping what gs would drop.

gs rebuilds the ModelProto on export; ``to_model`` carries over the IR version, producer and metadata of
the original so that a pass that changes nothing gives back an equivalent model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.version import __version__
from tqc.compiler.io.skeleton import stand_in, travels_as_stand_in


def to_graph(model: onnx.ModelProto, weights: dict | None = None) -> gs.Graph:
    """Import ``model``; ``weights`` (a lean load's arrays) fill its shape-only stand-ins."""
    graph = gs.import_onnx(model)
    _detach_imports(graph)
    if weights:
        attach_weights(graph, weights)
    return graph


def _detach_imports(graph: gs.Graph) -> None:
    """gs keeps the model's ``opset_import`` field itself as the graph's imports, and with it the whole
    ModelProto alive: copy the entries so the model can be freed once its weights are loaded."""
    graph.import_domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in (graph.import_domains or [])]
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                _detach_imports(value)


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    return _finish_header(gs.export_onnx(graph, do_type_check=True), like)


def _ir_version(written: int, like: onnx.ModelProto | None) -> int:
    """The source's IR version, or at most 10: onnx's newest default (14 with onnx 1.23) is more than an older
    ONNX Runtime loads (1.31 stops at 13)."""
    return max(like.ir_version if like is not None else 0, min(written, 10))


def _finish_header(model: onnx.ModelProto, like: onnx.ModelProto | None) -> onnx.ModelProto:
    if like is not None:
        model.ir_version = _ir_version(model.ir_version, like)
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
        model.model_version = like.model_version
        model.doc_string = like.doc_string
    model.producer_name = "tqc"
    model.producer_version = __version__
    return model


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set ``metadata_props`` keys of ``model`` (an existing key's value is replaced)."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(value)))


def attach_weights(graph: gs.Graph, weights: dict) -> None:
    """Give the graph's stand-in constants (a lean load's skeleton) their arrays; see ``tqc.compiler.io.lean``."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.name in weights:
            tensor.values = weights[tensor.name]
            tensor.data_location = None


def ensure_domain(graph: gs.Graph, domain: str, version: int = 1) -> None:
    """Declare an operator domain (e.g. com.microsoft) in the graph's imports."""
    imports = list(graph.import_domains or [])
    if not any(imp.domain == domain for imp in imports):
        if not imports:
            imports.append(onnx.helper.make_opsetid("", int(graph.opset)))
        imports.append(onnx.helper.make_opsetid(domain, version))
        graph.import_domains = imports


def skeleton_of_graph(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A ModelProto of ``graph`` whose large constants carry dtype and shape but no data.

    Lets the checker and shape inference run after every pass without exporting (and copying) the weights;
    see ``tqc.compiler.io.skeleton`` for the stand-in convention.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    nodes = [OnnxExporter.export_node(node) for node in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(t, True) for t in graph.inputs]
    outputs = [OnnxExporter.export_value_info_proto(t, True) for t in graph.outputs]
    initializers, value_info = [], []
    io_names = {t.name for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            shape = tuple(tensor.shape)
            if travels_as_stand_in(shape):
                dtype = tensor._values.dtype if hasattr(tensor._values, "dtype") else tensor.values.dtype
                initializers.append(stand_in(tensor.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
            else:
                initializers.append(OnnxExporter.export_tensor_proto(tensor))
        elif tensor.name not in io_names and (tensor.dtype is not None or tensor.shape is not None):
            value_info.append(OnnxExporter.export_value_info_proto(tensor, True))
    proto = onnx.helper.make_graph(nodes, graph.name, inputs, outputs, initializer=initializers,
                                   value_info=value_info)
    imports = list(graph.import_domains or [onnx.helper.make_opsetid("", int(graph.opset))])
    model = onnx.helper.make_model(proto, opset_imports=imports)
    model.ir_version = _ir_version(model.ir_version, like)  # the skeleton is what verification runs
    return model


def lean_of_graph(graph: gs.Graph, like: onnx.ModelProto | None = None):
    """The graph as a ``LeanModel``: its skeleton (with ``to_model``'s header) and its large constants'
    own arrays, for ``tqc.compiler.io.lean.write_lean``. None where gs's exporter must do the work (local
    functions, constants exported in another dtype than they hold)."""
    from tqc.compiler.io.lean import LeanModel

    if graph.functions:
        return None
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    if any(getattr(t, "_export_dtype", None) is not None for t in constants):
        return None
    from onnx_graphsurgeon.exporters.onnx_exporter import update_import_domains

    update_import_domains(graph)  # as gs.export_onnx does: every domain a node uses is declared
    skeleton = _finish_header(skeleton_of_graph(graph, like=like), like)
    stand_ins = {t.name for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    return LeanModel(skeleton, {t.name: t.values for t in constants if t.name in stand_ins})


def update_tensor_types(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Copy inferred dtypes and shapes from ``model``'s value_info onto the graph's variables."""
    known = {v.name: v for v in model.graph.value_info}
    for tensor in graph.tensors().values():
        info = known.get(tensor.name)
        if info is None or not isinstance(tensor, gs.Variable):
            continue
        tt = info.type.tensor_type
        if tt.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
