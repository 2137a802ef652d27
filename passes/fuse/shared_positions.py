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

from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.rewrite import produce, redirect, replace_output


def _repeated_constant(t: gs.Tensor) -> np.ndarray | None:
    """P when ``t`` = Tile(P [H, a, b] constant, [n, 1, 1])."""
    tile = producer(t)
    if tile is None or tile.op != "Tile" or not isinstance(tile.inputs[0], gs.Constant):
        return None
    value = tile.inputs[0].values
    if value.ndim != 3 or value.shape[0] < 2:
        return None
    repeats = tile.inputs[1]
    node = producer(repeats)
    # [n, 1, 1]: a constant, or a Concat whose last two parts are the constants 1 (the export's form)
    known = constant_values(repeats)
    if known is not None:
        return value if known.size == 3 and list(known.reshape(-1)[1:]) == [1, 1] else None
    if node is None or node.op != "Concat" or len(node.inputs) != 3:
        return None
    tail = [constant_values(p) for p in node.inputs[1:]]
    return value if all(v is not None and v.size == 1 and int(v.reshape(-1)[0]) == 1 for v in tail) else None


def share_position_projections(graph: gs.Graph, measure_tiles: bool = True) -> int:
    """Every MatMul(x, Transpose(Tile(P, [n, 1, 1]), [0, 2, 1])) -> the broadcast form above. Returns the count.
    With ``measure_tiles``, a Shape read of the repeat is computed from its factors instead (not for CUDA-graph
    targets, where ``host_free`` rewrites the repeat itself and those factors would be host arithmetic)."""
    count = 0
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        transpose = producer(node.inputs[1])
        if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", ())) != [0, 2, 1]:
            continue
        value = _repeated_constant(transpose.inputs[0])
        if value is None:
            continue
        heads, width = value.shape[0], value.shape[1]
        name = f"tqc_shared_positions{count}"
        const = {tag: gs.Constant(f"{name}_{tag}", np.asarray(v, np.int64)) for tag, v in
                 (("axes", [0]), ("heads_shape", [-1, heads, 0, 0]), ("out_shape", [0, -1, width]))}
        weight = gs.Constant(f"{name}_weight", np.ascontiguousarray(value.transpose(0, 2, 1)))
        dtype = node.outputs[0].dtype
        x = node.inputs[0]
        steps = [gs.Variable(f"{name}_{tag}", dtype=dtype) for tag in ("unsqueezed", "heads", "scores", "flat")]
        produce(graph, "Unsqueeze", steps[0].name, [x, const["axes"]], [steps[0]])
        produce(graph, "Reshape", steps[1].name, [steps[0], const["heads_shape"]], [steps[1]])
        produce(graph, "MatMul", steps[2].name, [steps[1], weight], [steps[2]])
        produce(graph, "Flatten", steps[3].name, [steps[2]], [steps[3]], attrs={"axis": 2})
        replace_output(graph, node.outputs[0], "Reshape", name, [steps[3], const["out_shape"]])
        if measure_tiles:
            _shape_without_tile(graph, producer(transpose.inputs[0]), name)
        count += 1
    return count


def _shape_without_tile(graph: gs.Graph, tile: gs.Node, name: str) -> None:
    """Shape(Tile(P, [n, 1, 1])) read elsewhere (the export sizes the gather index by it) -> Concat(H·n, a, b),
    so the repeat is not computed only to be measured; a read of a or b then folds to a constant."""
    readers = [c for c in tile.outputs[0].outputs if c.op == "Shape"]
    if not readers:
        return
    heads, a, b = (int(d) for d in tile.inputs[0].shape)
    repeats = tile.inputs[1]
    known = constant_values(repeats)
    if known is not None:
        full = gs.Constant(f"{name}_tile_shape", np.array([heads * int(known.reshape(-1)[0]), a, b], np.int64))
    else:
        count = producer(repeats).inputs[0]  # a Concat of [n], [1], [1] (_repeated_constant)
        first = gs.Variable(f"{name}_tile_rows", dtype=np.int64)
        produce(graph, "Mul", first.name, [gs.Constant(f"{name}_tile_heads", np.array([heads], np.int64)), count],
                [first])
        full = gs.Variable(f"{name}_tile_shape", dtype=np.int64)
        produce(graph, "Concat", full.name, [first, gs.Constant(f"{name}_tile_rest", np.array([a, b], np.int64))],
                [full], attrs={"axis": 0})
    for reader in readers:
        start, end = reader.attrs.get("start"), reader.attrs.get("end")
        if start is None and end is None:
            redirect(reader.outputs[0], full)
            continue
        bounds = [gs.Constant(f"{name}_tile_{tag}", np.array([v], np.int64))
                  for tag, v in (("start", start or 0), ("end", end if end is not None else 2**62))]
        replace_output(graph, reader.outputs[0], "Slice", f"{name}_tile_shape_read", [full] + bounds)
