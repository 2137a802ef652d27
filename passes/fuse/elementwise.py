"""GELU, LayerNorm and SkipLayerNormalization fusion.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import (through_identity, constant_values, consumers, producer, scalar_value,
                                   split_scalar_operand)


def _close(value: float | None, target: float, tol: float = 1e-3) -> bool:
    return value is not None and abs(value - target) <= tol * max(1.0, abs(target))


def _mul_chain(start: gs.Tensor, x: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """From t = (1 + erf|tanh), follow Muls until 0.5 * x * t is complete; returns (output, nodes)."""
    factor, has_x, tensor, nodes = 1.0, False, start, []
    while not (has_x and _close(factor, 0.5)):
        users = consumers(tensor)
        if len(users) != 1 or users[0].op != "Mul":
            return None
        node = users[0]
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        if other is x and not has_x:
            has_x = True
        elif scalar_value(other) is not None:
            factor *= scalar_value(other)
        else:
            inner = producer(other)
            parts = split_scalar_operand(inner) if inner is not None and inner.op in ("Mul", "Div") else None
            if parts is None or parts[0] is not x or has_x:
                return None
            has_x, factor = True, factor * parts[1]
            if len(consumers(other)) == 1:
                nodes.append(inner)
        nodes.append(node)
        tensor = node.outputs[0]
        if len(nodes) > 4:
            return None
    return tensor, nodes


def _plus_one(tensor: gs.Tensor) -> gs.Node | None:
    users = consumers(tensor)
    if len(users) == 1 and users[0].op == "Add":
        node = users[0]
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        if _close(scalar_value(other), 1.0, 1e-6):
            return node
    return None


def match_gelu(node: gs.Node):
    """For an Erf or Tanh node: (x, output, nodes, approximate) when it is the core of a GELU."""
    if node.op == "Erf":
        pre = producer(node.inputs[0])
        parts = split_scalar_operand(pre) if pre is not None and pre.op in ("Mul", "Div") else None
        if parts is None or not _close(parts[1], 1 / math.sqrt(2)):
            return None
        x, approximate, nodes = parts[0], "none", [pre, node]
    elif node.op == "Tanh":
        pre = producer(node.inputs[0])
        parts = split_scalar_operand(pre) if pre is not None and pre.op == "Mul" else None
        if parts is None or not _close(parts[1], math.sqrt(2 / math.pi)):
            return None
        inner = producer(parts[0])
        if inner is None or inner.op != "Add":
            return None
        x = None
        for a, b in ((inner.inputs[0], inner.inputs[1]), (inner.inputs[1], inner.inputs[0])):
            cube_mul = producer(b)
            cube_parts = split_scalar_operand(cube_mul) if cube_mul is not None and cube_mul.op == "Mul" else None
            if cube_parts and _close(cube_parts[1], 0.044715):
                power = producer(cube_parts[0])
                if power is not None and power.op == "Pow" and power.inputs[0] is a and _close(
                        scalar_value(power.inputs[1]), 3.0):
                    x, nodes = a, [power, cube_mul, inner, pre, node]
                elif power is not None and power.op == "Mul" and a in power.inputs:
                    # x*x*x spelled as Mul(Mul(x, x), x)
                    x, nodes = a, [power, cube_mul, inner, pre, node]
        if x is None:
            return None
        approximate = "tanh"
    else:
        return None
    add_one = _plus_one(node.outputs[0])
    if add_one is None:
        return None
    chain = _mul_chain(add_one.outputs[0], x)
    if chain is None:
        return None
    output, muls = chain
    return x, output, nodes + [add_one] + muls, approximate


def _bias_split(x: gs.Tensor):
    """x = Add(MatMul(...), constant 1-D bias) used only by the GELU: (matmul output, bias values)."""
    node = producer(x)
    if node is None or node.op != "Add":
        return None
    for data, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        values = constant_values(other)
        if values is not None and values.ndim == 1 and producer(data) is not None and producer(data).op == "MatMul":
            return data, values.astype(np.float32), node
    return None


def fuse_gelu(graph: gs.Graph, target: str, opset: int) -> tuple[int, str | None]:
    """Returns (count, reason when nothing could be fused for this target)."""
    found = [(n, m) for n in list(graph.nodes) if n.op in ("Erf", "Tanh") for m in [match_gelu(n)] if m]
    if target == "trt" and opset < 20:
        return 0, f"opset {opset} has no Gelu op (opset 20); TensorRT fuses the {len(found)} Erf/Tanh GELUs itself"
    count = 0
    for index, (_, (x, output, nodes, approximate)) in enumerate(found):
        old = producer(output)
        old.outputs = [gs.Variable(f"{output.name}_tqc_detached")]
        if target == "trt":
            graph.nodes.append(gs.Node("Gelu", f"tqc_gelu{index}", attrs={"approximate": approximate},
                                       inputs=[x], outputs=[output]))
        else:
            biased = _bias_split(x)
            op = "BiasGelu" if approximate == "none" else "FastGelu"
            if biased is not None and all(any(c is n for n in nodes) for c in consumers(x)):
                data, bias, _ = biased
                inputs = [data, gs.Constant(f"tqc_gelu{index}_bias", bias)]
            elif approximate == "none":
                op, inputs = "Gelu", [x]
            else:
                inputs = [x]
            graph.nodes.append(gs.Node(op, f"tqc_gelu{index}", inputs=inputs, outputs=[output], domain="com.microsoft"))
        count += 1
    return count, None


@dataclass
class LayerNormMatch:
    """A LayerNormalization over the last axis: the op (opset >= 17) or its decomposition (older exports)."""

    x: gs.Tensor
    gamma: gs.Tensor
    beta: gs.Tensor
    epsilon: float
    last: gs.Node        # the node producing the normalized output
    decomposed: bool

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


def match_decomposed_layernorm(add_beta: gs.Node) -> LayerNormMatch | None:
    """Add(Mul(Div(x - mean(x), Sqrt(mean((x - mean(x))^2) + eps)), gamma), beta), as opset < 17 exports
    write LayerNorm (torch's legacy exporter: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)."""
    if add_beta.op != "Add" or len(add_beta.inputs) != 2:
        return None
    for scaled, beta in ((add_beta.inputs[0], add_beta.inputs[1]), (add_beta.inputs[1], add_beta.inputs[0])):
        mul = producer(scaled)
        beta_values = constant_values(beta)
        if mul is None or mul.op != "Mul" or beta_values is None or beta_values.ndim != 1:
            continue
        for normalized, gamma in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            div = producer(normalized)
            gamma_values = constant_values(gamma)
            if div is None or div.op != "Div" or gamma_values is None or gamma_values.ndim != 1:
                continue
            centered, root = div.inputs
            sub, sqrt = producer(centered), producer(root)
            if sub is None or sub.op != "Sub" or sqrt is None or sqrt.op != "Sqrt":
                continue
            x = sub.inputs[0]
            if not _last_axis_mean(producer(sub.inputs[1]), x):
                continue
            add_eps = producer(sqrt.inputs[0])
            if add_eps is None or add_eps.op != "Add":
                continue
            variance, eps = add_eps.inputs
            if scalar_value(eps) is None:
                variance, eps = eps, variance
            epsilon = scalar_value(eps)
            mean_sq = producer(variance)
            square = producer(mean_sq.inputs[0]) if _last_axis_mean(mean_sq) else None
            if epsilon is None or square is None or square.inputs[0] is not centered:
                continue
            if not ((square.op == "Pow" and scalar_value(square.inputs[1]) == 2.0) or
                    (square.op == "Mul" and square.inputs[1] is centered)):
                continue
            return LayerNormMatch(x, gamma, beta, epsilon, add_beta, decomposed=True)
    return None


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
            if match is not None:
                matches.append(match)
    return matches


def fuse_layernorm(graph: gs.Graph) -> int:
    """Decomposed LayerNorms -> LayerNormalization (opset >= 17 only: older opsets have no such op)."""
    if int(graph.opset) < 17:
        return 0
    count = 0
    for match in [m for m in layernorm_matches(graph) if m.decomposed]:
        out = match.last.outputs[0]
        match.last.outputs = [gs.Variable(f"{out.name}_tqc_detached")]
        graph.nodes.append(gs.Node("LayerNormalization", f"tqc_layernorm{count}",
                                   attrs={"axis": -1, "epsilon": match.epsilon},
                                   inputs=[match.x, through_identity(match.gamma), through_identity(match.beta)],
                                   outputs=[out]))
        count += 1
    return count


def fuse_skip_layernorm(graph: gs.Graph, form: str = "contrib") -> int:
    """Fuse residual LayerNorms into ``form``: 'contrib' (SkipLayerNormalization) or 'sum' (see above).

    LayerNorms written out in primitives (opset < 17 exports) are matched too; there the 'sum' form has no
    LayerNormalization op to use, so they become SkipLayerNormalization whatever the form.
    """
    count = 0
    can_sum = int(graph.opset) >= 17
    for match in layernorm_matches(graph):
        ln = match.last
        if constant_values(match.gamma) is None or constant_values(match.beta) is None:
            continue
        add = producer(match.x)
        if add is None or add.op != "Add" or len(consumers(add.outputs[0])) != match.own_consumers_of_x:
            continue
        a, b = add.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
            continue
        # Only residual blocks: one side is a biased projection (full [B, S, H]), the other the residual.
        # Embedding sums are left alone: a position embedding may broadcast from [1, S, H].
        biased = _bias_split(a)
        if biased is None:
            biased = _bias_split(b)
            if biased is not None:
                a, b = b, a
        if biased is None or len(consumers(a)) != 1:
            continue
        data, bias, _ = biased
        inputs = [data, b, through_identity(match.gamma), through_identity(match.beta),
                  gs.Constant(f"tqc_skipln{count}_bias", bias)]
        out = ln.outputs[0]
        ln.outputs = [gs.Variable(f"{out.name}_tqc_detached")]
        epsilon = match.epsilon
        if form == "sum" and can_sum:
            total = gs.Variable(f"tqc_skipln{count}_sum", dtype=out.dtype)
            graph.nodes += [
                gs.Node("Sum", f"tqc_skipln{count}_Sum", inputs=[inputs[0], inputs[1], inputs[4]], outputs=[total]),
                gs.Node("LayerNormalization", f"tqc_skipln{count}", attrs={"axis": -1, "epsilon": epsilon},
                        inputs=[total, inputs[2], inputs[3]], outputs=[out]),
            ]
        else:
            graph.nodes.append(gs.Node("SkipLayerNormalization", f"tqc_skipln{count}", domain="com.microsoft",
                                       attrs={"epsilon": epsilon}, inputs=inputs, outputs=[out]))
        count += 1
    return count
