"""A scalar Div (or Mul) after a MatMul by a constant, past data movement only -> the constant scaled instead.

DeBERTa-v2/v3 divide the gathered c2p and p2c scores by sqrt(3 · head size) in every layer; once
``shared_positions`` has made the position projection a constant, the division goes into it (one Div kernel
fewer for each of c2p and p2c, per layer)::

    before:  Div(GatherElements(MatMul(q, P), index), s)               Div(Transpose(GatherElements(MatMul(k, P'), i)), s)
    after:   GatherElements(MatMul(q, P / s), index)                   Transpose(GatherElements(MatMul(k, P' / s), i))

Exact up to rounding: a gather, transpose or reshape moves values without changing them, and (x P) / s is
x (P / s). Taken only where every tensor from the MatMul to the Div has that one reader (no other node sees the
unscaled values) and the scale is a finite non-zero scalar.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.rewrite import drop, redirect

# ops that move values without changing them (input 0 is the data)
MOVES = ("GatherElements", "Gather", "Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze")


def _scalar(tensor: gs.Tensor) -> float | None:
    value = constant_values(tensor)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    scalar = float(value.reshape(-1)[0])
    return scalar if np.isfinite(scalar) and scalar != 0.0 else None


def _scaled_matmul(tensor: gs.Tensor, outputs: set[int]) -> gs.Node | None:
    """The MatMul by a constant (input 1) whose output reaches ``tensor`` through ``MOVES`` alone, every
    tensor on the way read once and none a graph output (``outputs``: their ids); else None."""
    while True:
        node = producer(tensor)
        if node is None or len(node.outputs[0].outputs) != 1 or id(node.outputs[0]) in outputs:
            return None
        if node.op == "MatMul":
            return node if isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].outputs) == 1 else None
        if node.op not in MOVES:
            return None
        tensor = node.inputs[0]


def scale_into_weights(graph: gs.Graph) -> int:
    """Every Div/Mul (module docstring) folded into its MatMul's constant; returns how many."""
    folded, outputs = 0, {id(t) for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op in ("Div", "Mul")]:
        if len(node.inputs) != 2 or id(node.outputs[0]) in outputs:
            continue
        scale = _scalar(node.inputs[1])
        data = node.inputs[0]
        if scale is None and node.op == "Mul" and (scale := _scalar(node.inputs[0])) is not None:
            data = node.inputs[1]
        matmul = _scaled_matmul(data, outputs) if scale is not None else None
        if matmul is None:
            continue
        weight = matmul.inputs[1]
        values = np.asarray(weight.values)
        wide = values.astype(np.float64)
        scaled = wide / scale if node.op == "Div" else wide * scale
        matmul.inputs[1] = gs.Constant(f"{weight.name}_scaled", scaled.astype(values.dtype))
        redirect(node.outputs[0], data)
        drop(node)
        folded += 1
    return folded
