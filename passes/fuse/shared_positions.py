"""Position projections repeated per batch row -> one constant that MatMul broadcasts (DeBERTa's c2p / p2c).

DeBERTa-v2/v3 project the relative position embeddings with the layer's query and key weights; after ``fold``
that projection is a constant P [H, 2k, D], which the export repeats for every batch row before a batched
MatMul with the content heads (``torch.bmm(q, pos_key.repeat(B, 1, 1).transpose(-1, -2))``)::

    before:  scores = MatMul(q [B·H, S, D], Transpose(Tile(P, [n, 1, 1]), [0, 2, 1]))      [B·H, S, 2k]
    after:   q4 = Reshape(Unsqueeze(q, 0), [-1, H, 0, 0])                                  [B, H, S, D]
             scores = Reshape(Flatten(MatMul(q4, Pᵀ [H, D, 2k]), 2), [0, -1, 2k])          [B·H, S, 2k]

The same products: row b·H + h of the repeat is P[h], and q's rows are b-major (MatMul of the original needs
n·H = B·H). The repeat (B copies of P, 2 x 12 layers of [B·H, 512, 64] at base size) and the shape arithmetic
that sized it are gone; every reshape is written without a Shape read (0 copies a dimension), so nothing lands
on the host for ORT CUDA.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.host_free import shape_parts
from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.rewrite import NodeBuilder, redirect, replace_output


def _repeat_count(t: gs.Tensor) -> tuple[np.ndarray, gs.Tensor | int] | None:
    """(P, n) when ``t`` = Tile(P [H, a, b] constant, [n, 1, 1]): n a constant or the export's tensor."""
    tile = producer(t)
    if tile is None or tile.op != "Tile" or not isinstance(tile.inputs[0], gs.Constant):
        return None
    value = tile.inputs[0].values
    if value.ndim != 3 or value.shape[0] < 2:
        return None
    known = constant_values(tile.inputs[1])
    parts = [int(v) for v in known.reshape(-1)] if known is not None else shape_parts(tile.inputs[1])
    return (value, parts[0]) if parts is not None and len(parts) == 3 and parts[1:] == [1, 1] else None


def share_position_projections(graph: gs.Graph, measure_tiles: bool = True) -> int:
    """Every MatMul(x, Transpose(Tile(P, [n, 1, 1]), [0, 2, 1])) -> the broadcast form above. Returns the count.
    With ``measure_tiles``, a Shape read of the repeat is computed from its factors instead (not for CUDA-graph
    targets, where ``host_free`` rewrites the repeat itself and those factors would be host arithmetic)."""
    count = 0
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        transpose = producer(node.inputs[1])
        if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", ())) != [0, 2, 1]:
            continue
        found = _repeat_count(transpose.inputs[0])
        if found is None:
            continue
        value, repeats = found
        heads, width = value.shape[0], value.shape[1]
        name = f"tqc_shared_positions{count}"
        build, dtype, x = NodeBuilder(graph, name), node.outputs[0].dtype, node.inputs[0]
        unsqueezed = build.op("Unsqueeze", [x, build.const("axes", [0])], dtype)
        heads4 = build.op("Reshape", [unsqueezed, build.const("heads_shape", [-1, heads, 0, 0])], dtype)
        weight = build.const("weight", np.ascontiguousarray(value.transpose(0, 2, 1)), value.dtype)
        scores = build.op("Flatten", [build.op("MatMul", [heads4, weight], dtype)], dtype, {"axis": 2})
        replace_output(graph, node.outputs[0], "Reshape", name, [scores, build.const("out_shape", [0, -1, width])])
        if measure_tiles:
            _shape_without_tile(producer(transpose.inputs[0]), repeats, build)
        count += 1
    return count


def _shape_without_tile(tile: gs.Node, repeats: gs.Tensor | int, build: NodeBuilder) -> None:
    """Shape(Tile(P, [n, 1, 1])) read elsewhere (the export sizes the gather index by it) -> Concat(H·n, a, b),
    so the repeat is not computed only to be measured; a read of a or b then folds to a constant."""
    readers = [c for c in tile.outputs[0].outputs if c.op == "Shape"]
    if not readers:
        return
    heads, a, b = (int(d) for d in tile.inputs[0].shape)
    if isinstance(repeats, int):
        full = build.const("tile_shape", [heads * repeats, a, b])
    else:
        rows = build.op("Mul", [build.const("tile_heads", [heads]), repeats], np.int64)
        full = build.op("Concat", [rows, build.const("tile_rest", [a, b])], np.int64, {"axis": 0})
    for reader in readers:
        start, end = reader.attrs.get("start"), reader.attrs.get("end")
        if start is None and end is None:
            redirect(reader.outputs[0], full)
            continue
        bounds = [build.const("start", [start or 0]), build.const("end", [end if end is not None else 2**62])]
        replace_output(build.graph, reader.outputs[0], "Slice", f"{reader.name}_from_factors", [full] + bounds)
