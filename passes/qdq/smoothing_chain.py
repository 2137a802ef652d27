"""What SmoothQuant and the shift put before an activation's QuantizeLinear, read back from the graph::

    x ─► Mul(f) [─► Add(c)] ─► QuantizeLinear        =>  (x, f, c)

``smoothing_chain`` is read by the passes that move that chain into the node writing ``x``: OpenVINO's second
LayerNorm (``openvino.fold_smoothing``) and ORT CPU's LayerNorm beta and QAttention value columns
(``shift_fold.py``), each through ``fold_at_quantizers``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values, only_consumer
from tqc.passes.rewrite import cleanup


def channel_constant(node: gs.Node, data: gs.Tensor) -> np.ndarray | None:
    """The other operand of a binary ``node`` as a 1-D per-channel constant (leading 1-dims dropped), else None."""
    if len(node.inputs) != 2 or sum(t is data for t in node.inputs) != 1:
        return None
    values = constant_values(node.inputs[1] if node.inputs[0] is data else node.inputs[0])
    if values is None or values.ndim < 1 or any(d != 1 for d in values.shape[:-1]):
        return None
    return values.reshape(-1)


def smoothing_chain(q: gs.Node) -> tuple[gs.Tensor, np.ndarray, np.ndarray] | None:
    """What SmoothQuant (and the shift) put before an activation's QuantizeLinear: x ─► Mul(f) [─► Add(c)] ─► Q,
    each node the only reader of the tensor before it, f and c per-channel constants: (x, f, c) with c zeros when
    there is no Add; else None."""
    tensor = q.inputs[0]
    node = tensor.inputs[0] if tensor.inputs else None
    offset = None
    if node is not None and node.op == "Add" and only_consumer(node.outputs[0]) is q:
        data = next((t for t in node.inputs if constant_values(t) is None), None)
        offset = channel_constant(node, data) if data is not None else None
        if offset is None:
            return None
        node, reader = (data.inputs[0] if data.inputs else None), node
    else:
        reader = q
    if node is None or node.op != "Mul" or only_consumer(node.outputs[0]) is not reader:
        return None
    x = next((t for t in node.inputs if constant_values(t) is None), None)
    factor = channel_constant(node, x) if x is not None else None
    if factor is None or (offset is not None and offset.size not in (1, factor.size)):
        return None
    return x, factor, np.zeros_like(factor) if offset is None else np.broadcast_to(offset, factor.shape)


def fold_at_quantizers(graph: gs.Graph, fold: Callable[[gs.Graph, gs.Node], bool]) -> int:
    """``fold(graph, q)`` at every QuantizeLinear ``q`` (True where it folded what stands before ``q``), then one
    cleanup; returns how many folded."""
    folded = sum(bool(fold(graph, q)) for q in [n for n in graph.nodes if n.op == "QuantizeLinear"])
    if folded:
        cleanup(graph)
    return folded
