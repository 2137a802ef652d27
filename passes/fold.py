"""``fold``: constant folding, dead-node and Identity removal, shape-subgraph simplification, toposort.

Before                                   After
  Constant ─► Unsqueeze ─► Concat ─┐       (one constant) ───────────► Reshape
  Shape(x) ─► Gather(0) ──────────┘─► Reshape      (when x's dimension is static)
  Identity(w) ─► MatMul                  w ─► MatMul
  Shape(x) ─► Gather(0)  (twice)         Shape(x) ─► Gather(0)  (once: equal nodes merged)
  nodes feeding nothing                  (removed)
  Shape(q)[-2] == Shape(k)[-2] ─► If     (the If's branch inlined, when inference names both dimensions
                                          with one symbol: DeBERTa before transformers 5.25, see decide_dims)

Graph inputs and outputs keep their names; an Identity that produces a graph output is kept only when its
input is itself a graph input or output.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.base import Condition, Pass, PassContext, PassResult, Tolerance
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
        merged = decided = 0
        for _ in range(4):  # folding exposes duplicates and vice versa; a few rounds reach a fixed point
            count = len(graph.nodes)
            _quiet_fold(graph)
            cleanup(graph, toposort=False)
            newly = decide_dims(graph)  # on folded constants (an export's Constant nodes are folded by then)
            if newly:  # the If folds into its branch, whose Identity goes too
                decided += newly
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
                   "identity_removed": identities, "duplicates_merged": merged, "dims_decided": decided},
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


def decide_dims(graph: gs.Graph) -> int:
    """Equal of two dimensions that shape inference names with the same symbol becomes the constant True.

    Before                                              After
      Shape(q) ─► Slice[-2:-1] ─► Squeeze ─┐
      Shape(k) ─► Slice[-2:-1] ─► Squeeze ─┴─► Equal       Constant(True) ─► Not ─► Cast ─► If
                                  ─► Not ─► Cast ─► If      (then folded: the If's else branch inlined)

    DeBERTa-v2/v3 up to transformers 5.17 exports ``if key_layer.size(-2) != query_layer.size(-2)`` (a scripted
    helper) as such an If; undecided, the relative-position subgraph behind it has no known shape and the
    attention does not fuse. A symbol is a graph input's dimension (``sequence``) or an ``unk__N`` that ONNX's
    inference made for one unknown dimension and copied wherever that same dimension flows: one symbol on both
    sides is one runtime size. Different symbols decide nothing; two different static sizes give False."""
    from tqc.compiler.io.graph import skeleton_of_graph
    from tqc.compiler.io.structure import infer_shapes

    equals = [n for n in graph.nodes if n.op == "Equal" and len(n.inputs) == 2]
    if not equals:
        return 0
    inferred = infer_shapes(skeleton_of_graph(graph), strict=False)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in
                       v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    outputs = {id(t) for t in graph.outputs}
    decided = 0
    for node in equals:
        read = [_dimension_read(t, shapes) for t in node.inputs]
        if any(r is None for r in read) or id(node.outputs[0]) in outputs:
            continue
        (a, shape_a), (b, shape_b) = read
        if isinstance(a, int) and isinstance(b, int):
            value = a == b
        elif a == b:
            value = True
        else:
            continue
        answer = gs.Constant(f"{node.outputs[0].name}_decided",
                             np.full(np.broadcast_shapes(shape_a, shape_b), value, dtype=bool))
        redirect(node.outputs[0], answer)
        decided += 1
    return decided


def _dimension_read(tensor: gs.Tensor, shapes: dict) -> tuple[int | str, tuple[int, ...]] | None:
    """(the dimension, the read's own shape) for ``[Squeeze](Slice|Gather(Shape(x), i))``, the dimension an int
    or a symbol from the graph's inputs; else None."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    squeezed = node is not None and node.op == "Squeeze"
    if squeezed:
        tensor = node.inputs[0]
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or node.op not in ("Slice", "Gather") or not isinstance(node.inputs[1], gs.Constant):
        return None
    shape_node = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
    if shape_node is None or shape_node.op != "Shape" or shape_node.attrs.get("start") or shape_node.attrs.get("end"):
        return None
    dims = shapes.get(shape_node.inputs[0].name)
    if not dims:
        return None
    index = np.asarray(node.inputs[1].values).reshape(-1)
    if index.size != 1:
        return None
    start = int(index[0])
    if node.op == "Slice":
        ends = node.inputs[2] if len(node.inputs) > 2 else None
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        if not isinstance(ends, gs.Constant) or (steps is not None and not (isinstance(steps, gs.Constant) and
                                                                            np.all(np.asarray(steps.values) == 1))):
            return None
        end = int(np.asarray(ends.values).reshape(-1)[0])
        end = end + len(dims) if end < 0 else min(end, len(dims))
        normal = start % len(dims) if -len(dims) <= start < len(dims) else None
        if normal is None or end - normal != 1:
            return None
        shape = () if squeezed else (1,)
    else:
        if not -len(dims) <= start < len(dims):
            return None
        normal = start % len(dims)
        shape = () if squeezed or np.asarray(node.inputs[1].values).ndim == 0 else (1,)
    dim = dims[normal]
    if isinstance(dim, int) and dim > 0:
        return dim, shape
    if isinstance(dim, str) and dim:
        return dim, shape
    return None


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
