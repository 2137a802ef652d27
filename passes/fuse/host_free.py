"""Shape arithmetic that ONNX Runtime CUDA would run on the CPU, rewritten as data ops (targets that capture
CUDA graphs: ``Target.cuda_graphs``). One CPU node keeps a session from capturing a CUDA graph; DeBERTa-v3's
relative-position path reads Shape in ~32 nodes a layer (``compiler/analysis/cuda_placement.py`` lists them)::

    Range(0, Shape(h)[-2], 1)                    CumSum(ones like attention_mask's row, axis 0) - 1
    Slice(x, 0, Shape(h)[-2]) of x [S, S]        x                    (bounds equal to x's own extent)
    Tile(p, [Shape(q)[0] / H, 1, 1])             Reshape(Unsqueeze(p, 0) + zeros [B, 1, 1, 1], [-1, 2s, D])
    Expand(i [1, S, S], [Shape(q)[0], S, S])     i + zeros [B*H, 1, 1]
    Reshape(q [B, H, S, D], [-1, S, D])          Reshape(Flatten(q, 2), [0, -1, D])   (fold_dims.merge_leading_dims)
    Shape(p)[-1] of a static dimension           the constant

Zeros come from a tensor that has the dimension, ``Cast(Less(t, t))`` over a one-element slice of its other
axes (false for every value, NaN included). Each rewrite is taken only where shape inference's symbols prove
the shapes equal (``fold_dims``: one symbol in two places is one runtime size), or, for Tile, where the graph
itself divides the dimension it reads; anything else is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fold_dims import dimension_factors, dimension_read, merge_leading_dims, shape_read, unsqueezed
from tqc.passes.rewrite import NodeBuilder, cleanup, redirect

INT64_MAX = np.iinfo(np.int64).max


class _Builder(NodeBuilder):
    """``NodeBuilder`` with the zeros host_free broadcasts against, made once per size: zeros whose n has the
    same ``dimension_factors`` are one tensor (DeBERTa's index broadcast to [B*H, S, S] is then the same Add in
    every layer, which ``fold`` merges, instead of zeros measured on each layer's own query)."""

    def __init__(self, graph: gs.Graph, prefix: str):
        super().__init__(graph, prefix)
        self.made: dict = {}

    def zeros_along(self, source: gs.Tensor, axis: int, rank: int, out_rank: int, dtype,
                    shapes: dict | None = None) -> gs.Variable:
        """Zeros [n, 1, ..., 1] (``out_rank`` dims) where n is ``source``'s dimension ``axis``: Gathers at 0 on
        the other axes (shape inference keeps n's symbol through them). With ``shapes``, zeros of the same size
        made before in the same step (``dimension_factors``) are reused: the step takes its nodes in topological
        order, so the zeros' source comes before the reader (no cycle)."""
        factors = dimension_factors(source, axis, shapes) if shapes is not None else None
        key = (factors, out_rank, np.dtype(dtype).str)
        if factors is not None and key in self.made:
            return self.made[key]
        zeros = self._zeros(source, axis, rank, out_rank, dtype)
        if factors is not None:
            self.made[key] = zeros
        return zeros

    def _zeros(self, source: gs.Tensor, axis: int, rank: int, out_rank: int, dtype) -> gs.Variable:
        line = source
        for other in sorted((a for a in range(rank) if a != axis), reverse=True):
            line = self.op("Gather", [line, self.const("first", 0)], source.dtype, {"axis": other})
        if out_rank > 1:
            line = self.op("Unsqueeze", [line, self.const("axes", list(range(1, out_rank)))], source.dtype)
        never = self.op("Less", [line, line], np.bool_)
        return self.op("Cast", [never], dtype, {"to": _onnx_type(dtype)})


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# com.microsoft ops whose outputs (by index) have their input 0's shape: Identity stand-ins for inference,
# which knows no contrib op, so the symbols carry on past a fused layer into the next
SAME_SHAPE_OUTPUTS = {"MultiHeadAttention": (0,), "SkipLayerNormalization": (0, 3), "BiasGelu": (0,),
                      "FastGelu": (0,), "Gelu": (0,), "Attention": (0,), "SkipSimplifiedLayerNormalization": (0, 3)}


def symbols_past_contrib_ops(graph: gs.Graph) -> dict[str, list]:
    """``fold_dims.symbol_shapes``, with the contrib ops of ``SAME_SHAPE_OUTPUTS`` read as Identities (and
    EmbedLayerNormalization's output as its word embedding Gather); each entry also under ``(name, "type")``:
    its element type as numpy's, where inference knows it."""
    from onnx import helper

    from tqc.compiler.io.graph import skeleton_of_graph
    from tqc.compiler.io.structure import infer_shapes

    model = skeleton_of_graph(graph)
    del model.graph.value_info[:]  # shapes an earlier inference left would outvote the new symbols
    nodes = []
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type == "EmbedLayerNormalization":  # [B, S, hidden]
            nodes.append(helper.make_node("Gather", [node.input[2], node.input[0]], [node.output[0]]))
        elif node.domain == "com.microsoft" and node.op_type in SAME_SHAPE_OUTPUTS:
            nodes += [helper.make_node("Identity", [node.input[0]], [node.output[i]])
                      for i in SAME_SHAPE_OUTPUTS[node.op_type] if i < len(node.output) and node.output[i]]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    inferred = infer_shapes(model, strict=False)
    values = list(inferred.graph.value_info) + list(inferred.graph.input)
    shapes: dict = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                             for d in v.type.tensor_type.shape.dim]
                    for v in values if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    shapes.update({(v.name, "type"): helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                   for v in values if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type})
    return shapes


def _dtype(tensor: gs.Tensor, shapes: dict):
    """The tensor's element type: its own, or inference's."""
    return tensor.dtype if tensor.dtype is not None else shapes.get((tensor.name, "type"))


def _read_axis(tensor: gs.Tensor, shapes: dict) -> tuple[gs.Tensor, int, int] | None:
    """(x, axis, rank of x) for a read of one dimension of Shape(x); else None."""
    structure = shape_read(tensor)
    if structure is None or dimension_read(tensor, shapes) is None:
        return None
    node, source, _ = structure
    rank = len(shapes[source.name])
    return source, int(np.asarray(node.inputs[1].values).reshape(-1)[0]) % rank, rank


def _through_casts(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor before Casts to int64 (the exports cast a dimension read, already int64, to int64)."""
    while len(tensor.inputs) == 1 and tensor.inputs[0].op == "Cast" and tensor.inputs[0].attrs.get("to") == 7:
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _scalar(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant) and np.asarray(tensor.values).size == 1:
        return int(np.asarray(tensor.values).reshape(-1)[0])
    return None


def host_placed(graph: gs.Graph) -> list:
    """The nodes ONNX Runtime CUDA would place on the CPU (``compiler/analysis/cuda_placement.py``)."""
    from tqc.compiler.analysis.cuda_placement import host_placed_by_inference
    from tqc.compiler.io.graph import skeleton_of_graph

    return host_placed_by_inference(skeleton_of_graph(graph))


def remove_host_shapes(graph: gs.Graph) -> dict[str, int]:
    """Every rewrite of the module docstring, in the order that keeps inference's symbols: positions first
    (their extent becomes the input's symbol), then the no-op Slices, Expands and Tiles, then the merged
    Reshapes and the static reads. Returns how many of each."""
    build = _Builder(graph, "tqc_hostfree")
    steps = (("ranges", lambda shapes: _ranges(graph, shapes, build)),
             ("slices", lambda shapes: _noop_slices(graph, shapes)),
             ("expands", lambda shapes: _expands(graph, shapes, build)),
             ("tiles", lambda shapes: _tiles(graph, shapes, build)),
             ("reshapes", lambda shapes: merge_leading_dims(graph, shapes)),
             ("static_reads", lambda shapes: _static_reads(graph, shapes)))
    stats: dict[str, int] = {}
    for name, step in steps:
        build.made = {}  # reused only within a step: its nodes are taken in topological order
        stats[name] = step(symbols_past_contrib_ops(graph))
        if stats[name]:  # a graph nothing fits is left exactly as it was (node order too)
            cleanup(graph, toposort=True)
    return stats


def _ranges(graph: gs.Graph, shapes: dict, build: _Builder) -> int:
    """Range(0, d, 1), d a graph input's dimension: positions by CumSum over that input's axis."""
    rewritten = 0
    for node in [n for n in graph.nodes if n.op == "Range"]:
        start, limit, delta = node.inputs
        read = dimension_read(unsqueezed(_through_casts(limit)), shapes)
        if _scalar(start) != 0 or _scalar(delta) != 1 or read is None or not isinstance(read[0], str):
            continue
        found = next(((t, dims.index(read[0])) for t in graph.inputs if (dims := shapes.get(t.name)) and
                      read[0] in dims), None)
        out = node.outputs[0]
        dtype = _dtype(out, shapes)
        if found is None or dtype is None or np.dtype(dtype) not in (np.dtype(np.int64), np.dtype(np.int32)):
            continue
        source, axis = found
        zeros = build.zeros_along(source, axis, len(shapes[source.name]), 1, dtype)
        ones = build.op("Add", [zeros, build.const("one", 1, dtype)], dtype)
        counted = build.op("CumSum", [ones, build.const("axis", 0)], dtype)
        positions = build.op("Sub", [counted, build.const("one", 1, dtype)], dtype)
        redirect(out, positions)
        rewritten += 1
    return rewritten


def _noop_slices(graph: gs.Graph, shapes: dict) -> int:
    """Slice(x, [0], [d], [axis][, [1]]) where d is x's own dimension at axis (same symbol): x."""
    removed = 0
    for node in [n for n in graph.nodes if n.op == "Slice" and len(n.inputs) >= 4]:
        data = shapes.get(node.inputs[0].name)
        starts, ends, axes = node.inputs[1:4]
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        if not data or _scalar(starts) != 0 or _scalar(axes) is None or (steps is not None and _scalar(steps) != 1):
            continue
        read = dimension_read(unsqueezed(_through_casts(ends)), shapes)
        axis = _scalar(axes) % len(data)
        if read is None or read[0] != data[axis] or read[0] in ("", 0):
            continue
        redirect(node.outputs[0], node.inputs[0])
        removed += 1
    return removed


def shape_parts(shape: gs.Tensor) -> list[gs.Tensor | int] | None:
    """The parts of an Expand's shape: Concat(parts), or torch's expand(-1 kept) form
    Where(Equal(Reshape(Concat(parts), [-1]), -1), 1, .). A part is a constant int or a tensor."""
    node = shape.inputs[0] if len(shape.inputs) == 1 else None
    if node is not None and node.op == "Where":
        equal = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
        if equal is None or equal.op != "Equal" or node.inputs[2] is not equal.inputs[0]:
            return None
        if not np.all(np.asarray(getattr(equal.inputs[1], "values", 0)) == -1) or \
                not np.all(np.asarray(getattr(node.inputs[1], "values", 0)) == 1):
            return None
        shape = node.inputs[2]
        node = shape.inputs[0] if len(shape.inputs) == 1 else None
        if node is not None and node.op == "Reshape":
            shape = node.inputs[0]
            node = shape.inputs[0] if len(shape.inputs) == 1 else None
    if node is None or node.op != "Concat":
        return None
    parts: list[gs.Tensor | int] = []
    for part in node.inputs:
        if isinstance(part, gs.Constant):
            parts += [int(v) for v in np.asarray(part.values).reshape(-1)]
        else:
            parts.append(part)
    return parts


def _expands(graph: gs.Graph, shapes: dict, build: _Builder) -> int:
    """Expand(x, [parts]) where every part is -1, 1, or x's own dimension there (same symbol), except at most
    one where x has 1 and the part reads a dimension of some t: x + zeros [n, 1, ...] along that dimension."""
    rewritten = 0
    for node in [n for n in graph.nodes if n.op == "Expand"]:
        x, out = node.inputs[0], node.outputs[0]
        data = shapes.get(x.name)
        parts = shape_parts(node.inputs[1])
        if not data or parts is None or len(parts) != len(data):
            continue
        grow = []
        for position, (part, dim) in enumerate(zip(parts, data)):
            if isinstance(part, int):
                if part in (-1, 1) or part == dim:
                    continue
                grow = None
                break
            read = dimension_read(unsqueezed(part), shapes)
            if read is not None and read[0] == dim and dim not in ("", 0):
                continue
            if dim == 1 and (axis := _read_axis(unsqueezed(part), shapes)) is not None:
                grow.append((position, axis))
                continue
            grow = None
            break
        dtype = _dtype(x, shapes)
        if grow is None or len(grow) > 1 or (grow and grow[0][0] != 0) or dtype is None:
            continue
        if grow:
            source, axis, rank = grow[0][1]
            zeros = build.zeros_along(source, axis, rank, len(data), dtype, shapes)
            redirect(out, build.op("Add", [x, zeros], dtype))
        else:
            redirect(out, x)
        rewritten += 1
    return rewritten


def _tiles(graph: gs.Graph, shapes: dict, build: _Builder) -> int:
    """Tile(p, [Shape(t)[a] / c, 1, ..., 1]) with p's other dimensions static: p broadcast against zeros
    [n / c, 1, ...] (n: t's dimension a; a Reshape by [-1, c] divides it, and fails where the graph's division
    would have left a remainder) and reshaped to [-1, p's static dimensions]."""
    rewritten = 0
    for node in [n for n in graph.nodes if n.op == "Tile"]:
        p, out = node.inputs[0], node.outputs[0]
        data = list(p.shape) if isinstance(p, gs.Constant) else shapes.get(p.name)
        parts = shape_parts(node.inputs[1])
        if not data or parts is None or len(parts) != len(data) or any(v != 1 for v in parts[1:]) or \
                isinstance(parts[0], int) or _dtype(p, shapes) is None or \
                not all(isinstance(d, int) and d > 0 for d in data[1:]):
            continue
        div = _through_casts(unsqueezed(parts[0]))
        div_node = div.inputs[0] if len(div.inputs) == 1 else None
        if div_node is None or div_node.op != "Div" or (c := _scalar(div_node.inputs[1])) is None or c < 1:
            continue
        read = _read_axis(_through_casts(div_node.inputs[0]), shapes)
        if read is None:
            continue
        source, axis, rank = read
        dtype = _dtype(p, shapes)
        column = build.zeros_along(source, axis, rank, 1, dtype)            # [n] zeros
        grouped = build.op("Reshape", [column, build.const("groups", [-1, c])], dtype)  # [n / c, c]
        first = build.op("Slice", [grouped, build.const("starts", [0]), build.const("ends", [1]),
                                   build.const("axes", [1])], dtype)       # [n / c, 1]
        zeros = build.op("Reshape", [first, build.const("shape", [-1] + [1] * len(data))], dtype)
        lifted = build.op("Unsqueeze", [p, build.const("axes", [0])], dtype)
        tiled = build.op("Add", [lifted, zeros], dtype)
        redirect(out, build.op("Reshape", [tiled, build.const("shape", [-1] + list(data[1:]))], dtype))
        rewritten += 1
    return rewritten


def _static_reads(graph: gs.Graph, shapes: dict) -> int:
    """Slice/Gather(Shape(x), i) of a dimension inference knows as a number: that constant."""
    folded = 0
    for node in [n for n in graph.nodes if n.op in ("Slice", "Gather")]:
        tensor = node.outputs[0]
        read = dimension_read(tensor, shapes)
        if read is None or not isinstance(read[0], int):
            continue
        redirect(tensor, gs.Constant(f"{tensor.name}_static", np.array(read[0], np.int64).reshape(read[1])))
        folded += 1
    return folded
