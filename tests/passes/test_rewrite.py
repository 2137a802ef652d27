"""The rewrite vocabulary of ``passes/rewrite.py``: each verb on a tiny graph, checked by names and structure."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.rewrite import (DETACHED_SUFFIX, bypass, cleanup, detach, drop, produce, redirect,
                                replace_output)


def chain() -> tuple[gs.Graph, dict[str, gs.Tensor]]:
    """x, unused -> Relu -> a -> Identity -> b -> Neg -> y (graph output), and a -> Abs -> z (graph output)."""
    t = {name: gs.Variable(name, dtype=np.float32, shape=[2]) for name in ("x", "unused", "a", "b", "y", "z")}
    nodes = [gs.Node("Relu", "relu", inputs=[t["x"]], outputs=[t["a"]]),
             gs.Node("Identity", "identity", inputs=[t["a"]], outputs=[t["b"]]),
             gs.Node("Neg", "neg", inputs=[t["b"]], outputs=[t["y"]]),
             gs.Node("Abs", "abs", inputs=[t["a"]], outputs=[t["z"]])]
    return gs.Graph(nodes=nodes, inputs=[t["x"], t["unused"]], outputs=[t["y"], t["z"]], opset=17), t


def test_replace_output_keeps_the_name_and_the_consumers():
    graph, t = chain()
    node = replace_output(graph, t["a"], "Sigmoid", "sig", [t["x"]])
    assert t["a"].inputs[0] is node and node.outputs[0].name == "a"
    assert {c.name for c in t["a"].outputs} == {"identity", "abs"}
    old = next(n for n in graph.nodes if n.name == "relu")
    assert old.outputs[0].name == "a" + DETACHED_SUFFIX
    cleanup(graph)
    assert [n.name for n in graph.nodes] == ["sig", "identity", "abs", "neg"]
    assert [i.name for i in graph.inputs] == ["x", "unused"]  # the signature stays


def test_detach_then_produce():
    graph, t = chain()
    produce(graph, "Exp", "exp", [t["x"]], [detach(t["z"])], attrs={}, domain=None)
    cleanup(graph)
    assert t["z"].inputs[0].name == "exp"
    assert "abs" not in [n.name for n in graph.nodes]


def test_redirect_rewires_consumers_but_skip_and_counts():
    graph, t = chain()
    identity = next(n for n in graph.nodes if n.name == "identity")
    assert redirect(t["a"], t["x"], skip=identity) == 1
    assert [c.name for c in t["a"].outputs] == ["identity"]
    assert [c.name for c in t["x"].outputs] == ["relu", "abs"]


def test_drop_disconnects():
    graph, t = chain()
    abs_node = next(n for n in graph.nodes if n.name == "abs")
    drop(abs_node)
    assert abs_node.inputs == [] and abs_node.outputs == [] and not t["z"].inputs
    assert [c.name for c in t["a"].outputs] == ["identity"]


def test_bypass_an_identity():
    graph, t = chain()
    bypass(next(n for n in graph.nodes if n.name == "identity"))
    cleanup(graph)
    assert [n.name for n in graph.nodes] == ["relu", "neg", "abs"]
    assert next(n for n in graph.nodes if n.name == "neg").inputs[0] is t["a"]


def test_bypass_keeps_a_graph_outputs_name():
    a = gs.Variable("a", dtype=np.float32, shape=[2])
    out = gs.Variable("out", dtype=np.float32, shape=[2])
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    z = gs.Variable("z", dtype=np.float32, shape=[2])
    identity = gs.Node("Identity", "identity", inputs=[a], outputs=[out])
    graph = gs.Graph(nodes=[gs.Node("Relu", "relu", inputs=[x], outputs=[a]), identity,
                            gs.Node("Abs", "abs", inputs=[a], outputs=[z])], inputs=[x], outputs=[out, z], opset=17)
    bypass(identity, keep_output_name=True)
    cleanup(graph)
    assert [n.name for n in graph.nodes] == ["relu", "abs"]
    assert out.inputs[0].name == "relu"
    assert next(n for n in graph.nodes if n.name == "abs").inputs[0] is out
