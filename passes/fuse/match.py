"""Small helpers for walking an onnx-graphsurgeon graph backwards and saying why a walk stopped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


class NoMatch(Exception):
    """A pattern did not match; ``depth`` says how far it got (for 'closest rule' reports)."""

    def __init__(self, reason: str, depth: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.depth = depth


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def _through_identity(tensor: gs.Tensor) -> gs.Tensor:
    """Unfolded exports alias shared weights through Identity nodes: look through them."""
    while isinstance(tensor, gs.Variable) and tensor.inputs and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def scalar_value(tensor: gs.Tensor) -> float | None:
    """The value of a constant holding exactly one element, else None."""
    tensor = _through_identity(tensor)
    if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) == 1:
        return float(np.asarray(tensor.values).reshape(-1)[0])
    return None


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    tensor = _through_identity(tensor)
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def describe(node: gs.Node | None) -> str:
    if node is None:
        return "a graph input or constant"
    return f"{node.op} '{node.name}'"


def split_scalar_operand(node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """For Mul(x, c), Mul(c, x) or Div(x, c) with scalar constant c: (x, factor)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op == "Mul":
        if scalar_value(b) is not None:
            return a, scalar_value(b)
        if scalar_value(a) is not None:
            return b, scalar_value(a)
    if node.op == "Div" and scalar_value(b) is not None and scalar_value(b) != 0:
        return a, 1.0 / scalar_value(b)
    return None


def ancestors_reach(tensor: gs.Tensor, targets: set[str], limit: int = 2000,
                    stop_ops: tuple[str, ...] = ("MatMul", "Gemm", "Softmax")) -> bool:
    """Whether a tensor named in ``targets`` feeds ``tensor`` without passing through ``stop_ops``.

    Mask subgraphs contain no MatMul or Softmax; stopping there keeps a layer's scores (which depend on the
    mask through earlier layers) from counting as mask-derived.
    """
    stack, seen = [tensor], set()
    while stack and len(seen) < limit:
        t = stack.pop()
        if t.name in targets:
            return True
        if id(t) in seen:
            continue
        seen.add(id(t))
        node = producer(t)
        if node is not None and node.op not in stop_ops:
            stack.extend(node.inputs)
    return False


@dataclass
class Linear:
    """x @ W (+ b) with constant W [in, out] and optional constant b [out]."""

    x: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray | None
    output: gs.Tensor
    matmul: gs.Node
    add: gs.Node | None


def match_linear(tensor: gs.Tensor, what: str, depth: int) -> Linear:
    node = producer(tensor)
    add = None
    bias = None
    if node is not None and node.op == "Add":
        a, b = node.inputs
        for data, other in ((a, b), (b, a)):
            values = constant_values(other)
            if values is not None and values.ndim == 1 and producer(data) is not None and producer(data).op == "MatMul":
                add, bias, node = node, values.astype(np.float32), producer(data)
                break
    if node is None or node.op != "MatMul":
        raise NoMatch(f"{what}: expected MatMul (+ bias Add) projection, found {describe(node)}", depth)
    weight = constant_values(node.inputs[1])
    if weight is None or weight.ndim != 2:
        raise NoMatch(f"{what}: projection '{node.name}' has no constant 2-D weight", depth)
    return Linear(node.inputs[0], weight.astype(np.float32), bias, tensor, node, add)
