"""DeBERTa's p2c scores computed in [key, position] order, so they are gathered straight into [query, key] order:
no Transpose after the gather (one kernel a layer fewer on ORT CUDA).

``shared_positions`` leaves p2c as a MatMul by a constant, a gather along the positions and a transpose::

    before:  S = Reshape(Flatten(MatMul(k4 [B, H, S, D], W [H, D, 2k]), 2), [0, -1, 2k])            [B·H, S, 2k]
             p2c = Transpose(GatherElements(S, idx [B·H, S, S], axis=-1), [0, 2, 1])               [B·H, S, S]
             p2c[n, i, j] = S[n, j, idx[n, j, i]]
    after:   M = FusedMatMul(Wᵀ [H, 2k, D], k4, transB=1) = Sᵀ per row                              [B, H, 2k, S]
             p2c = GatherElements(Reshape(Flatten(M, 2), [0, 2k, -1]), Transpose(idx), axis=1)
             p2c[n, i, j] = M[n, idx[n, j, i], j]          (Transpose(idx) is made once per index tensor)

The same products (x·y = y·x, rounding aside) and the same gathered entries, so the answer stays within
rounding. ORT's FusedMatMul transposes B inside the GEMM (no kernel of its own). Taken where each tensor from
the MatMul to the Transpose has that one reader, the weight is a constant [H, D, 2k], and nothing on the way
is a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.rewrite import NodeBuilder, redirect


def _only(tensor: gs.Tensor, op: str, outputs: set[int]) -> gs.Node | None:
    """The ``op`` node producing ``tensor`` when ``tensor`` has one reader and is no graph output; else None."""
    node = producer(tensor)
    ok = node is not None and node.op == op and len(tensor.outputs) == 1 and id(tensor) not in outputs
    return node if ok else None


def _p2c(transpose: gs.Node, outputs: set[int]) -> tuple[gs.Node, gs.Node, np.ndarray] | None:
    """(GatherElements, MatMul, W) of the module docstring's ``before`` ending at ``transpose``; else None."""
    if list(transpose.attrs.get("perm", ())) != [0, 2, 1]:
        return None
    gather = _only(transpose.inputs[0], "GatherElements", outputs)
    if gather is None or int(gather.attrs.get("axis", 0)) not in (-1, 2):
        return None
    reshape = _only(gather.inputs[0], "Reshape", outputs)
    flatten = _only(reshape.inputs[0], "Flatten", outputs) if reshape is not None else None
    matmul = _only(flatten.inputs[0], "MatMul", outputs) if flatten is not None else None
    if matmul is None or int(flatten.attrs.get("axis", 1)) != 2:
        return None
    weight = constant_values(matmul.inputs[1])
    target = constant_values(reshape.inputs[1])
    if weight is None or weight.ndim != 3 or target is None or target.reshape(-1).tolist()[:2] != [0, -1] or \
            target.size != 3 or int(target.reshape(-1)[2]) != weight.shape[2]:
        return None
    return gather, matmul, weight


def transpose_scores(graph: gs.Graph) -> int:
    """Every p2c of the module docstring rewritten; returns how many."""
    build = NodeBuilder(graph, "tqc_p2c")
    outputs = {id(t) for t in graph.outputs}
    moved: dict[int, gs.Variable] = {}
    count = 0
    for node in [n for n in graph.nodes if n.op == "Transpose"]:
        found = _p2c(node, outputs) if id(node.outputs[0]) not in outputs else None
        if found is None:
            continue
        gather, matmul, weight = found
        if gather.inputs[1].dtype is None:  # an index type not known here: left as it is
            continue
        idx, k4, dtype = gather.inputs[1], matmul.inputs[0], matmul.outputs[0].dtype or np.float32
        if id(idx) not in moved:
            moved[id(idx)] = build.op("Transpose", [idx], idx.dtype, {"perm": [0, 2, 1]})
        positions = build.const("weight", np.ascontiguousarray(weight.transpose(0, 2, 1)), weight.dtype)
        scores = build.op("FusedMatMul", [positions, k4], dtype, {"transB": 1, "alpha": 1.0}, domain="com.microsoft")
        flat = build.op("Flatten", [scores], dtype, {"axis": 2})
        rows = build.op("Reshape", [flat, build.const("shape", [0, weight.shape[2], -1])], dtype)
        redirect(node.outputs[0], build.op("GatherElements", [rows, moved[id(idx)]], dtype, {"axis": 1}))
        count += 1
    return count
