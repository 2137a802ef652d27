"""A transposed GatherElements -> one GatherND that gathers in the transposed order (DeBERTa's p2c scores).

DeBERTa-v2/v3 gather the position-to-content scores along their last axis, then transpose the result to
[query, key] order in every layer; GatherND reads the same values straight into that order, with indices built
once from the index tensor (which every layer shares once ``host_free`` has broadcast it)::

    before:  p2c = Transpose(GatherElements(data [N, A, R], idx [N, A, B], axis=-1), [0, 2, 1])     [N, B, A]
             p2c[n, i, j] = data[n, j, idx[n, j, i]]
    after:   p2c = GatherND(data, ind, batch_dims=1)                                                  [N, B, A]
             ind[n, i, j] = (j, idx[n, j, i])     ind = Concat(j [N, B, A, 1], Transpose(idx)[..., None])
             j = CumSum(ones like Transpose(idx), axis 2) - 1     (no Shape read: nothing on the host)

One kernel a layer fewer (the Transpose), values moved, never computed, so the answer is the same bit for bit.
Taken for targets that capture CUDA graphs (ORT CUDA), where every launch counts; only where the gathered
tensor has no reader but the Transpose.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import producer
from tqc.passes.rewrite import NodeBuilder, redirect


def _transposed_gather(node: gs.Node) -> gs.Node | None:
    """The GatherElements (last axis, rank 3) that ``node``, a Transpose [0, 2, 1], alone reads; else None."""
    if node.op != "Transpose" or list(node.attrs.get("perm", ())) != [0, 2, 1]:
        return None
    gather = producer(node.inputs[0])
    if gather is None or gather.op != "GatherElements" or int(gather.attrs.get("axis", 0)) not in (-1, 2) or \
            len(gather.outputs[0].outputs) != 1:
        return None
    return gather


def _indices(build: NodeBuilder, idx: gs.Tensor) -> gs.Variable:
    """ind [N, B, A, 2] of the module docstring, from idx [N, A, B]."""
    i64 = np.int64
    moved = build.op("Transpose", [idx], idx.dtype, {"perm": [0, 2, 1]})            # idx[n, j, i] at [n, i, j]
    if np.dtype(idx.dtype) != np.dtype(i64):
        moved = build.op("Cast", [moved], i64, {"to": 7})
    zeros = build.op("Cast", [build.op("Less", [moved, moved], np.bool_)], i64, {"to": 7})
    ones = build.op("Add", [zeros, build.const("one", 1)], i64)
    columns = build.op("Sub", [build.op("CumSum", [ones, build.const("axis", 2)], i64), build.const("one", 1)], i64)
    last = build.const("last", [-1])
    parts = [build.op("Unsqueeze", [t, last], i64) for t in (columns, moved)]
    return build.op("Concat", parts, i64, {"axis": -1})


def gather_transposed(graph: gs.Graph) -> int:
    """Every Transpose(GatherElements) of the module docstring -> GatherND; the indices built once per index
    tensor. Returns how many."""
    build = NodeBuilder(graph, "tqc_gathernd")
    built: dict[int, gs.Variable] = {}
    count, outputs = 0, {id(t) for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op == "Transpose"]:
        gather = _transposed_gather(node)
        if gather is None or id(node.outputs[0]) in outputs:
            continue
        data, idx = gather.inputs
        if idx.dtype is None:  # an index type not known here: left as it is
            continue
        if id(idx) not in built:
            built[id(idx)] = _indices(build, idx)
        out = build.op("GatherND", [data, built[id(idx)]], node.outputs[0].dtype or data.dtype, {"batch_dims": 1})
        redirect(node.outputs[0], out)
        count += 1
    return count
