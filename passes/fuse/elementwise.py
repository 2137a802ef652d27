"""GELU, LayerNorm and SkipLayerNormalization fusion: the rules of ``elementwise_rules``, walked.

GELU, exact (erf) form, any order of the final multiplications::

    x ─► Div(√2) ─► Erf ─► Add(1) ─► Mul(x) ─► Mul(0.5)        ──►  Gelu(x)                  (trt, opset ≥ 20)
                                                               ──►  BiasGelu(xw, b) / Gelu   (ort: com.microsoft)
GELU, tanh form (gelu_new: ALBERT)::

    0.5·x·(1 + Tanh(√(2/π)·(x + 0.044715·x³)))                 ──►  Gelu(x, approximate=tanh) (trt, opset ≥ 20)
                                                               ──►  FastGelu(xw, b)           (ort)
LayerNorm written out in primitives (torch's legacy exporter below opset 17)::

    x - mean(x) ─► Pow 2 ─► mean ─► + eps ─► Sqrt ─► Div ─► Mul(γ) ─► Add(β)    ──►  LayerNormalization (opset ≥ 17)
    (below opset 17 there is no such op: the residual and embedding fusions match the primitives directly)

Residual LayerNorm (ort targets only), in one of two forms::

    LayerNormalization(Add(Add(MatMul, b), residual))          ──►  SkipLayerNormalization(MatMul, residual, γ, β, b)
                                                               ──►  LayerNormalization(Sum(MatMul, residual, b), γ, β)

The contrib op is ORT CUDA's fastest form. On ORT CPU (1.30-1.32) its kernel is 2.5x slower than
Sum + LayerNormalization for a [1, 128, 384] input (0.145 vs 0.058 ms, 2 threads), 1.3 ms of MiniLM's
8 ms INT8 run; and ORT's own SkipLayerNormFusion re-fuses Add + LayerNormalization into the slow op, but
not Sum + LayerNormalization. ``sum`` is therefore ort-cpu's default form.

Each rule is walked step by step (``walk``), a commutative step trying both operand orders; an anchor no rule
matches gets a ``Miss``: the rule that got furthest and why it stopped (``--explain fuse``)::

    Erf 'e' ─► Add(2) ─► ...      Miss("Erf 'e'", "erf", "step 2 (plus_one: Add(1) either order): Add 'a' adds 2, not 1")

Every rewrite re-produces the old subgraph's output under its name (``rewrite.replace_output``/``produce``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.core.target import Target
from tqc.passes.fuse.elementwise_rules import (GELU_RULES, LAYERNORM_RULES, SKIP_LAYERNORM_RULES, GeluRule,
                                               LayerNormRule, SkipLayerNormRule, Step)
from tqc.passes.fuse.match import (NoMatch, through_identity, constant_values, consumers, describe, either_order,
                                   other_operand, producer, scalar_value, split_scalar_operand)
from tqc.passes.rewrite import detach, produce, replace_output


def _close(value: float | None, target: float, tol: float = 1e-3) -> bool:
    return value is not None and abs(value - target) <= tol * max(1.0, abs(target))


def _users(tensor: gs.Tensor) -> str:
    return ", ".join(describe(u) for u in consumers(tensor)) or "nothing"


@dataclass(frozen=True)
class Walk:
    """What a rule has bound so far; each step returns new ``Walk``s (one per operand-order alternative)."""

    anchor: gs.Node
    tensor: gs.Tensor | None = None          # where the next step starts
    x: gs.Tensor | None = None               # the pattern's input
    nodes: tuple[gs.Node, ...] = ()          # the nodes the pattern covers (so far)
    bound: tuple[tuple[str, object], ...] = ()

    def bind(self, tensor: gs.Tensor | None = None, x: gs.Tensor | None = None, nodes: Sequence[gs.Node] = (),
             **bound: object) -> "Walk":
        return replace(self, tensor=self.tensor if tensor is None else tensor, x=self.x if x is None else x,
                       nodes=self.nodes + tuple(nodes), bound=self.bound + tuple(bound.items()))

    def __getitem__(self, name: str) -> object:
        return dict(self.bound)[name]


StepFunction = Callable[[Step, Walk], list[Walk]]


def walk(steps: tuple[Step, ...], start: Walk, kinds: dict[str, StepFunction], index: int = 0) -> Walk:
    """Match ``steps`` from ``start``, depth first over each step's alternatives; the first complete walk wins.

    A step function returns the alternatives that fit (a commutative step: up to one per operand order) or
    raises ``NoMatch``; on a miss the reason of the deepest step is raised, with ``depth`` = that step's index."""
    if index == len(steps):
        return start
    step = steps[index]
    try:
        alternatives = kinds[step.kind](step, start)
    except NoMatch as miss:
        raise NoMatch(f"step {index + 1} ({step}): {miss.reason}", index) from None
    deepest: NoMatch | None = None
    for alternative in alternatives:
        try:
            return walk(steps, alternative, kinds, index + 1)
        except NoMatch as miss:
            if deepest is None or miss.depth > deepest.depth:
                deepest = miss
    raise deepest if deepest is not None else NoMatch(f"step {index + 1} ({step}): no alternative", index)


@dataclass
class Miss:
    """An anchor (Erf/Tanh, LayerNorm-shaped ReduceMean, residual Add) no rule matched: the closest rule, why."""

    anchor: str
    rule: str
    reason: str


def closest(rules: Sequence[GeluRule | LayerNormRule | SkipLayerNormRule], start: Walk,
            kinds: dict[str, StepFunction]) -> tuple[object, Walk] | tuple[str, NoMatch]:
    """The first rule that matches and its walk, else (the name of the rule that got furthest, its miss)."""
    best: tuple[str, NoMatch] | None = None
    for rule in rules:
        try:
            return rule, walk(rule.steps, start, kinds)
        except NoMatch as miss:
            if best is None or miss.depth > best[1].depth:
                best = (rule.name, miss)
    return best if best is not None else ("-", NoMatch("no rule", 0))


# GELU ------------------------------------------------------------------------------------------------------


def _scale_input(step: Step, w: Walk) -> list[Walk]:
    pre = producer(w.anchor.inputs[0])
    if pre is None or pre.op not in step.op:
        raise NoMatch(f"expected {'/'.join(step.op)} by {step.value:.6g} before {describe(w.anchor)}, "
                      f"found {describe(pre)}")
    if pre.op == "Div":
        divisor = scalar_value(pre.inputs[1])
        orders = [(pre.inputs[0], 1.0 / divisor)] if divisor else []
    else:
        pairs = either_order(*pre.inputs) if step.commutative else [tuple(pre.inputs)]
        orders = [(data, scalar_value(c)) for data, c in pairs if scalar_value(c) is not None]
    fits = [w.bind(tensor=data, x=data, nodes=[pre, w.anchor]) for data, factor in orders
            if _close(factor, step.value, step.tolerance)]
    if not fits:
        found = ", ".join(f"{factor:.6g}" for _, factor in orders) or "no scalar constant"
        raise NoMatch(f"{describe(pre)} scales by {found}, not {step.value:.6g}")
    return fits


def _is_cube(power: gs.Node | None, x: gs.Tensor, step: Step) -> bool:
    """Pow(x, 3) (``step.op`` Pow) or Mul(Mul(x, x), x) in either order (Mul)."""
    if power is None or power.op not in step.op:
        return False
    if power.op == "Pow":
        return power.inputs[0] is x and _close(scalar_value(power.inputs[1]), 3.0)
    for square, single in either_order(*power.inputs):
        inner = producer(square)
        if single is x and inner is not None and inner.op == "Mul" and all(t is x for t in inner.inputs):
            return True
    return False


def _cube_sum(step: Step, w: Walk) -> list[Walk]:
    inner = producer(w.tensor)
    if inner is None or inner.op != "Add":
        raise NoMatch(f"expected Add(x, {step.value}·x³), found {describe(inner)}")
    fits, found = [], []
    for x, term in either_order(*inner.inputs) if step.commutative else [tuple(inner.inputs)]:
        cube_mul = producer(term)
        parts = split_scalar_operand(cube_mul) if cube_mul is not None and cube_mul.op == "Mul" else None
        if parts is None:
            found.append(f"{describe(cube_mul)} is no Mul by a constant")
        elif not _close(parts[1], step.value, step.tolerance):
            found.append(f"{describe(cube_mul)} multiplies by {parts[1]:.6g}, not {step.value}")
        elif not _is_cube(producer(parts[0]), x, step):
            found.append(f"{describe(producer(parts[0]))} is not {'Pow(x, 3)' if 'Pow' in step.op else 'x·x·x'}")
        else:
            fits.append(w.bind(x=x, nodes=[producer(parts[0]), cube_mul, inner]))
    if not fits:
        raise NoMatch(f"{describe(inner)}: {'; '.join(found)}")
    return fits


def _plus_one(step: Step, w: Walk) -> list[Walk]:
    out = w.anchor.outputs[0]
    users = consumers(out)
    if len(users) != 1 or users[0].op != "Add":
        raise NoMatch(f"expected one Add(·, 1) reading {describe(w.anchor)}, found {_users(out)}")
    add = users[0]
    value = scalar_value(other_operand(add, out))
    if not _close(value, step.value, step.tolerance):
        raise NoMatch(f"{describe(add)} adds {'a non-constant' if value is None else f'{value:.6g}'}, not 1")
    return [w.bind(tensor=add.outputs[0], nodes=[add])]


def _half_product(step: Step, w: Walk) -> list[Walk]:
    """From t = (1 + erf|tanh), follow Muls until 0.5 * x * t is complete (any order and grouping)."""
    x = w.x
    factor, has_x, tensor, nodes = 1.0, False, w.tensor, []
    while not (has_x and _close(factor, step.value)):
        users = consumers(tensor)
        so_far = f"{factor:.6g}·{'x·' if has_x else ''}(1 + ·)"
        if len(users) != 1 or users[0].op != "Mul":
            raise NoMatch(f"the product is {so_far}; expected one Mul next, found {_users(tensor)}")
        node = users[0]
        other = other_operand(node, tensor)
        if other is x and not has_x:
            has_x = True
        elif scalar_value(other) is not None:
            factor *= scalar_value(other)
        else:
            inner = producer(other)
            parts = split_scalar_operand(inner) if inner is not None and inner.op in ("Mul", "Div") else None
            if parts is None or parts[0] is not x or has_x:
                raise NoMatch(f"the product is {so_far}; {describe(node)} multiplies by '{other.name}', neither "
                              f"x{'' if has_x else ' (again)'} nor a constant")
            has_x, factor = True, factor * parts[1]
            if len(consumers(other)) == 1:
                nodes.append(inner)
        nodes.append(node)
        tensor = node.outputs[0]
        if len(nodes) > 4:
            raise NoMatch(f"more than 4 Muls without reaching 0.5·x·(1 + ·) (at {factor:.6g}·x·(1 + ·))")
    return [w.bind(tensor=tensor, nodes=nodes)]


GELU_STEPS: dict[str, StepFunction] = {"scale_input": _scale_input, "cube_sum": _cube_sum, "plus_one": _plus_one,
                                       "half_product": _half_product}


@dataclass
class GeluMatch:
    rule: GeluRule
    x: gs.Tensor
    output: gs.Tensor
    nodes: tuple[gs.Node, ...]


def match_gelu(node: gs.Node) -> GeluMatch | Miss:
    """For an Erf or Tanh node: the GELU it is the core of, else the closest rule and why it stopped."""
    rules = [r for r in GELU_RULES if r.anchor == node.op]
    if not rules:
        return Miss(describe(node), "-", f"no GELU rule starts at {node.op}")
    rule, found = closest(rules, Walk(node), GELU_STEPS)
    if isinstance(found, NoMatch):
        return Miss(describe(node), rule, found.reason)
    return GeluMatch(rule, found.x, found.tensor, found.nodes)


def _bias_split(x: gs.Tensor) -> tuple[gs.Tensor, np.ndarray, gs.Node] | None:
    """x = Add(MatMul(...), constant 1-D bias), either order: (matmul output, bias values, the Add)."""
    node = producer(x)
    if node is None or node.op != "Add":
        return None
    for data, other in either_order(*node.inputs):
        values = constant_values(other)
        if values is not None and values.ndim == 1 and producer(data) is not None and producer(data).op == "MatMul":
            return data, values.astype(np.float32), node
    return None


def fuse_gelu(graph: gs.Graph, target: Target, opset: int) -> tuple[int, str | None, list[Miss]]:
    """Returns (count, reason when nothing could be fused for this target, the Erf/Tanh nodes no rule matched).

    Standard-ONNX targets get the Gelu op (opset 20; older opsets: none, their runtime fuses the pattern
    itself); ONNX Runtime targets the rule's com.microsoft op (``ort_op``, or ``ort_biased_op`` taking the bias
    of the MatMul before)."""
    found: list[GeluMatch] = []
    misses: list[Miss] = []
    for node in list(graph.nodes):
        if node.op in ("Erf", "Tanh"):
            result = match_gelu(node)
            (found if isinstance(result, GeluMatch) else misses).append(result)
    if not target.contrib_ops and opset < 20:
        return 0, (f"opset {opset} has no Gelu op (opset 20); {target.runtime} fuses the {len(found)} Erf/Tanh GELUs "
                   "itself"), misses
    for index, match in enumerate(found):
        rule, x, name = match.rule, match.x, f"tqc_gelu{index}"
        if not target.contrib_ops:
            replace_output(graph, match.output, "Gelu", name, [x], attrs={"approximate": rule.approximate})
            continue
        biased = _bias_split(x)
        if biased is not None and all(any(c is n for n in match.nodes) for c in consumers(x)):
            data, bias, _ = biased
            op, inputs = rule.ort_biased_op, [data, gs.Constant(f"{name}_bias", bias)]
        else:
            op, inputs = rule.ort_op, [x]
        replace_output(graph, match.output, op, name, inputs, domain="com.microsoft")
    return len(found), None, misses


# LayerNorm -------------------------------------------------------------------------------------------------


@dataclass
class LayerNormMatch:
    """A LayerNormalization over the last axis: the op (opset >= 17) or its decomposition (older exports)."""

    x: gs.Tensor
    gamma: gs.Tensor
    beta: gs.Tensor
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


def _expect(tensor: gs.Tensor, step: Step) -> gs.Node:
    node = producer(tensor)
    if node is None or node.op not in step.op:
        raise NoMatch(f"expected {'/'.join(step.op)} producing '{tensor.name}', found {describe(node)}")
    return node


def _operand_pairs(node: gs.Node, step: Step) -> list[tuple[gs.Tensor, gs.Tensor]]:
    return list(either_order(*node.inputs)) if step.commutative else [tuple(node.inputs)]


def _with_constant_vector(node: gs.Node, step: Step, w: Walk, role: str, symbol: str) -> list[Walk]:
    """Every operand order of ``node`` whose second operand is a constant 1-D vector, bound as ``role``; the walk
    goes on from the first operand."""
    fits = [w.bind(tensor=other, nodes=[node], **{role: vector}) for other, vector in _operand_pairs(node, step)
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
    return _with_constant_vector(_expect(w.tensor, step), step, w, "gamma", "γ")


def _normalize(step: Step, w: Walk) -> list[Walk]:
    div = _expect(w.tensor, step)
    centered, root = div.inputs
    return [w.bind(tensor=centered, centered=centered, root=root, nodes=[div])]


def _center(step: Step, w: Walk) -> list[Walk]:
    sub = _expect(w.tensor, step)
    x, mean = sub.inputs[0], producer(sub.inputs[1])
    if not _last_axis_mean(mean, x):
        raise NoMatch(f"{describe(sub)} subtracts {describe(mean)}, not ReduceMean(x, axes=[-1], keepdims=1) of "
                      f"its first operand '{x.name}'")
    return [w.bind(tensor=w["root"], x=x, mean=mean, nodes=[sub, mean])]


def _root(step: Step, w: Walk) -> list[Walk]:
    sqrt = _expect(w.tensor, step)
    return [w.bind(tensor=sqrt.inputs[0], nodes=[sqrt])]


def _epsilon(step: Step, w: Walk) -> list[Walk]:
    add = _expect(w.tensor, step)
    fits = [w.bind(tensor=variance, epsilon=scalar_value(eps), nodes=[add])
            for variance, eps in _operand_pairs(add, step) if scalar_value(eps) is not None]
    if not fits:
        raise NoMatch(f"neither operand of {describe(add)} is a scalar constant ε")
    return fits


def _variance(step: Step, w: Walk) -> list[Walk]:
    mean = producer(w.tensor)
    if not _last_axis_mean(mean):
        raise NoMatch(f"expected ReduceMean(axes=[-1], keepdims=1) producing '{w.tensor.name}', found {describe(mean)}")
    return [w.bind(tensor=mean.inputs[0], nodes=[mean])]


def _square(step: Step, w: Walk) -> list[Walk]:
    square, centered = _expect(w.tensor, step), w["centered"]
    if square.inputs[0] is not centered:
        raise NoMatch(f"{describe(square)} squares '{square.inputs[0].name}', not x - mean ('{centered.name}')")
    if square.op == "Pow" and not _close(scalar_value(square.inputs[1]), step.value, step.tolerance):
        raise NoMatch(f"{describe(square)} raises to {scalar_value(square.inputs[1])}, not {step.value:g}")
    if square.op == "Mul" and square.inputs[1] is not centered:
        raise NoMatch(f"{describe(square)} multiplies x - mean by '{square.inputs[1].name}', not by itself")
    return [w.bind(nodes=[square])]


LAYERNORM_STEPS: dict[str, StepFunction] = {"shift": _shift, "scale": _scale, "normalize": _normalize,
                                            "center": _center, "root": _root, "epsilon": _epsilon,
                                            "variance": _variance, "square": _square}


def match_decomposed_layernorm(add_beta: gs.Node) -> LayerNormMatch | Miss:
    """Add(Mul(Div(x - mean(x), Sqrt(mean((x - mean(x))^2) + eps)), gamma), beta), as opset < 17 exports
    write LayerNorm (torch's legacy exporter: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add);
    else the closest rule and why it stopped."""
    rule, found = closest(LAYERNORM_RULES, Walk(add_beta), LAYERNORM_STEPS)
    if isinstance(found, NoMatch):
        return Miss(describe(add_beta), rule, found.reason)
    return LayerNormMatch(found.x, found["gamma"], found["beta"], found["epsilon"], add_beta, decomposed=True,
                          nodes=found.nodes)


def layernorm_matches(graph: gs.Graph) -> list[LayerNormMatch]:
    matches = []
    for node in list(graph.nodes):
        if node.op == "LayerNormalization" and node.domain in (None, "", "ai.onnx"):
            if len(node.inputs) < 3 or node.attrs.get("axis", -1) != -1 or \
                    len([o for o in node.outputs if o.outputs or o.name]) > 1:
                continue
            matches.append(LayerNormMatch(node.inputs[0], node.inputs[1], node.inputs[2],
                                          float(node.attrs.get("epsilon", 1e-5)), node, decomposed=False))
        elif node.op == "Add":
            match = match_decomposed_layernorm(node)
            if isinstance(match, LayerNormMatch):
                matches.append(match)
    return matches


def layernorm_candidates(graph: gs.Graph) -> list[gs.Node]:
    """LayerNorm-shaped ReduceMeans: mean(x) over the last axis, subtracted from that x by a Sub."""
    return [n for n in graph.nodes if _last_axis_mean(n) and
            any(u.op == "Sub" and u.inputs[0] is n.inputs[0] and u.inputs[1] is n.outputs[0]
                for u in consumers(n.outputs[0]))]


def _spine_adds(mean: gs.Node) -> list[gs.Node]:
    """The Adds a LayerNorm's centered x reaches through Div then Mul (where its β Add should be)."""
    tensors = [u.outputs[0] for u in consumers(mean.outputs[0]) if u.op == "Sub"]
    for op in ("Div", "Mul"):
        tensors = [u.outputs[0] for t in tensors for u in consumers(t) if u.op == op]
    return [u for t in tensors for u in consumers(t) if u.op == "Add"]


def explain_layernorm(mean: gs.Node, limit: int = 32) -> Miss:
    """Why the LayerNorm-shaped ``mean`` is no decomposed LayerNorm: the Adds after it (those on the
    Sub-Div-Mul spine first, then any within ``limit`` nodes) are tried as the LayerNorm's end (its β Add); the
    rule that got furthest from any of them (on a tie, the earlier Add)."""
    candidates = _spine_adds(mean)
    frontier, seen = [mean], {id(mean)}
    while frontier and len(seen) <= limit:
        node = frontier.pop(0)
        for user in (u for out in node.outputs for u in consumers(out)):
            if id(user) not in seen and len(seen) <= limit:
                seen.add(id(user))
                frontier.append(user)
                if user.op == "Add" and all(user is not c for c in candidates):
                    candidates.append(user)
    best: tuple[str, NoMatch] | None = None
    for add in candidates:
        rule, found = closest(LAYERNORM_RULES, Walk(add), LAYERNORM_STEPS)
        if isinstance(found, NoMatch) and (best is None or found.depth > best[1].depth):
            best = (rule, found)
    if best is None:
        return Miss(describe(mean), LAYERNORM_RULES[0].name, f"no Add (β) follows within {limit} nodes: not a "
                    "LayerNorm")
    return Miss(describe(mean), best[0], best[1].reason)


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
        replace_output(graph, match.last.outputs[0], "LayerNormalization", f"tqc_layernorm{count}",
                       [match.x, through_identity(match.gamma), through_identity(match.beta)],
                       attrs={"axis": -1, "epsilon": match.epsilon})
        count += 1
    return count, misses


# Residual LayerNorm ----------------------------------------------------------------------------------------


def _affine_constant(step: Step, w: Walk) -> list[Walk]:
    match: LayerNormMatch = w["layernorm"]
    if constant_values(match.gamma) is None or constant_values(match.beta) is None:
        raise NoMatch(f"{describe(match.last)} has a computed γ or β")
    return [w]


def _residual_add(step: Step, w: Walk) -> list[Walk]:
    match: LayerNormMatch = w["layernorm"]
    add = _expect(match.x, step)
    readers = len(consumers(add.outputs[0]))
    if readers != match.own_consumers_of_x:
        raise NoMatch(f"{describe(add)} is read by {readers} nodes, not only by the LayerNorm")
    if any(isinstance(t, gs.Constant) for t in add.inputs):
        raise NoMatch(f"{describe(add)} adds a constant")
    return [w.bind(residual_add=add, nodes=[add])]


def _bias_projection(step: Step, w: Walk) -> list[Walk]:
    """The first operand order whose first operand is a biased projection (no second try on a later miss)."""
    add: gs.Node = w["residual_add"]
    pairs = [(a, b) for a, b in _operand_pairs(add, step) if _bias_split(a) is not None]
    if not pairs:
        raise NoMatch(f"neither operand of {describe(add)} is Add(MatMul, b) with a constant 1-D b (an embedding "
                      "sum, or a residual without a biased projection)")
    projection, residual = pairs[0]
    readers = len(consumers(projection))
    if readers != 1:
        raise NoMatch(f"the projection '{projection.name}' is read by {readers} nodes")
    data, bias, bias_add = _bias_split(projection)
    return [w.bind(x=data, residual=residual, bias=bias, nodes=[bias_add])]


SKIP_LAYERNORM_STEPS: dict[str, StepFunction] = {"affine_constant": _affine_constant, "residual_add": _residual_add,
                                                 "bias_projection": _bias_projection}


def fuse_skip_layernorm(graph: gs.Graph, form: str = "contrib") -> tuple[int, list[Miss]]:
    """Fuse residual LayerNorms into ``form``: 'contrib' (SkipLayerNormalization) or 'sum' (see above).

    LayerNorms written out in primitives (opset < 17 exports) are matched too; there the 'sum' form has no
    LayerNormalization op to use, so they become SkipLayerNormalization whatever the form. Returns (count,
    the residual Adds before a LayerNorm that no rule matched).
    """
    count = 0
    misses: list[Miss] = []
    can_sum = int(graph.opset) >= 17
    for match in layernorm_matches(graph):
        ln = match.last
        rule, found = closest(SKIP_LAYERNORM_RULES, Walk(ln, bound=(("layernorm", match),)), SKIP_LAYERNORM_STEPS)
        if isinstance(found, NoMatch):
            add = producer(match.x)
            if add is not None and add.op == "Add":
                where = f"the LayerNorm ending at {describe(ln)}" if match.decomposed else describe(ln)
                misses.append(Miss(f"{describe(add)} before {where}", rule, found.reason))
            continue
        name = f"tqc_skipln{count}"
        gamma, beta = through_identity(match.gamma), through_identity(match.beta)
        bias = gs.Constant(f"{name}_bias", found["bias"])
        out = detach(ln.outputs[0])
        if form == "sum" and can_sum:
            total = gs.Variable(f"{name}_sum", dtype=out.dtype)
            produce(graph, "Sum", f"{name}_Sum", [found.x, found["residual"], bias], [total])
            produce(graph, "LayerNormalization", name, [total, gamma, beta], [out],
                    attrs={"axis": -1, "epsilon": match.epsilon})
        else:
            produce(graph, "SkipLayerNormalization", name, [found.x, found["residual"], gamma, beta, bias], [out],
                    attrs={"epsilon": match.epsilon}, domain="com.microsoft")
        count += 1
    return count, misses
