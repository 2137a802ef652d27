"""``qdq{split}``'s float part recomputed from the layer that produces the split channels, instead of gathered.

A split layer's outlier channels come, in an encoder's FFN output layer, from a few columns of the FFN input
layer before it: ``x -> MatMul(W1) -> (bias, GELU: elementwise) -> h -> MatMul(W2)``. Gathering them from ``h``
(``Gather(h, channels)``) needs ``h`` in float, which breaks the chain OpenVINO fuses into the FFN input layer's
INT8 FullyConnected (bias, GELU, the next layer's SmoothQuant Mul and quantization: its output leaves as u8).
Recomputing them keeps that chain::

    x ─► [INT8 path, W1, GELU ... fused] ─► h ─► MatMul(W2, split rows 0, INT8) ─► Add ─►
    └──► MatMul(W1's split columns, float) ─► (the same elementwise nodes, their per-channel constants sliced) ─┘
                                                                         └─► Mul / MatMul(W2's split rows)

exact in float: the same ops on the same columns. (One channel computed twice, so that OpenVINO runs a [K, 2]
FullyConnected in its brgemm kernel instead of [K, 1] in a generic gemm, was slower end to end on MiniLM: 1.10 /
1.07 / 1.03 the time without the split at 1x16 / 1x128 / 8x128, against 1.03 / 1.03 / 1.01.) ``find_producer``
reads the graph before quantization (the float weight columns, the float input ``x``, the elementwise nodes);
``recompute`` writes the float nodes after it.
Where the channels do not come from such a chain (a LayerNorm output: the FFN input layers) there is no producer
and the split gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values
from tqc.passes.rewrite import NodeBuilder

# Elementwise ops a producer chain may hold (per element of the channel axis; constants broadcast on it)
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Relu", "Sqrt", "Neg", "Exp", "Gelu",
               "BiasGelu", "FastGelu"}
MAX_NODES = 16


@dataclass(frozen=True)
class ChainNode:
    """One elementwise node of the chain: its inputs are chain tensors (by name) or constants (sliced)."""

    op: str
    domain: str
    attrs: dict
    inputs: tuple  # str (a chain tensor: the MatMul's output or an earlier node's) or np.ndarray (a constant)
    output: str


@dataclass(frozen=True)
class Producer:
    """How the split channels of a layer input are computed: the producing MatMul's float input and weight columns
    [K, k], then the elementwise nodes up to the layer input (in order)."""

    input: str
    root: str  # the MatMul's output name (the chain's start)
    columns: np.ndarray
    nodes: tuple[ChainNode, ...]


def _sliced(value: np.ndarray, width: int, channels: list[int]) -> np.ndarray | None:
    """A constant of the chain on the split channels: kept where it broadcasts (size 1), its last axis sliced where
    it is per channel ([..., width] with leading 1s); None where it is neither."""
    if value.size == 1:
        return value
    if value.shape and value.shape[-1] == width and value.size == width:
        return value[..., channels]
    return None


def find_producer(graph: gs.Graph, tensor: str, channels: tuple[int, ...]) -> Producer | None:
    """The producer of ``tensor``'s ``channels`` (module docstring), or None where ``tensor`` is not an elementwise
    function of one MatMul's output with a constant [K, N] weight (N = the channels' axis)."""
    tensors = graph.tensors()
    start = tensors.get(tensor)
    if not isinstance(start, gs.Variable):
        return None
    picked = list(channels)
    order: list[gs.Node] = []
    root: list[gs.Node] = []
    seen: set[int] = set()

    def visit(var: gs.Variable) -> bool:
        if not var.inputs:
            return False
        node = var.inputs[0]
        if id(node) in seen:
            return True
        if node.op == "MatMul":
            weight = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
            if weight is None or weight.ndim != 2 or not isinstance(node.inputs[0], gs.Variable) or root:
                return False
            root.append(node)
            seen.add(id(node))
            return True
        if node.op not in ELEMENTWISE or len(node.outputs) != 1 or len(order) >= MAX_NODES:
            return False
        if not all(isinstance(t, gs.Constant) or visit(t) for t in node.inputs):
            return False
        order.append(node)
        seen.add(id(node))
        return True

    if not visit(start) or not root:
        return None
    weight = constant_values(root[0].inputs[1])
    width = weight.shape[1]
    if max(picked) >= width:
        return None
    nodes = []
    for node in order:
        inputs = []
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                value = _sliced(np.asarray(t.values), width, picked)
                if value is None:
                    return None
                inputs.append(value)
            else:
                inputs.append(t.name)
        nodes.append(ChainNode(node.op, node.domain or "", dict(node.attrs), tuple(inputs), node.outputs[0].name))
    if not order or order[-1].outputs[0] is not start:  # a bare MatMul output is gathered as it is
        return None
    return Producer(root[0].inputs[0].name, root[0].outputs[0].name, np.array(weight[:, picked], np.float32),
                    tuple(nodes))


def recompute(graph: gs.Graph, producer: Producer, build: NodeBuilder, ftype) -> gs.Variable | None:
    """The split channels [..., k] recomputed in float from ``producer`` (after quantization); None where its input
    is gone."""
    source = graph.tensors().get(producer.input)
    if source is None:
        return None
    values = {producer.root: build.op("MatMul", [source, build.const("columns", producer.columns, ftype)], ftype)}
    for node in producer.nodes:
        inputs = [values[t] if isinstance(t, str) else build.const("constant", t, t.dtype) for t in node.inputs]
        values[node.output] = build.op(node.op, inputs, ftype, attrs=dict(node.attrs), domain=node.domain or None)
    return values[producer.nodes[-1].output]
