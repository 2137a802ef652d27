"""LayerNorm written out in primitives -> LayerNormalization; and every LayerNorm of a graph (the op or such a
decomposition), which the residual and embedding fusions start from.

torch's legacy exporter below opset 17 writes LayerNorm as nine ops; the rules walk back from the last Add (β)::

    legacy-pow:  Add(Mul(Div(x - ReduceMean(x), Sqrt(ReduceMean(Pow(x - mean, 2)) + eps)), γ), β)
    legacy-mul:  the same, the square written Mul(x - mean, x - mean)
    legacy-pow-nobias, legacy-mul-nobias:  without β (ModernBERT's nn.LayerNorm(bias=False)), from the Mul (γ)

    after:  LayerNormalization(x, γ, β, axis=-1, epsilon=eps)          (opset ≥ 17; below, there is no such op:
                                                                        the residual and embedding fusions match
                                                                        the primitives directly)

``--explain fuse`` names, for each LayerNorm-shaped ReduceMean left unfused, the closest rule from the Adds after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.engine import (Miss, NoMatch, Rule, Step, StepFunction, Walk, close, closest, expect,
                                    operand_orders)
from tqc.passes.fuse.match import constant_values, consumers, describe, producer, scalar_value, through_identity
from tqc.passes.rewrite import replace_output


@dataclass
class LayerNormMatch:
    """A LayerNormalization over the last axis: the op (opset >= 17) or its decomposition (older exports)."""

    x: gs.Tensor
    gamma: gs.Tensor
    beta: gs.Tensor | None   # None: a LayerNorm without bias (ModernBERT's nn.LayerNorm(bias=False))
    epsilon: float
    last: gs.Node        # the node producing the normalized output
    decomposed: bool
    nodes: tuple[gs.Node, ...] = field(default=())   # a decomposition's nodes

    @property
    def own_consumers_of_x(self) -> int:
        return 2 if self.decomposed else 1  # the decomposition reads x in ReduceMean and Sub


def _last_axis_mean(node: gs.Node | None, x: gs.Tensor | None = None) -> bool:
    if node is None or node.op != "ReduceMean" or (x is not None and node.inputs[0] is not x):
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant_values(node.inputs[1])
    return axes is not None and list(np.asarray(axes).reshape(-1)) == [-1] and node.attrs.get("keepdims", 1) == 1


def _constant_vector(tensor: gs.Tensor) -> bool:
    values = constant_values(tensor)
    return values is not None and values.ndim == 1


def _with_constant_vector(node: gs.Node, step: Step, w: Walk, role: str, symbol: str) -> list[Walk]:
    """Every operand order of ``node`` whose second operand is a constant 1-D vector, bound as ``role``; the walk
    goes on from the first operand."""
    fits = [w.bind(tensor=other, nodes=[node], **{role: vector}) for other, vector in operand_orders(node, step)
            if _constant_vector(vector)]
    if not fits:
        raise NoMatch(f"neither operand of {describe(node)} is a constant 1-D {symbol}")
    return fits


def _shift(step: Step, w: Walk) -> list[Walk]:
    add = w.anchor
    if add.op not in step.op or len(add.inputs) != 2:
        raise NoMatch(f"{describe(add)} is no two-input Add")
    return _with_constant_vector(add, step, w, "beta", "β")


def _scale(step: Step, w: Walk) -> list[Walk]:
    return _with_constant_vector(expect(w.tensor, step), step, w, "gamma", "γ")


def _last_scale(step: Step, w: Walk) -> list[Walk]:
    """A LayerNorm without β ends in its γ Mul: the anchor."""
    if w.anchor.op not in step.op or len(w.anchor.inputs) != 2:
        raise NoMatch(f"{describe(w.anchor)} is no two-input Mul")
    return _with_constant_vector(w.anchor, step, w, "gamma", "γ")


def _normalize(step: Step, w: Walk) -> list[Walk]:
    div = expect(w.tensor, step)
    centered, root = div.inputs
    return [w.bind(tensor=centered, centered=centered, root=root, nodes=[div])]


def _center(step: Step, w: Walk) -> list[Walk]:
    sub = expect(w.tensor, step)
    x, mean = sub.inputs[0], producer(sub.inputs[1])
    if not _last_axis_mean(mean, x):
        raise NoMatch(f"{describe(sub)} subtracts {describe(mean)}, not ReduceMean(x, axes=[-1], keepdims=1) of "
                      f"its first operand '{x.name}'")
    return [w.bind(tensor=w["root"], x=x, mean=mean, nodes=[sub, mean])]


def _root(step: Step, w: Walk) -> list[Walk]:
    sqrt = expect(w.tensor, step)
    return [w.bind(tensor=sqrt.inputs[0], nodes=[sqrt])]


def _epsilon(step: Step, w: Walk) -> list[Walk]:
    add = expect(w.tensor, step)
    fits = [w.bind(tensor=variance, epsilon=scalar_value(eps), nodes=[add])
            for variance, eps in operand_orders(add, step) if scalar_value(eps) is not None]
    if not fits:
        raise NoMatch(f"neither operand of {describe(add)} is a scalar constant ε")
    return fits


def _variance(step: Step, w: Walk) -> list[Walk]:
    mean = producer(w.tensor)
    if not _last_axis_mean(mean):
        raise NoMatch(f"expected ReduceMean(axes=[-1], keepdims=1) producing '{w.tensor.name}', found {describe(mean)}")
    return [w.bind(tensor=mean.inputs[0], nodes=[mean])]


def _square(step: Step, w: Walk) -> list[Walk]:
    square, centered = expect(w.tensor, step), w["centered"]
    if square.inputs[0] is not centered:
        raise NoMatch(f"{describe(square)} squares '{square.inputs[0].name}', not x - mean ('{centered.name}')")
    if square.op == "Pow" and not close(scalar_value(square.inputs[1]), step.value, step.tolerance):
        raise NoMatch(f"{describe(square)} raises to {scalar_value(square.inputs[1])}, not {step.value:g}")
    if square.op == "Mul" and square.inputs[1] is not centered:
        raise NoMatch(f"{describe(square)} multiplies x - mean by '{square.inputs[1].name}', not by itself")
    return [w.bind(nodes=[square])]


STEPS: dict[str, StepFunction] = {"shift": _shift, "scale": _scale, "last_scale": _last_scale, "normalize": _normalize, "center": _center,
                                 "root": _root, "epsilon": _epsilon, "variance": _variance, "square": _square}


def _steps(square: Step, bias: bool = True) -> tuple[Step, ...]:
    ends = (Step("shift", ("Add",), commutative=True), Step("scale", ("Mul",), commutative=True)) if bias else \
        (Step("last_scale", ("Mul",), commutative=True),)
    return ends + (
        Step("normalize", ("Div",)),
        Step("center", ("Sub",)),
        Step("root", ("Sqrt",)),
        Step("epsilon", ("Add",), commutative=True),
        Step("variance", ("ReduceMean",)),
        square,
    )


RULES: tuple[Rule, ...] = (
    Rule(
        name="legacy-pow",
        description="torch's legacy exporter below opset 17: the variance of (x - mean) squared by Pow(·, 2)",
        anchor=("Add",), steps=_steps(Step("square", ("Pow",), 2.0, tolerance=0.0)),
    ),
    Rule(
        name="legacy-mul",
        description="LayerNorm written by hand (or other exporters): (x - mean) squared as Mul(c, c)",
        anchor=("Add",), steps=_steps(Step("square", ("Mul",))),
    ),
    Rule(
        name="legacy-pow-nobias",
        description="legacy-pow without β (nn.LayerNorm(bias=False), ModernBERT): ends in the γ Mul",
        anchor=("Mul",), steps=_steps(Step("square", ("Pow",), 2.0, tolerance=0.0), bias=False),
    ),
    Rule(
        name="legacy-mul-nobias",
        description="legacy-mul without β: ends in the γ Mul",
        anchor=("Mul",), steps=_steps(Step("square", ("Mul",)), bias=False),
    ),
)


def match_decomposed_layernorm(last: gs.Node) -> LayerNormMatch | Miss:
    """Add(Mul(Div(x - mean(x), Sqrt(mean((x - mean(x))^2) + eps)), gamma), beta), as opset < 17 exports
    write LayerNorm (torch's legacy exporter: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add),
    ending at ``last`` (the β Add, or the γ Mul of a LayerNorm without β); else the closest rule and why it
    stopped."""
    found = closest([r for r in RULES if last.op in r.anchor], Walk(last), STEPS)
    if isinstance(found, Miss):
        return found
    found = found[1]
    return LayerNormMatch(found.x, found["gamma"], found.get("beta"), found["epsilon"], last, decomposed=True,
                          nodes=found.nodes)


def layernorm_matches(graph: gs.Graph) -> list[LayerNormMatch]:
    matches = []
    for node in list(graph.nodes):
        if node.op == "LayerNormalization" and node.domain in (None, "", "ai.onnx"):
            if len(node.inputs) < 2 or node.attrs.get("axis", -1) != -1 or \
                    len([o for o in node.outputs if o.outputs or o.name]) > 1:
                continue
            beta = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            matches.append(LayerNormMatch(node.inputs[0], node.inputs[1], beta,
                                          float(node.attrs.get("epsilon", 1e-5)), node, decomposed=False))
        elif node.op == "Add":
            match = match_decomposed_layernorm(node)
            if isinstance(match, LayerNormMatch):
                matches.append(match)
    covered = {id(n) for m in matches for n in m.nodes}  # a γ Mul inside a LayerNorm with β is no LayerNorm end
    for node in list(graph.nodes):
        if node.op == "Mul" and id(node) not in covered:
            match = match_decomposed_layernorm(node)
            if isinstance(match, LayerNormMatch):
                matches.append(match)
    return matches


def layernorm_candidates(graph: gs.Graph) -> list[gs.Node]:
    """LayerNorm-shaped ReduceMeans: mean(x) over the last axis, subtracted from that x by a Sub."""
    return [n for n in graph.nodes if _last_axis_mean(n) and
            any(u.op == "Sub" and u.inputs[0] is n.inputs[0] and u.inputs[1] is n.outputs[0]
                for u in consumers(n.outputs[0]))]


def _spine_ends(mean: gs.Node) -> tuple[list[gs.Node], list[gs.Node]]:
    """The Muls (γ) a LayerNorm's centered x reaches through Div, and the Adds (β) after them."""
    tensors = [u.outputs[0] for u in consumers(mean.outputs[0]) if u.op == "Sub"]
    tensors = [u.outputs[0] for t in tensors for u in consumers(t) if u.op == "Div"]
    muls = [u for t in tensors for u in consumers(t) if u.op == "Mul"]
    return muls, [u for m in muls for u in consumers(m.outputs[0]) if u.op == "Add"]


def explain_layernorm(mean: gs.Node, limit: int = 32) -> Miss:
    """Why the LayerNorm-shaped ``mean`` is no decomposed LayerNorm: the Adds after it (those on the
    Sub-Div-Mul spine first, then any within ``limit`` nodes) are tried as the LayerNorm's end (its β Add), then
    the γ Muls on the spine (the end of one without β); the rule that got furthest from any of them (on a tie,
    the earlier candidate)."""
    muls, candidates = _spine_ends(mean)
    frontier, seen = [mean], {id(mean)}
    while frontier and len(seen) <= limit:
        node = frontier.pop(0)
        for user in (u for out in node.outputs for u in consumers(out)):
            if id(user) not in seen and len(seen) <= limit:
                seen.add(id(user))
                frontier.append(user)
                if user.op == "Add" and all(user is not c for c in candidates):
                    candidates.append(user)
    best: Miss | None = None
    for end in candidates + muls:
        found = closest([r for r in RULES if end.op in r.anchor], Walk(end), STEPS)
        if isinstance(found, Miss) and (best is None or found.step > best.step):
            best = found
    if best is None:
        return Miss(describe(mean), RULES[0].name, f"no Add (β) follows within {limit} nodes: not a LayerNorm")
    return replace(best, anchor=describe(mean))


def fuse_layernorm(graph: gs.Graph) -> tuple[int, list[Miss]]:
    """Decomposed LayerNorms -> LayerNormalization (opset >= 17 only: older opsets have no such op).

    Returns (count, the LayerNorm-shaped ReduceMeans no rule matched, at any opset)."""
    count = 0
    matches = [m for m in layernorm_matches(graph) if m.decomposed]
    covered = {id(n) for m in matches for n in m.nodes}
    misses = [explain_layernorm(n) for n in layernorm_candidates(graph) if id(n) not in covered]
    if int(graph.opset) < 17:
        return 0, misses
    for match in matches:
        beta = [through_identity(match.beta)] if match.beta is not None else []
        replace_output(graph, match.last.outputs[0], "LayerNormalization", f"tqc_layernorm{count}",
                       [match.x, through_identity(match.gamma)] + beta,
                       attrs={"axis": -1, "epsilon": match.epsilon})
        count += 1
    return count, misses


