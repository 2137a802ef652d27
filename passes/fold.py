"""``fold``: constant folding, dead-node and Identity removal, shape-subgraph simplification, toposort.

Before                                   After
  Constant ─► Unsqueeze ─► Concat ─┐       (one constant) ───────────► Reshape
  Shape(x) ─► Gather(0) ──────────┘─► Reshape      (when x's dimension is static)
  Identity(w) ─► MatMul                  w ─► MatMul
  Shape(x) ─► Gather(0)  (twice)         Shape(x) ─► Gather(0)  (once: equal nodes merged)
  nodes feeding nothing                  (removed)
  Shape(q)[-2] == Shape(k)[-2] ─► If     (the If's branch inlined, when inference names both dimensions
                                          with one symbol: DeBERTa before transformers 5.25; fold_dims.py)
  Reshape(x, [Shape(y)[0], Shape(y)[1], 3, 12, 64])    Reshape(x, [0, 0, 3, 12, 64])   (x and y share them)

Graph inputs and outputs keep their names; an Identity that produces a graph output is kept only when its
input is itself a graph input or output.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.base import Condition, Pass, PassContext, PassResult, Tolerance
from tqc.passes.fold_dims import simplify_by_symbols
from tqc.passes.rewrite import bypass, cleanup, drop, redirect

SMALL_CONSTANT_ELEMENTS = 64



class Fold(Pass):
    """Constant folding, Identity and dead-node removal, shape simplification, duplicate merging."""

    name = "fold"
    ensures = (Condition("no Identity node except one that produces a graph output", lambda graph, ctx: next(
        (f"Identity '{n.name}' is left" for n in graph.nodes if n.op == "Identity" and
         not any(t in graph.outputs for t in n.outputs)), None)),)
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = len(graph.nodes)
        identities = remove_identities(graph)
        merged = decided = copied = 0
        for _ in range(4):  # folding exposes duplicates and vice versa; a few rounds reach a fixed point
            count = len(graph.nodes)
            _quiet_fold(graph)
            cleanup(graph, toposort=False)
            newly, copies = simplify_by_symbols(graph)  # on folded constants (an export's Constant nodes are
            if newly or copies:                          # folded by then); a decided If folds into its branch,
                decided += newly                         # whose Identity goes too
                copied += copies
                _quiet_fold(graph)
                identities += remove_identities(graph)
            merged += merge_duplicates(graph)
            cleanup(graph, toposort=False)
            if len(graph.nodes) == count:
                break
        graph.toposort()
        nodes_after = len(graph.nodes)
        return PassResult(
            modified=nodes_after != nodes_before or identities > 0,
            stats={"nodes_before": nodes_before, "nodes_after": nodes_after,
                   "identity_removed": identities, "duplicates_merged": merged, "dims_decided": decided,
                   "reshape_dims_copied": copied},
        )


def _quiet_fold(graph: gs.Graph) -> None:
    # gs folds through ORT, whose optimizer notes are noise here: the CLI quiets ORT's default logger for the
    # whole process (its choice); a library caller keeps its own setting. gs's logger is quieted only here.
    gs_logger = gs.logger.G_LOGGER
    severity = gs_logger.severity
    gs_logger.severity = gs_logger.ERROR
    try:
        graph.fold_constants(fold_shapes=True, recurse_subgraphs=True, error_ok=True)
    finally:
        gs_logger.severity = severity


def remove_identities(graph: gs.Graph) -> int:
    removed = 0
    graph_outputs = set(id(t) for t in graph.outputs)
    graph_inputs = set(id(t) for t in graph.inputs)
    for node in list(graph.nodes):
        if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in graph_outputs:
            # Keep the output's name: the producer of src writes dst directly.
            if id(src) in graph_inputs or id(src) in graph_outputs or isinstance(src, gs.Constant) or not src.inputs:
                continue
            bypass(node, keep_output_name=True)
        else:
            bypass(node)
        removed += 1
    cleanup(graph, toposort=False)
    return removed


def _constant_key(tensor: gs.Constant):
    if int(np.prod(tensor.shape)) > SMALL_CONSTANT_ELEMENTS:  # shape first: values of weights load lazily
        return None
    values = np.asarray(tensor.values)
    return ("const", str(values.dtype), values.shape, values.tobytes())


def _attr_key(value):
    if isinstance(value, gs.Tensor):
        return ("tensor", value.name)
    if isinstance(value, gs.Graph):
        return ("graph", id(value))
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    return repr(value)


def merge_duplicates(graph: gs.Graph) -> int:
    """Common-subexpression elimination over nodes with equal op, inputs and attributes."""
    graph.toposort()
    outputs = set(id(t) for t in graph.outputs)
    # Small constants with equal values count as the same input.
    canonical: dict = {}
    def input_key(t: gs.Tensor):
        if isinstance(t, gs.Constant):
            key = _constant_key(t)
            if key is not None:
                return canonical.setdefault(key, ("name", t.name))
        return ("name", t.name)

    seen: dict = {}
    merged = 0
    for node in graph.nodes:
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()) or node.op in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Dropout"):
            continue
        key = (node.op, node.domain, tuple(input_key(t) for t in node.inputs),
               tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())), len(node.outputs))
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if any(id(t) in outputs for t in node.outputs):
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            redirect(mine, theirs)
        drop(node)
        merged += 1
    return merged
