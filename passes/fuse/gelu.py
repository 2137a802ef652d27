"""GELU fusion, anchored at the Erf or Tanh node; its rules and step kinds (``engine``).

Exact (erf) form, any order of the final multiplications; tanh form (gelu_new: ALBERT), the cube written
``Pow(x, 3)`` or ``x·x·x``::

    erf:       x ─► Scale(1/√2) ─► [Erf] ─► Add(1) ─► Mul(x) ─► Mul(0.5)       (any order of the last two)
    tanh-pow:  x ─► Add(x, 0.044715·Pow(x, 3)) ─► Scale(√(2/π)) ─► [Tanh] ─► Add(1) ─► Mul(x) ─► Mul(0.5)
    tanh-mul:  the same, x³ written Mul(Mul(x, x), x)

    after:  Gelu(x[, approximate=tanh])        (trt, opset ≥ 20)
            BiasGelu(xw, b) / Gelu(x)           (ort, erf form: com.microsoft; the bias Add absorbed when only
            FastGelu(xw, b) / FastGelu(x)        the GELU reads x = MatMul + b)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from tqc.compiler.core.target import Target
from tqc.passes.fuse.engine import Miss, NoMatch, Rule, Step, StepFunction, Walk, close, search
from tqc.passes.fuse.match import (bias_split, consumers, describe, either_order, other_operand, producer,
                                   scalar_value, split_scalar_operand)
from tqc.passes.rewrite import replace_output


@dataclass(frozen=True, kw_only=True)
class GeluRule(Rule):
    approximate: str            # the Gelu op's attribute: "none" | "tanh"
    ort_op: str                 # com.microsoft op without a bias to absorb
    ort_biased_op: str          # com.microsoft op taking (MatMul output, bias)


_PLUS_ONE = Step("plus_one", ("Add",), 1.0, commutative=True, tolerance=1e-6)
_HALF_PRODUCT = Step("half_product", ("Mul",), 0.5, commutative=True)

RULES: tuple[GeluRule, ...] = (
    GeluRule(
        name="erf",
        description="exact GELU (torch nn.GELU(), BERT's 'gelu'): 0.5·x·(1 + erf(x/√2))",
        anchor=("Erf",),
        steps=(Step("scale_input", ("Div", "Mul"), 1 / math.sqrt(2), commutative=True), _PLUS_ONE, _HALF_PRODUCT),
        approximate="none", ort_op="Gelu", ort_biased_op="BiasGelu",
    ),
    GeluRule(
        name="tanh-pow",
        description="tanh GELU (ALBERT's 'gelu_new'; torch.pow(x, 3.0)): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))",
        anchor=("Tanh",),
        steps=(Step("scale_input", ("Mul",), math.sqrt(2 / math.pi), commutative=True),
               Step("cube_sum", ("Pow",), 0.044715, commutative=True), _PLUS_ONE, _HALF_PRODUCT),
        approximate="tanh", ort_op="FastGelu", ort_biased_op="FastGelu",
    ),
    GeluRule(
        name="tanh-mul",
        description="tanh GELU with x³ written x·x·x: Mul(Mul(x, x), x), either operand order",
        anchor=("Tanh",),
        steps=(Step("scale_input", ("Mul",), math.sqrt(2 / math.pi), commutative=True),
               Step("cube_sum", ("Mul",), 0.044715, commutative=True), _PLUS_ONE, _HALF_PRODUCT),
        approximate="tanh", ort_op="FastGelu", ort_biased_op="FastGelu",
    ),
)


def _users(tensor: gs.Tensor) -> str:
    return ", ".join(describe(u) for u in consumers(tensor)) or "nothing"


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
            if close(factor, step.value, step.tolerance)]
    if not fits:
        found = ", ".join(f"{factor:.6g}" for _, factor in orders) or "no scalar constant"
        raise NoMatch(f"{describe(pre)} scales by {found}, not {step.value:.6g}")
    return fits


def _is_cube(power: gs.Node | None, x: gs.Tensor, step: Step) -> bool:
    """Pow(x, 3) (``step.op`` Pow) or Mul(Mul(x, x), x) in either order (Mul)."""
    if power is None or power.op not in step.op:
        return False
    if power.op == "Pow":
        return power.inputs[0] is x and close(scalar_value(power.inputs[1]), 3.0)
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
        elif not close(parts[1], step.value, step.tolerance):
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
    if not close(value, step.value, step.tolerance):
        raise NoMatch(f"{describe(add)} adds {'a non-constant' if value is None else f'{value:.6g}'}, not 1")
    return [w.bind(tensor=add.outputs[0], nodes=[add])]


def _half_product(step: Step, w: Walk) -> list[Walk]:
    """From t = (1 + erf|tanh), follow Muls until 0.5 * x * t is complete (any order and grouping)."""
    x = w.x
    factor, has_x, tensor, nodes = 1.0, False, w.tensor, []
    while not (has_x and close(factor, step.value)):
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


STEPS: dict[str, StepFunction] = {"scale_input": _scale_input, "cube_sum": _cube_sum, "plus_one": _plus_one,
                                 "half_product": _half_product}


def fuse_gelu(graph: gs.Graph, target: Target, opset: int) -> tuple[int, str | None, list[Miss]]:
    """Returns (count, reason when nothing could be fused for this target, the Erf/Tanh nodes no rule matched).

    Standard-ONNX targets get the Gelu op (opset 20; older opsets: none, their runtime fuses the pattern
    itself); ONNX Runtime targets the rule's com.microsoft op (``ort_op``, or ``ort_biased_op`` taking the bias
    of the MatMul before)."""
    found, misses = search([n for n in graph.nodes if n.op in ("Erf", "Tanh")], RULES, STEPS)
    if not target.contrib_ops and opset < 20:
        return 0, (f"opset {opset} has no Gelu op (opset 20); {target.runtime} fuses the {len(found)} Erf/Tanh GELUs "
                   "itself"), misses
    for index, (rule, match) in enumerate(found):
        x, name = match.x, f"tqc_gelu{index}"
        if not target.contrib_ops:
            replace_output(graph, match.tensor, "Gelu", name, [x], attrs={"approximate": rule.approximate})
            continue
        biased = bias_split(x)
        if biased is not None and all(any(c is n for n in match.nodes) for c in consumers(x)):
            data, bias, _ = biased
            op, inputs = rule.ort_biased_op, [data, gs.Constant(f"{name}_bias", bias)]
        else:
            op, inputs = rule.ort_op, [x]
        replace_output(graph, match.tensor, op, name, inputs, domain="com.microsoft")
    return len(found), None, misses


