"""Facts about dimensions that ONNX's shape inference names with symbols, used by ``fold``.

A symbol is a graph input's dimension (``batch``, ``sequence``) or an ``unk__N`` that inference made for one
unknown dimension and copied wherever that same dimension flows: one symbol in two places is one runtime size.
Different symbols prove nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.rewrite import produce, redirect


def symbol_shapes(graph: gs.Graph) -> dict[str, list]:
    """Every tensor's dimensions as inference knows them: ints, symbols, or '' for an unnamed unknown."""
    from tqc.compiler.io.graph import skeleton_of_graph
    from tqc.compiler.io.structure import infer_shapes

    inferred = infer_shapes(skeleton_of_graph(graph), strict=False)
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def simplify_by_symbols(graph: gs.Graph) -> tuple[int, int]:
    """(Equals decided, Reshape targets whose read dimensions became 0). Inference runs only when some Equal
    compares two dimension reads, or some Reshape target reads a Shape."""
    equals = [n for n in graph.nodes if n.op == "Equal" and len(n.inputs) == 2 and
              all(shape_read(t) is not None for t in n.inputs)]
    reshapes = [(n, concat) for n in graph.nodes
                if n.op == "Reshape" and (concat := _concat_of_reads(n)) is not None]
    if not equals and not reshapes:
        return 0, 0
    shapes = symbol_shapes(graph)
    return decide_dims(equals, graph, shapes), copy_dims_in_reshapes(reshapes, shapes)


def _concat_of_reads(reshape: gs.Node) -> gs.Node | None:
    """The Concat that makes ``reshape``'s target, if some part of it reads a Shape (allowzero unset)."""
    if reshape.attrs.get("allowzero") or len(reshape.inputs) < 2 or len(reshape.inputs[1].inputs) != 1:
        return None
    concat = reshape.inputs[1].inputs[0]
    if concat.op != "Concat" or all(isinstance(p, gs.Constant) for p in concat.inputs):
        return None
    return concat


def copy_dims_in_reshapes(reshapes: list[tuple[gs.Node, gs.Node]], shapes: dict[str, list]) -> int:
    """Reshape targets whose parts read, at position p, a dimension that the reshaped tensor has at p too: 0
    there (Reshape's "copy this dimension"), so no Shape arithmetic is left for ONNX Runtime to run on the CPU.

    Before                                                  After
      Shape(h) ─► Gather(0) ─► Unsqueeze ─┐
      Shape(h) ─► Gather(1) ─► Unsqueeze ─┼─► Concat ─► Reshape(x @ W)     Reshape(x @ W, [0, 0, 3, 12, 64])
                               3, 12, 64 ─┘         (x @ W: [batch, sequence, 2304], h: [batch, sequence, 768])
    """
    copied = 0
    for reshape, concat in reshapes:
        data = shapes.get(reshape.inputs[0].name)
        if not data:
            continue
        parts = _target_parts(concat, shapes)
        if parts is None:
            continue
        if all(kind == "const" or (p < len(data) and data[p] == value) for p, (kind, value) in enumerate(parts)):
            target = [value if kind == "const" else 0 for kind, value in parts]
            name = f"{reshape.name or reshape.outputs[0].name}_target"
            reshape.inputs[1] = gs.Constant(name, np.array(target, np.int64))
            copied += 1
    return copied


def merge_leading_dims(graph: gs.Graph, shapes: dict[str, list] | None = None) -> int:
    """Reshape targets [-1, the data's last k dimensions] whose reads sit at other positions than the data's
    (DeBERTa's heads merged into the batch: [B, H, S, 64] to [-1, S, 64]): Flatten at the suffix and a constant
    target (``_merge_leading``), when the suffix holds at most one dimension that is not a constant. Not part
    of ``fold`` (the attention rules match the exported Reshape); ``fuse`` runs it for targets that capture
    CUDA graphs. ``shapes``: symbols (default: inference's). Returns how many it rewrote."""
    reshapes = [(n, concat) for n in graph.nodes if n.op == "Reshape" and (concat := _concat_of_reads(n)) is not None]
    if not reshapes:
        return 0
    shapes = shapes if shapes is not None else symbol_shapes(graph)
    merged = 0
    for reshape, concat in reshapes:
        data = shapes.get(reshape.inputs[0].name)
        parts = _target_parts(concat, shapes) if data else None
        if parts is not None and _merge_leading(graph, reshape, parts, data):
            merged += 1
    return merged


def _target_parts(concat: gs.Node, shapes: dict) -> list[tuple[str, int | str]] | None:
    """A Reshape target's entries: ("const", size) or ("read", the dimension's symbol or int); None when
    some part is neither."""
    parts: list[tuple[str, int | str]] = []
    for entry in _concat_entries(concat):
        if isinstance(entry, int):  # sizes as they are (a 0 there copies already)
            parts.append(("const", entry))
            continue
        read = dimension_read(entry, shapes)
        if read is None or read[0] in ("", 0):
            return None
        parts.append(("read", read[0]))
    return parts


def _merge_leading(graph: gs.Graph, reshape: gs.Node, parts: list, data: list) -> bool:
    """Reshape(x, [-1, d_{n-k}, ..., d_{n-1}]) with x [d_0, ..., d_{n-1}], k < n - 1: Flatten(x, n - k) then
    Reshape(., [0, the suffix's constants, -1 for its one symbol]). Exact: the same elements in the same order."""
    k = len(parts) - 1
    if k < 1 or parts[0] != ("const", -1) or len(data) - k < 2:
        return False
    suffix = data[len(data) - k:]
    symbols = 0
    target = [0]
    for (kind, value), dim in zip(parts[1:], suffix):
        if dim in ("", 0) or (kind == "const" and value != dim) or (kind == "read" and value != dim):
            return False
        if isinstance(dim, int) and dim > 0:
            target.append(dim)
        else:
            symbols += 1
            target.append(-1)
    if symbols > 1:
        return False
    prefix = reshape.name or reshape.outputs[0].name
    flat = gs.Variable(f"{prefix}_flat", dtype=reshape.inputs[0].dtype)
    produce(graph, "Flatten", f"{prefix}_flatten", [reshape.inputs[0]], [flat], attrs={"axis": len(data) - k})
    reshape.inputs[0] = flat
    reshape.inputs[1] = gs.Constant(f"{prefix}_target", np.array(target, np.int64))
    return True


def unsqueezed(tensor: gs.Tensor) -> gs.Tensor:
    """``x`` for Unsqueeze(x, [0]) of a scalar; else ``tensor`` (a one-element read already)."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is not None and node.op == "Unsqueeze":
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        values = np.asarray(axes.values).reshape(-1).tolist() if isinstance(axes, gs.Constant) else node.attrs.get("axes")
        if list(values or []) == [0]:
            return node.inputs[0]
    return tensor


def decide_dims(equals: list[gs.Node], graph: gs.Graph, shapes: dict[str, list]) -> int:
    """Equal of two dimensions that shape inference names with the same symbol becomes the constant True.

    Before                                              After
      Shape(q) ─► Slice[-2:-1] ─► Squeeze ─┐
      Shape(k) ─► Slice[-2:-1] ─► Squeeze ─┴─► Equal       Constant(True) ─► Not ─► Cast ─► If
                                  ─► Not ─► Cast ─► If      (then folded: the If's else branch inlined)

    DeBERTa-v2/v3 up to transformers 5.17 exports ``if key_layer.size(-2) != query_layer.size(-2)`` (a scripted
    helper) as such an If; undecided, the relative-position subgraph behind it has no known shape and the
    attention does not fuse. One symbol on both sides (module docstring) is one runtime size; different symbols
    decide nothing; two different static sizes give False."""
    outputs = {id(t) for t in graph.outputs}
    decided = 0
    for node in equals:
        read = [dimension_read(t, shapes) for t in node.inputs]
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


def shape_read(tensor: gs.Tensor) -> tuple[gs.Node, gs.Tensor, bool] | None:
    """(the Slice or Gather, the tensor whose Shape it reads, whether a Squeeze follows) for
    ``[Squeeze](Slice|Gather(Shape(x), constant))``; else None. Structure only: what it reads needs the shapes."""
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
    return node, shape_node.inputs[0], squeezed


def dimension_read(tensor: gs.Tensor, shapes: dict) -> tuple[int | str, tuple[int, ...]] | None:
    """(the dimension, the read's own shape) for ``[Squeeze](Slice|Gather(Shape(x), i))`` reading one dimension,
    the dimension an int or a symbol; else None."""
    structure = shape_read(tensor)
    dims = shapes.get(structure[1].name) if structure is not None else None
    if not dims:
        return None
    node, _, squeezed = structure
    index = np.asarray(node.inputs[1].values).reshape(-1)
    if index.size != 1 or not -len(dims) <= int(index[0]) < len(dims):
        return None
    normal = int(index[0]) % len(dims)
    if node.op == "Slice":
        ends = node.inputs[2] if len(node.inputs) > 2 else None
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        if not isinstance(ends, gs.Constant) or (steps is not None and not (isinstance(steps, gs.Constant) and
                                                                            np.all(np.asarray(steps.values) == 1))):
            return None
        end = int(np.asarray(ends.values).reshape(-1)[0])
        if (end + len(dims) if end < 0 else min(end, len(dims))) - normal != 1:
            return None
        shape = () if squeezed else (1,)
    else:
        shape = () if squeezed or np.asarray(node.inputs[1].values).ndim == 0 else (1,)
    dim = dims[normal]
    if (isinstance(dim, int) and dim > 0) or (isinstance(dim, str) and dim):
        return dim, shape
    return None


Factors = tuple[int, tuple[str, ...]]  # a dimension as a product: the static factor, the symbols (sorted)


def _product(parts: list[Factors]) -> Factors:
    static, symbols = 1, []
    for value, names in parts:
        static *= value
        symbols += names
    return static, tuple(sorted(symbols))


def _quotient(total: Factors, divisor: Factors) -> Factors | None:
    """total / divisor where the divisor's symbols are among the total's and its static factor divides; else None."""
    left = list(total[1])
    for name in divisor[1]:
        if name not in left:
            return None
        left.remove(name)
    if divisor[0] == 0 or total[0] % divisor[0]:
        return None
    return total[0] // divisor[0], tuple(left)


def dimension_factors(tensor: gs.Tensor, axis: int, shapes: dict, depth: int = 6) -> Factors | None:
    """``tensor``'s dimension ``axis`` as a product of static sizes and symbols: inference's own name for it, or,
    for a dimension inference left unnamed (an ``unk__N`` of a Reshape by -1), the product worked back through
    the Reshape (its -1, 0 and read entries), Flatten and Transpose that made it. DeBERTa's heads merged into
    the batch, Reshape(Transpose(q [batch, sequence, 12, 64]), [-1, Shape(.)[1], Shape(.)[-1]]), is
    (12, ('batch',)) in every layer, where inference gives each layer its own unk__N. Equal factors are one
    runtime size; None where it cannot tell."""
    dims = shapes.get(tensor.name) or (list(tensor.shape) if isinstance(tensor, gs.Constant) else None)
    if not dims or not -len(dims) <= axis < len(dims):
        return None
    axis %= len(dims)
    dim = dims[axis]
    if isinstance(dim, int) and dim > 0:
        return dim, ()
    if isinstance(dim, str) and dim and not dim.startswith("unk__"):
        return 1, (dim,)
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    found = _factors_through(node, axis, shapes, depth - 1) if node is not None and depth > 0 else None
    return found if found is not None or not (isinstance(dim, str) and dim) else (1, (dim,))


def _factors_through(node: gs.Node, axis: int, shapes: dict, depth: int) -> Factors | None:
    """``dimension_factors`` of the output of ``node`` (Transpose, Flatten, Reshape) from its input's."""
    x = node.inputs[0] if node.inputs else None
    rank = len(shapes.get(x.name) or ()) if x is not None else 0
    if node.op == "Transpose" and rank:
        perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
        return dimension_factors(x, perm[axis], shapes, depth)
    if node.op == "Flatten" and rank:
        split = int(node.attrs.get("axis", 1)) % (rank + 1)
        parts = [dimension_factors(x, i, shapes, depth) for i in (range(split) if axis == 0 else range(split, rank))]
        return None if None in parts else _product(parts)
    if node.op != "Reshape" or not rank or node.attrs.get("allowzero", 0):
        return None
    entries = _reshape_entries(node.inputs[1])
    if entries is None or axis >= len(entries):
        return None

    def entry(i: int) -> Factors | None:
        value = entries[i]
        if isinstance(value, int):
            return dimension_factors(x, i, shapes, depth) if value == 0 else ((value, ()) if value > 0 else None)
        structure = shape_read(value)
        if structure is None or dimension_read(value, shapes) is None:
            return None
        read_node, source = structure[0], structure[1]
        source_rank = len(shapes.get(source.name) or ())
        return dimension_factors(source, int(np.asarray(read_node.inputs[1].values).reshape(-1)[0]) % source_rank,
                                 shapes, depth)

    if entries[axis] != -1:
        return entry(axis)
    total = [dimension_factors(x, i, shapes, depth) for i in range(rank)]
    others = [entry(i) for i in range(len(entries)) if i != axis]
    if None in total or None in others:
        return None
    return _quotient(_product(total), _product(others))


def _reshape_entries(target: gs.Tensor) -> list[int | gs.Tensor] | None:
    """A Reshape target's entries: ints of a constant, or of a Concat of constants and one-element reads."""
    if isinstance(target, gs.Constant):
        return [int(v) for v in np.asarray(target.values).reshape(-1)]
    node = target.inputs[0] if len(target.inputs) == 1 else None
    return _concat_entries(node) if node is not None and node.op == "Concat" else None


def _concat_entries(concat: gs.Node) -> list[int | gs.Tensor]:
    """A Concat's entries in order: each value of its constant parts (ints), and each other part as the tensor it
    unsqueezes (a one-element read, ``unsqueezed``)."""
    entries: list[int | gs.Tensor] = []
    for part in concat.inputs:
        if isinstance(part, gs.Constant):
            entries += [int(v) for v in np.asarray(part.values).reshape(-1)]
        else:
            entries.append(unsqueezed(part))
    return entries
