"""Residual LayerNorm fusion (ONNX Runtime targets), anchored at a LayerNorm (the op, or a decomposition that
``layernorm`` matches), in one of two forms::

    residual-bias:  LayerNorm(Add(Add(MatMul, b), residual))
    after:          SkipLayerNormalization(MatMul, residual, γ, β, b)           (form 'contrib')
                    LayerNormalization(Sum(MatMul, residual, b), γ, β)          (form 'sum')

Pre-LN encoders (ModernBERT) keep the residual stream: the Add is read by the LayerNorm and by the next
residual Add, and their projections and LayerNorms may have no bias (β absent). Form 'contrib' only, where the
op's fourth output (``input_skip_bias_sum``) re-produces the Add's sum under its name::

    residual-projection:  LayerNorm(Add(MatMul, residual))                    (no b; the Add read only here)
    pre-ln[-bias]:        LayerNorm(s), s = Add([Add(]MatMul[, b)], residual) read by later nodes too
    after:                SkipLayerNormalization(MatMul, residual, γ[, β][, b]) -> (out, -, -, s)

On the 'sum' form these have nothing to gain (Add + LayerNormalization is that form without b).

The contrib op is ORT CUDA's fastest form. On ORT CPU (1.30-1.32) its kernel is 2.5x slower than
Sum + LayerNormalization for a [1, 128, 384] input (0.145 vs 0.058 ms, 2 threads), 1.3 ms of MiniLM's
8 ms INT8 run; and ORT's own SkipLayerNormFusion re-fuses Add + LayerNormalization into the slow op, but
not Sum + LayerNormalization. ``sum`` is therefore ort-cpu's default form.
"""

from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from tqc.passes.fuse.engine import Miss, NoMatch, Rule, Step, StepFunction, Walk, closest, expect, operand_orders
from tqc.passes.fuse.layernorm import LayerNormMatch, layernorm_matches
from tqc.passes.fuse.match import bias_split, constant_values, consumers, describe, producer, through_identity
from tqc.passes.rewrite import detach, produce


def _affine_constant(step: Step, w: Walk) -> list[Walk]:
    match: LayerNormMatch = w["layernorm"]
    if constant_values(match.gamma) is None or (match.beta is not None and constant_values(match.beta) is None):
        raise NoMatch(f"{describe(match.last)} has a computed γ or β")
    return [w]


def _residual_add(step: Step, w: Walk) -> list[Walk]:
    match: LayerNormMatch = w["layernorm"]
    add = expect(match.x, step)
    readers = len(consumers(add.outputs[0]))
    if readers != match.own_consumers_of_x:
        raise NoMatch(f"{describe(add)} is read by {readers} nodes, not only by the LayerNorm")
    if any(isinstance(t, gs.Constant) for t in add.inputs):
        raise NoMatch(f"{describe(add)} adds a constant")
    return [w.bind(residual_add=add, nodes=[add])]


def _residual_stream(step: Step, w: Walk) -> list[Walk]:
    """Pre-LN: the residual Add is read by the LayerNorm and by later nodes (the stream goes on)."""
    match: LayerNormMatch = w["layernorm"]
    add = expect(match.x, step)
    if len(consumers(add.outputs[0])) == match.own_consumers_of_x:
        raise NoMatch(f"{describe(add)} is read only by the LayerNorm (no residual stream to keep)")
    if any(isinstance(t, gs.Constant) for t in add.inputs):
        raise NoMatch(f"{describe(add)} adds a constant")
    return [w.bind(residual_add=add, keep_sum=add.outputs[0], nodes=[add])]


def _projection(step: Step, w: Walk) -> list[Walk]:
    """A projection without bias: one operand of the residual Add is a MatMul read only by it."""
    add: gs.Node = w["residual_add"]
    pairs = [(a, b) for a, b in operand_orders(add, step) if producer(a) is not None and producer(a).op == "MatMul"
             and len(consumers(a)) == 1]
    if not pairs:
        raise NoMatch(f"neither operand of {describe(add)} is a MatMul read only by it")
    return [w.bind(x=pairs[0][0], residual=pairs[0][1], bias=None)]


def _bias_projection(step: Step, w: Walk) -> list[Walk]:
    """The first operand order whose first operand is a biased projection (no second try on a later miss)."""
    add: gs.Node = w["residual_add"]
    pairs = [(a, b) for a, b in operand_orders(add, step) if bias_split(a) is not None]
    if not pairs:
        raise NoMatch(f"neither operand of {describe(add)} is Add(MatMul, b) with a constant 1-D b (an embedding "
                      "sum, or a residual without a biased projection)")
    projection, residual = pairs[0]
    readers = len(consumers(projection))
    if readers != 1:
        raise NoMatch(f"the projection '{projection.name}' is read by {readers} nodes")
    data, bias, bias_add = bias_split(projection)
    return [w.bind(x=data, residual=residual, bias=bias, nodes=[bias_add])]


STEPS: dict[str, StepFunction] = {"affine_constant": _affine_constant, "residual_add": _residual_add,
                                 "residual_stream": _residual_stream, "bias_projection": _bias_projection,
                                 "projection": _projection}

_AFFINE = Step("affine_constant", ("LayerNorm",))
_ANCHOR = ("LayerNormalization", "Add")

RULES: tuple[Rule, ...] = (
    Rule(
        name="residual-bias",
        description="BERT-style residual: LayerNorm(Add(Add(MatMul, b), residual)), any operand order; "
                    "embedding sums (a position table may broadcast from [1, S, H]) are left alone",
        anchor=("LayerNormalization", "Add"),
        steps=(_AFFINE, Step("residual_add", ("Add",), commutative=True),
               Step("bias_projection", ("Add",), commutative=True)),
    ),
)

# Form 'contrib' only (module docstring): no projection bias, or a pre-LN residual stream.
CONTRIB_RULES: tuple[Rule, ...] = (
    Rule("residual-projection", "LayerNorm(Add(MatMul, residual)): a projection without bias",
         _ANCHOR, (_AFFINE, Step("residual_add", ("Add",), commutative=True),
                   Step("projection", ("MatMul",), commutative=True))),
    Rule("pre-ln-bias", "pre-LN residual stream: LayerNorm(s), s = Add(Add(MatMul, b), residual) read on",
         _ANCHOR, (_AFFINE, Step("residual_stream", ("Add",), commutative=True),
                   Step("bias_projection", ("Add",), commutative=True))),
    Rule("pre-ln", "pre-LN residual stream without bias (ModernBERT): LayerNorm(s), s = Add(MatMul, residual)",
         _ANCHOR, (_AFFINE, Step("residual_stream", ("Add",), commutative=True),
                   Step("projection", ("MatMul",), commutative=True))),
)


def fuse_skip_layernorm(graph: gs.Graph, form: str = "contrib") -> tuple[int, list[Miss]]:
    """Fuse residual LayerNorms into ``form``: 'contrib' (SkipLayerNormalization) or 'sum' (see above).

    LayerNorms written out in primitives (opset < 17 exports) are matched too; there the 'sum' form has no
    LayerNormalization op to use, so they become SkipLayerNormalization whatever the form. Returns (count,
    the residual Adds before a LayerNorm that no rule matched).
    """
    count = 0
    misses: list[Miss] = []
    can_sum = int(graph.opset) >= 17
    rules = RULES if form == "sum" and can_sum else RULES + CONTRIB_RULES
    for match in layernorm_matches(graph):
        ln = match.last
        found = closest(rules, Walk(ln, bound=(("layernorm", match),)), STEPS)
        if isinstance(found, Miss):
            add = producer(match.x)
            if add is not None and add.op == "Add":
                where = f"the LayerNorm ending at {describe(ln)}" if match.decomposed else describe(ln)
                misses.append(replace(found, anchor=f"{describe(add)} before {where}"))
            continue
        found = found[1]
        name = f"tqc_skipln{count}"
        gamma = through_identity(match.gamma)
        beta = through_identity(match.beta) if match.beta is not None else gs.Variable.empty()
        bias = gs.Constant(f"{name}_bias", found["bias"]) if found["bias"] is not None else None
        out = detach(ln.outputs[0])
        if found.get("keep_sum") is not None or bias is None:
            outputs = [out] if found.get("keep_sum") is None else \
                [out, gs.Variable.empty(), gs.Variable.empty(), detach(found["keep_sum"])]
            inputs = [found.x, found["residual"], gamma] + ([beta] if bias is None else [beta, bias])
            produce(graph, "SkipLayerNormalization", name, inputs if inputs[-1].name else inputs[:-1], outputs,
                    attrs={"epsilon": match.epsilon}, domain="com.microsoft")
        elif form == "sum" and can_sum:
            total = gs.Variable(f"{name}_sum", dtype=out.dtype)
            produce(graph, "Sum", f"{name}_Sum", [found.x, found["residual"], bias], [total])
            produce(graph, "LayerNormalization", name, [total, gamma, beta], [out],
                    attrs={"axis": -1, "epsilon": match.epsilon})
        else:
            produce(graph, "SkipLayerNormalization", name, [found.x, found["residual"], gamma, beta, bias], [out],
                    attrs={"epsilon": match.epsilon}, domain="com.microsoft")
        count += 1
    return count, misses
