"""The rewrite vocabulary every pass uses: take over a tensor's name, add a node, clean up.

A rewrite keeps the graph's boundary names (outputs, and the tensors later passes and ``tqc diff`` line up by
name), so a fused node re-produces the tensor the old subgraph produced, under the same name::

    before                          detach(y)                      produce(graph, "Gelu", ..., outputs=[y])
      x ─► Erf-chain ─► y ─► ...      x ─► Erf-chain ─► y_tqc_detached     x ─► Gelu ─► y ─► ...
                                       (y has no producer now)             (the old chain is dead code)

    cleanup(graph)  removes what no output reaches (graph inputs are kept: the signature never changes)
                    and sorts the nodes topologically.

``replace_output(graph, old, op, ...)`` is ``detach`` + ``produce`` in one call. Removing a node::

    redirect(y, z)                  drop(n)                         bypass(identity)
      n ─► y ─► c   z                 n ─x (no inputs, no outputs)    a ─► Identity ─► b ─► c    a ─► c
      (c reads z now: ─► c)           (cleanup removes it)            (b a graph output: a's producer writes b)

A pass never assigns ``node.outputs`` or calls ``graph.cleanup`` itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

DETACHED_SUFFIX = "_tqc_detached"


def detach(tensor: gs.Tensor, writes: gs.Variable | None = None) -> gs.Tensor:
    """Make ``tensor`` producer-less, so a new node can produce it under the same name; returns it.

    Its old producer writes ``writes`` instead (for the new node to read), by default a fresh, unnamed-elsewhere
    tensor (``<name>_tqc_detached``), which ``cleanup`` removes once nothing reads it."""
    producers = list(tensor.inputs)
    for node in producers:
        instead = writes if writes is not None else gs.Variable(f"{tensor.name}{DETACHED_SUFFIX}")
        node.outputs = [t if t is not tensor else instead for t in node.outputs]
    return tensor


def rebase(tensor: gs.Tensor, suffix: str) -> gs.Tensor:
    """Rename ``tensor`` to ``<name>_tqc_<suffix>``: a rewrite that keeps the model's answer but changes what
    this intermediate holds (a shifted or rescaled basis, a partial sum) gives it a name the float graph does not
    have, so ``tqc diff --layerwise``, which pairs tensors by name, does not report the change of basis as an
    error. Graph inputs and outputs keep their names (the caller never rebases them)."""
    tensor.name = f"{tensor.name}_tqc_{suffix}"
    return tensor


def detach_outputs(node: gs.Node) -> list[gs.Tensor]:
    """Detach every output of ``node``; returns them (in order) for the node that replaces it."""
    outputs = list(node.outputs)
    node.outputs = [gs.Variable(f"{t.name}{DETACHED_SUFFIX}") for t in outputs]
    return outputs


def produce(graph: gs.Graph, op: str, name: str, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor],
            attrs: dict[str, Any] | None = None, domain: str | None = None) -> gs.Node:
    """Append a node; its outputs must be producer-less (fresh, or ``detach``-ed)."""
    node = gs.Node(op, name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=list(outputs))
    if domain:
        node.domain = domain
    graph.nodes.append(node)
    return node


def produce_reduce(graph: gs.Graph, op: str, name: str, x: gs.Tensor, axis: int, out: gs.Tensor,
                   axes_name: str) -> gs.Node:
    """``op`` (ReduceMax, ReduceMean, ...) of ``x`` over one axis, kept, into ``out``: the axes an input (the
    constant ``axes_name``) from opset 18 (ReduceSum: 13), an attribute before."""
    if int(graph.opset) >= (13 if op == "ReduceSum" else 18):
        return produce(graph, op, name, [x, gs.Constant(axes_name, np.array([axis], np.int64))], [out],
                       attrs={"keepdims": 1})
    return produce(graph, op, name, [x], [out], attrs={"keepdims": 1, "axes": [axis]})


class NodeBuilder:
    """Fresh tensors and nodes under one prefix (``{prefix}_{tag}{n}``), for rewrites that build a few nodes."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def variable(self, tag: str, dtype) -> gs.Variable:
        self.count += 1
        return gs.Variable(f"{self.prefix}_{tag}{self.count}", dtype=dtype)

    def const(self, tag: str, value, dtype=np.int64) -> gs.Constant:
        self.count += 1
        return gs.Constant(f"{self.prefix}_{tag}{self.count}", np.array(value, dtype))

    def op(self, op: str, inputs: Sequence[gs.Tensor], dtype, attrs: dict[str, Any] | None = None,
           domain: str | None = None) -> gs.Variable:
        out = self.variable(op.lower(), dtype)
        produce(self.graph, op, out.name, inputs, [out], attrs=attrs, domain=domain)
        return out


def replace_output(graph: gs.Graph, tensor: gs.Tensor, op: str, name: str, inputs: Sequence[gs.Tensor],
                   attrs: dict[str, Any] | None = None, domain: str | None = None) -> gs.Node:
    """``tensor`` is now produced by a new ``op`` node on ``inputs`` (same name, same consumers)."""
    return produce(graph, op, name, inputs, [detach(tensor)], attrs=attrs, domain=domain)


def redirect(tensor: gs.Tensor, replacement: gs.Tensor, skip: gs.Node | None = None) -> int:
    """Every consumer of ``tensor`` (but ``skip``) reads ``replacement`` instead; returns how many inputs changed.

    Each consumer's input list is rebuilt in one assignment (onnx-graphsurgeon then lists that consumer last
    among the readers of each of its inputs, as the passes always did). Graph outputs are not consumers: a
    graph output keeps its producer (use ``replace_output`` there)."""
    count = 0
    for consumer in list(tensor.outputs):
        if consumer is skip:
            continue
        count += sum(1 for current in consumer.inputs if current is tensor)
        consumer.inputs = [replacement if current is tensor else current for current in consumer.inputs]
    return count


def drop(node: gs.Node) -> None:
    """Disconnect ``node`` (no inputs, no outputs); ``cleanup`` removes it. Its outputs are left producer-less."""
    node.inputs.clear()
    node.outputs.clear()


def bypass(node: gs.Node, keep_output_name: bool = False) -> None:
    """Remove a node that passes its one input through (Identity): its consumers read its input instead.

    With ``keep_output_name`` (the output is a graph output, whose name must stay), the input's producer
    writes the output tensor directly and the input's other consumers read it."""
    source, output = node.inputs[0], node.outputs[0]
    if keep_output_name:
        writer = source.inputs[0]
        writer.outputs = [output if t is source else t for t in writer.outputs]
        redirect(source, output, skip=node)
    else:
        redirect(output, source)
    drop(node)


def cleanup(graph: gs.Graph, toposort: bool = True) -> gs.Graph:
    """Remove dead nodes and tensors (never graph inputs: the signature stays) and sort topologically."""
    graph.cleanup(remove_unused_graph_inputs=False)
    if toposort:
        graph.toposort()
    return graph
