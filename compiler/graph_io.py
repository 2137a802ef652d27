"""Conversion between ``onnx.ModelProto`` and onnx-graphsurgeon graphs, keeping what gs would drop.

gs rebuilds the ModelProto on export; ``to_model`` carries over the IR version, producer and metadata of
the original so that a pass that changes nothing gives back an equivalent model.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from tqc import __version__


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=True)
    if like is not None:
        model.ir_version = max(like.ir_version, min(model.ir_version, 10))
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
        model.model_version = like.model_version
        model.doc_string = like.doc_string
    model.producer_name = "tqc"
    model.producer_version = __version__
    return model


def opset_of(model_or_graph, domain: str = "") -> int:
    if isinstance(model_or_graph, gs.Graph):
        if domain in ("", "ai.onnx"):
            return int(model_or_graph.opset)
        return int((model_or_graph.import_domains and {d.domain: d.version for d in model_or_graph.import_domains}.get(domain)) or 1)
    for imp in model_or_graph.opset_import:
        if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
            return int(imp.version)
    return 0


def ensure_domain(graph: gs.Graph, domain: str, version: int = 1) -> None:
    """Declare an operator domain (e.g. com.microsoft) in the graph's imports."""
    imports = list(graph.import_domains or [])
    if not any(imp.domain == domain for imp in imports):
        if not imports:
            imports.append(onnx.helper.make_opsetid("", int(graph.opset)))
        imports.append(onnx.helper.make_opsetid(domain, version))
        graph.import_domains = imports
