"""Intermediate activations of a model on real inputs: every float tensor exposed as an output.

Used by the ``fp16`` overflow guard (which tensors exceed the FP16 range), by ``tqc diff --layerwise`` and by
calibration. Statistics are reduced batch by batch, so memory stays bounded by the model, not the data.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.compiler.io.lean import LeanModel
from tqc.compiler.io.structure import float_tensor_types, infer_shapes
from tqc.compiler.runtime.feeds import Feed
from tqc.compiler.runtime.graph_session import GraphSession

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def exposed_model_bytes(model: onnx.ModelProto, names: Iterable[str] | None = None) -> tuple[bytes, list[str]]:
    """Serialized ``model`` that also outputs the named tensors (default: every float node output).

    The outputs are appended, serialized and removed again: no copy of the weights is made.
    """
    if not model.graph.value_info:
        infer_shapes(model, strict=False)
    types = float_tensor_types(model)
    existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    wanted = list(names) if names is not None else [
        out for node in model.graph.node for out in node.output if out and types.get(out) in FLOAT_TYPES]
    added = [name for name in dict.fromkeys(wanted) if name not in existing and name in types]
    original = len(model.graph.output)
    output_names = [o.name for o in model.graph.output] + added
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in added)
    try:
        data = model.SerializeToString()
    finally:
        del model.graph.output[original:]
    return data, output_names


def open_session(model: onnx.ModelProto | gs.Graph | LeanModel,
                 names: Iterable[str] | None = None) -> tuple[Callable[[Feed], list[np.ndarray]], list[str]]:
    """``(run, output names)``: ``run(feed)`` runs ``model`` on ORT CPU (optimizations off) with ``names``
    exposed (default: every float tensor a node produces). A gs graph or a ``LeanModel`` lends its arrays to
    ORT (``GraphSession``: no copy of the weights, any size); a ModelProto is serialized (under 2 GB). The
    session, and what it borrows, lives as long as ``run``."""
    names = list(names) if names is not None else None
    if isinstance(model, (gs.Graph, LeanModel)):
        if isinstance(model, LeanModel):
            graph_session = GraphSession.from_lean(
                model, outputs=names if names is not None else float_node_outputs(model.skeleton))
        else:
            graph_session = GraphSession(model, outputs=names if names is not None else [
                out.name for node in model.nodes for out in node.outputs
                if out.dtype is not None and np.issubdtype(np.dtype(out.dtype), np.floating)])
        return (lambda feed: graph_session.run(graph_session.output_names, feed)), graph_session.output_names
    import onnxruntime as ort

    data, output_names = exposed_model_bytes(model, names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    del data
    inputs = {i.name for i in session.get_inputs()}
    return (lambda feed: session.run(output_names, {k: v for k, v in feed.items() if k in inputs})), output_names


def float_node_outputs(model: onnx.ModelProto) -> list[str]:
    """Every float tensor a node of ``model`` produces (types from its value_info and outputs)."""
    types = float_tensor_types(model)
    return [out for node in model.graph.node for out in node.output if out and types.get(out) in FLOAT_TYPES]


def outputs_per_feed(model: onnx.ModelProto | gs.Graph | LeanModel, feeds: Iterable[Feed],
                     names: Iterable[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` (see ``open_session``) on each feed in turn; yield {exposed tensor: value} per feed.
    The session, and the weights it borrowed, go when the generator does."""
    run, output_names = open_session(model, names)
    for feed in feeds:
        yield dict(zip(output_names, run(feed)))


def stream_intermediates(model: onnx.ModelProto | gs.Graph | LeanModel, feeds: Iterable[Feed],
                         reduce: Callable[[str, np.ndarray], None], names: Iterable[str] | None = None) -> list[str]:
    """Run on ORT CPU (optimizations off) and call ``reduce(name, value)`` for every exposed tensor.

    A gs graph or a ``LeanModel`` runs through a ``GraphSession`` (its weights are not copied); a ModelProto
    is serialized.
    """
    names = list(names) if names is not None else None
    run, output_names = open_session(model, names)
    wanted_inputs = set(names) if names is not None else set()
    for feed in feeds:
        for name, value in zip(output_names, run(feed)):
            reduce(name, value)
        for name in wanted_inputs & set(feed):  # graph inputs are observed straight from the feed
            reduce(name, np.asarray(feed[name]))
    return output_names


def max_abs_per_tensor(model: onnx.ModelProto | gs.Graph, feeds: Iterable[Feed]) -> dict[str, float]:
    peaks: dict[str, float] = {}

    def reduce(name: str, value: np.ndarray) -> None:
        if value.size and np.issubdtype(value.dtype, np.floating):
            finite = np.abs(value[np.isfinite(value)]) if not np.all(np.isfinite(value)) else np.abs(value)
            peak = float(finite.max()) if finite.size else float("inf")
            peaks[name] = max(peaks.get(name, 0.0), peak)

    stream_intermediates(model, feeds, reduce)
    return peaks
