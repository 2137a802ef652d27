"""The graph queries ``fuse``'s rules (``engine``), ``qdq`` and ``diff`` share: producers, constants, static
dimensions and scalars computed from them, biased projections, the heads of a split (``heads_from_split``).

Operand order is declared, never spelled out: a commutative node (Add, Mul) is matched through
``either_order(a, b)``, which yields ``(a, b)`` then ``(b, a)`` (onnxscript's commute); a rule takes the first
order that fits, or tries the next when a later step fails::

    Add(MatMul, b)  and  Add(b, MatMul)    ──►   for data, bias in either_order(*add.inputs): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx_graphsurgeon as gs


def either_order(a: gs.Tensor, b: gs.Tensor) -> Iterator[tuple[gs.Tensor, gs.Tensor]]:
    """The operand-order alternatives of a commutative binary node: ``(a, b)``, then ``(b, a)``."""
    yield a, b
    yield b, a


def other_operand(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """The operand of a binary node that is not ``tensor`` (the second one when both are)."""
    return next((other for first, other in either_order(*node.inputs) if first is tensor), node.inputs[0])


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def only_consumer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The one node that reads ``tensor`` (of type ``op`` where given); None when several read it, or none."""
    users = consumers(tensor)
    return users[0] if len(users) == 1 and (op is None or users[0].op == op) else None


def through_identity(tensor: gs.Tensor) -> gs.Tensor:
    """Unfolded exports alias shared weights through Identity nodes: look through them."""
    while isinstance(tensor, gs.Variable) and tensor.inputs and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def scalar_value(tensor: gs.Tensor) -> float | None:
    """The value of a constant holding exactly one element (or of a scalar computed from static dimensions,
    see ``evaluate_static``), else None."""
    tensor = through_identity(tensor)
    if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) == 1:
        return float(np.asarray(tensor.values).reshape(-1)[0])
    if isinstance(tensor, gs.Variable) and tensor.inputs:
        values = evaluate_static(tensor)
        if values is not None and values.size == 1:
            return float(values.reshape(-1)[0])
    return None


def static_dims(tensor: gs.Tensor, depth: int = 0) -> list[int | None] | None:
    """The dimensions of ``tensor`` known without running the graph (None for a dynamic one), from shape
    inference or from the Reshape/Transpose that made it; None when even the rank is unknown."""
    if isinstance(tensor, gs.Constant):
        return [int(d) for d in tensor.shape]
    known = [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape] if tensor.shape is not None else None
    node = producer(tensor)
    derived = None
    if node is not None and depth < 32:
        if node.op == "Transpose" and node.attrs.get("perm") is not None:
            inner = static_dims(node.inputs[0], depth + 1)
            if inner is not None and len(inner) == len(node.attrs["perm"]):
                derived = [inner[axis] for axis in node.attrs["perm"]]
        elif node.op == "Reshape":
            target = int_vector(node.inputs[1], depth + 1)
            if target is not None:
                derived = [int(d) if d is not None and d > 0 else None for d in target]
                if 0 in target and not node.attrs.get("allowzero"):  # 0: the input's dimension at that place
                    inner = static_dims(node.inputs[0], depth + 1) or []
                    derived = [inner[i] if d == 0 and i < len(inner) else v
                               for i, (d, v) in enumerate(zip(target, derived))]
                if target.count(-1) == 1:
                    derived[target.index(-1)] = _inferred_dim(node, target, depth + 1)
    if known is None:
        return derived
    if derived is not None and len(derived) == len(known):
        return [k if k is not None else d for k, d in zip(known, derived)]
    return known


def _copied_dim(part: gs.Tensor, source: gs.Tensor) -> int | None:
    """``i`` when ``part`` is Shape(source)[i] (a Gather of index i, through Unsqueeze/Cast), else None."""
    node = producer(part)
    while node is not None and node.op in ("Unsqueeze", "Cast"):
        node = producer(node.inputs[0])
    if node is None or node.op != "Gather" or producer(node.inputs[0]) is None:
        return None
    shape, index = producer(node.inputs[0]), constant_values(node.inputs[1])
    if shape.op != "Shape" or shape.inputs[0] is not source or shape.attrs.get("start", 0) != 0 or \
            "end" in shape.attrs or index is None or index.size != 1:
        return None
    return int(index.reshape(-1)[0])


def _inferred_dim(reshape: gs.Node, target: list[int | None], depth: int) -> int | None:
    """The -1 of a Reshape whose other entries are constants or the input's own dimensions (x.view(B, S, H,
    -1) with B, S read from x): the product of the input's other dimensions over the constants."""
    source, concat = reshape.inputs[0], producer(reshape.inputs[1])
    dims = static_dims(source, depth + 1)
    if dims is None:
        return None
    if concat is None and constant_values(reshape.inputs[1]) is not None:  # 0 copies the input's dimension there
        copied = [i if d == 0 else None for i, d in enumerate(target)]
    elif concat is None or concat.op != "Concat" or len(concat.inputs) != len(target):
        return None
    else:
        copied = [_copied_dim(part, source) for part in concat.inputs]
    copied = [c + len(dims) if c is not None and c < 0 else c for c in copied]
    constants = [d for d, c in zip(target, copied) if c is None and d != -1]
    rest = [d for i, d in enumerate(dims) if i not in copied]
    if any(d is None or d <= 0 for d in constants + rest) or len(set(c for c in copied if c is not None)) != \
            len([c for c in copied if c is not None]):
        return None
    whole, part = int(np.prod(rest)), int(np.prod(constants))
    return whole // part if part and whole % part == 0 else None


_UNARY = {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}
_BINARY = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract, "Pow": np.power}


def int_vector(tensor: gs.Tensor, depth: int = 0) -> list[int | None] | None:
    """A small integer vector (or scalar, as one element) known without running the graph: constants and
    static dimensions read by Shape, through Slice/Gather/Concat/Squeeze/Unsqueeze/Cast; None marks a
    dynamic dimension. None when not even its length is known."""
    values = constant_values(tensor)
    if values is not None:
        return [int(v) for v in values.reshape(-1)] if values.dtype.kind in "iu" and values.size <= 8 else None
    node = producer(tensor)
    if node is None or depth > 32:
        return None
    if node.op == "Shape":
        dims = static_dims(node.inputs[0], depth + 1)
        if dims is None:
            return None
        return dims[slice(node.attrs.get("start", 0), node.attrs.get("end", len(dims)))]
    if node.op == "Concat":
        parts = [int_vector(part, depth + 1) for part in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if node.op in ("Squeeze", "Unsqueeze", "Cast", "Identity") or (node.op == "Reshape" and depth > 0):
        if node.op == "Cast" and np.dtype(_np_type(node.attrs.get("to", 7))).kind not in "iu":
            return None
        return int_vector(node.inputs[0], depth + 1)
    if node.op in ("Slice", "Gather"):
        data = int_vector(node.inputs[0], depth + 1)
        if node.op == "Gather":
            index = constant_values(node.inputs[1])
            if index is None:
                return None
            if data is None:  # e.g. Shape(x)[0] of an x of unknown rank: its length is still known
                return [None] * int(index.size) if producer(node.inputs[0]) is not None and \
                    producer(node.inputs[0]).op == "Shape" else None
            return [data[int(i)] for i in index.reshape(-1)]
        if data is None:
            return None
        starts, ends = constant_values(node.inputs[1]), constant_values(node.inputs[2])
        steps = constant_values(node.inputs[4]) if len(node.inputs) > 4 else None
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        step = int(steps.reshape(-1)[0]) if steps is not None else 1
        return data[int(starts.reshape(-1)[0]):int(max(min(ends.reshape(-1)[0], 2**31), -2**31)):step]
    return None


def slice_bounds(node: gs.Node | None) -> tuple[gs.Tensor, int, int, int] | None:
    """(data, axis, start, end) of a one-axis, step-1 Slice whose bounds are known without running the graph
    (constants, or static shape arithmetic: ``int_vector``); else None."""
    if node is None or node.op != "Slice" or len(node.inputs) < 4:
        return None
    values = [int_vector(t) for t in node.inputs[1:]]
    if any(v is None or len(v) != 1 or v[0] is None for v in values):
        return None
    start, end, axis = (int(v[0]) for v in values[:3])
    step = int(values[3][0]) if len(values) > 3 else 1
    return (node.inputs[0], axis, start, end) if step == 1 else None


def _np_type(onnx_type: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(onnx_type)


def evaluate_static(tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    """Evaluate a small shape-derived tensor (the softmax scale ``1/sqrt(D)`` computed from ``Shape(q)[-1]``)
    from constants and static dimensions, in float32 as the runtime does; None when it cannot be proven."""
    values = constant_values(tensor)
    if values is not None:
        return values
    node = producer(tensor)
    if node is None or depth > 32:
        return None
    if node.op in _UNARY:
        inner = evaluate_static(node.inputs[0], depth + 1)
        return None if inner is None else np.asarray(_UNARY[node.op](inner))
    if node.op in _BINARY and len(node.inputs) == 2:
        a, b = (evaluate_static(t, depth + 1) for t in node.inputs)
        if a is None or b is None or a.size != 1 or b.size != 1 or (node.op == "Div" and not b.all()):
            return None
        return np.asarray(_BINARY[node.op](a, b)).astype(np.result_type(a, b))
    if node.op == "Cast":
        inner = evaluate_static(node.inputs[0], depth + 1)
        return None if inner is None else inner.astype(_np_type(node.attrs["to"]))
    vector = int_vector(tensor, depth)
    if vector is None or None in vector:
        return None
    return np.array(vector, np.int64)


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    tensor = through_identity(tensor)
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
        for data, factor in either_order(a, b):
            if scalar_value(factor) is not None:
                return data, scalar_value(factor)
    if node.op == "Div" and scalar_value(b) is not None and scalar_value(b) != 0:
        return a, 1.0 / scalar_value(b)
    return None


def ancestors_reach(tensor: gs.Tensor, targets: set[str], limit: int = 2000,
                    stop_ops: tuple[str, ...] = ("MatMul", "Gemm", "Softmax", "Shape")) -> bool:
    """Whether a tensor named in ``targets`` feeds ``tensor`` without passing through ``stop_ops``.

    Mask subgraphs contain no MatMul or Softmax; stopping there keeps a layer's scores (which depend on the
    mask through earlier layers) from counting as mask-derived. A Shape reads dimensions, not values: a bias
    expanded to the mask's shape (dynamo's MPNet) is not derived from the mask.
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


def feeding_nodes(roots: Iterable[gs.Tensor]) -> set[int]:
    """The ids of every node whose output ``roots`` depend on (through producers, to graph inputs and
    constants): what stays alive when the graph reads ``roots``."""
    stack, seen, nodes = list(roots), set(), set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        node = producer(tensor)
        if node is not None and id(node) not in nodes:
            nodes.add(id(node))
            stack.extend(node.inputs)
    return nodes


def heads_from_reshape(reshape: gs.Node, hidden: int) -> int | None:
    """Read H from a Reshape to [B, S, H, D] (constant shape, or Concat with constant H and D)."""
    shape = reshape.inputs[1]
    values = constant_values(shape)
    if values is not None and values.size == 4 and values[2] > 0:
        return int(values[2])
    if values is not None and values.size == 4 and values[3] > 0 and hidden % int(values[3]) == 0:
        return hidden // int(values[3])  # [0, 0, -1, D]: fold made the batch and sequence reads copies
    node = producer(shape)
    if node is not None and node.op == "Concat" and len(node.inputs) >= 3:
        flat: list[int | None] = []
        for part in node.inputs:
            part_values = constant_values(part)
            if part_values is None:
                flat.append(None)
            else:
                flat.extend(int(v) for v in part_values.reshape(-1))
        if len(flat) == 4 and flat[2] is not None and flat[2] > 0:
            return flat[2]
        if len(flat) == 4 and flat[3] is not None and flat[3] > 0 and hidden % flat[3] == 0:
            return hidden // flat[3]
    out_shape = reshape.outputs[0].shape
    if out_shape is not None and len(out_shape) == 4 and isinstance(out_shape[2], int) and out_shape[2] > 0:
        return int(out_shape[2])
    return None


def heads_from_split(tensor: gs.Tensor, size: int | None, limit: int = 8) -> int | None:
    """H read from the Reshape that split the heads ([..., H, D] with D = ``size``), walking back from
    ``tensor`` through the ops between (the rotation, fused or as x·cos + rotate_half(x)·sin read through its
    first term, Transpose, Squeeze, Split/Slice)."""
    node = producer(tensor)
    for _ in range(limit):
        if node is None or node.op not in ("RotaryEmbedding", "Add", "Mul", "Transpose", "Squeeze", "Split", "Slice",
                                           "Reshape"):
            return None
        if node.op == "Reshape":
            target = int_vector(node.inputs[1])
            if target is None or len(target) < 4 or target[-1] != size:
                return None
            if target[-2] is not None and target[-2] > 0:
                return int(target[-2])
            width = (static_dims(node.inputs[0]) or [None])[-1]   # [..., 3, -1, D]: H from the packed width
            if width is None and producer(node.inputs[0]) is not None and producer(node.inputs[0]).op == "MatMul":
                weight = constant_values(producer(node.inputs[0]).inputs[1])
                width = int(weight.shape[-1]) if weight is not None else None
            packs = target[-3] if len(target) >= 5 and target[-3] is not None and target[-3] > 0 else 1
            return width // (packs * size) if width is not None and width % (packs * size) == 0 else None
        node = producer(node.inputs[0])
    return None


def bias_split(x: gs.Tensor) -> tuple[gs.Tensor, np.ndarray, gs.Node] | None:
    """x = Add(MatMul(...), constant 1-D bias), either order: (matmul output, bias values, the Add)."""
    node = producer(x)
    if node is None or node.op != "Add":
        return None
    for data, other in either_order(*node.inputs):
        values = constant_values(other)
        if values is not None and values.ndim == 1 and producer(data) is not None and producer(data).op == "MatMul":
            return data, values.astype(np.float32), node
    return None


@dataclass
class Linear:
    """x @ W (+ b) with constant W [in, out] and optional constant b [out]."""

    x: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray | None
    output: gs.Tensor
    matmul: gs.Node
    add: gs.Node | None


def linear(tensor: gs.Tensor, what: str) -> Linear | str:
    """``tensor`` as x @ W (+ b), else the reason it is not one."""
    node, add, bias = producer(tensor), None, None
    biased = bias_split(tensor)
    if biased is not None:
        data, bias, add = biased
        node = producer(data)
    if node is None or node.op != "MatMul":
        return f"{what}: expected MatMul (+ bias Add) projection, found {describe(node)}"
    weight = constant_values(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return f"{what}: projection '{node.name}' has no constant 2-D weight"
    return Linear(node.inputs[0], weight.astype(np.float32), bias, tensor, node, add)


def values_read(tensor: gs.Tensor, inputs: set[str], limit: int = 2000) -> set[str] | None:
    """The graph inputs (of ``inputs``) whose values reach ``tensor`` by a path that does not go through a Shape;
    None when the walk passes ``limit`` nodes (not known)."""
    stack, seen, read = [tensor], set(), set()
    while stack:
        t = stack.pop()
        if t.name in inputs:
            read.add(t.name)
            continue
        node = producer(t)
        if node is None or id(node) in seen or node.op == "Shape":
            continue
        seen.add(id(node))
        if len(seen) > limit:
            return None
        stack.extend(node.inputs)
    return read


def token_subgraph(graph: gs.Graph, outputs: list[gs.Tensor]) -> Callable[..., list[np.ndarray]] | None:
    """Runs the part of ``graph`` that computes ``outputs`` (a copy, pruned), or None when a graph input it reads
    is not [batch, sequence]: ``run((B, S), {name: array})`` feeds the arrays given and ones of shape (B, S) to
    the other inputs, and returns the outputs in order."""
    from tqc.compiler.runtime.graph_session import GraphSession

    sub = graph.copy()
    tensors = sub.tensors()
    sub.outputs = [tensors[t.name] for t in outputs]
    sub.cleanup(remove_unused_graph_inputs=True)
    if any(t.shape is None or len(t.shape) != 2 for t in sub.inputs):
        return None
    session, names = GraphSession(sub), [t.name for t in outputs]

    def run(shape: tuple[int, int], given: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        given = given or {}
        return session.run(names, {t.name: np.asarray(given[t.name] if t.name in given else np.ones(shape),
                                                      np.dtype(t.dtype)) for t in sub.inputs})
    return run

