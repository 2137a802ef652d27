"""V centred and equalized per channel before probs x V's per-tensor INT8 (``qdq{value_equalize}``).

trt quantizes attention's V per tensor with symmetric INT8 (TensorRT's fused INT8 MHA): a channel whose values
sit off zero, or span a fraction of the widest channel's range, keeps few codes. Per channel j of the V
projection, with its calibrated range [lo_j, hi_j], z_j = (hi_j + lo_j) / 2 and e_j its half-range over their
mean, constants change and no node is added::

    x ─► MatMul(W) ─► Add(b) [─► Split] ─► v ─► heads ─► probs x V ─► heads back ─► MatMul(W_o) ─► Add(b_o)
         W[:, j] / e_j,  (b_j - z_j) / e_j                                          W_o[j, :] e_j,  b_o + z W_o

Exact in float: softmax rows sum to 1, so probs (v - z) = probs v - z, and the output projection takes z back
through its bias and e_j through its rows. Every channel of V then spans the same symmetric range, so the
per-tensor scale acts as a per-channel asymmetric one. The output projection's SmoothQuant factor and shift
follow its input's channel ranges, which scale by 1 / e_j, so its own INT8 input is unchanged. The ranges are
measured over every position, as the table's per-tensor range that V's quantizer reads; the pass runs this
before it calibrates, so the table is measured on the equalized graph. MiniLM on trt (2,400 held-out
sentences): NN agreement 93.9 -> 94.5%, mean cosine 0.99899 -> 0.99913 (``bench/results/accuracy_trt_value_cpu.*``).

A core is taken only where the chain is the plain one (the head split a Reshape to [.., H, D] and Transpose
(0, 2, 1, 3), the merge its inverse), every tensor on it has one reader and neither weight is shared (ALBERT's
layers keep theirs); each rewritten constant is a new one (a copy of the graph may share the old arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.calibration import merge_channels
from tqc.compiler.runtime.activations import stream_intermediates
from tqc.passes.fuse.match import constant_values, either_order, only_consumer, producer
from tqc.passes.qdq.plan import core_layouts
from tqc.passes.rewrite import rebase

HEADS_PERM = [0, 2, 1, 3]
FLOOR = 1e-4  # a channel's half-range below this share of the widest one counts as this (a dead channel)


@dataclass
class ValueChain:
    """One attention core's V projection and output projection, as the equalization rewrites them."""

    v: gs.Tensor          # V before the head split, [batch, sequence, H * D]
    weight: gs.Node       # MatMul(x, W): its input 1 is W [in, out]
    bias: gs.Node         # Add of b [out] (either order)
    offset: int           # V's first column in W (a packed QKV projection: after Q and K)
    out_weight: gs.Node   # MatMul(context, W_o): input 1 is W_o [H * D, N]
    out_bias: gs.Node     # Add of b_o [N]


def _constant_index(node: gs.Node, data: gs.Tensor) -> int | None:
    """The index of ``node``'s constant operand beside ``data`` (a bias: where other nodes share it, as folding
    leaves identical constants, this node gets its own copy), None where it has none."""
    for index, (value, other) in enumerate(either_order(*node.inputs)):
        if value is data and isinstance(other, gs.Constant):
            return 1 - index
    return None


def _projection(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """(MatMul, bias Add) writing ``tensor`` = x @ W + b with constant, unshared W and b; None where not so."""
    add = producer(tensor)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    matmul = next((producer(t) for t in add.inputs if producer(t) is not None and producer(t).op == "MatMul"), None)
    if matmul is None or len(matmul.outputs[0].outputs) != 1 or _constant_index(add, matmul.outputs[0]) is None:
        return None
    weight = matmul.inputs[1]
    if not isinstance(weight, gs.Constant) or len(weight.outputs) != 1 or np.asarray(weight.values).ndim != 2:
        return None
    return matmul, add


def _value_chain(pv: gs.Node, layout: tuple[int, int]) -> ValueChain | None:
    """The chain of ``pv`` (probs x V) from the V projection to the output projection's bias, or None."""
    heads, size = layout
    transpose = producer(pv.inputs[1])
    if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != HEADS_PERM or \
            len(pv.inputs[1].outputs) != 1:
        return None
    reshape = producer(transpose.inputs[0])
    if reshape is None or reshape.op != "Reshape" or len(transpose.inputs[0].outputs) != 1:
        return None
    shape = constant_values(reshape.inputs[1])
    v = reshape.inputs[0]
    if shape is None or list(shape.reshape(-1)[-2:]) != [heads, size] or len(v.outputs) != 1:
        return None
    offset, made = 0, producer(v)
    source = v
    if made is not None and made.op == "Split":  # a packed QKV projection
        sizes = constant_values(made.inputs[1]) if len(made.inputs) > 1 else None
        if sizes is None or made.attrs.get("axis", 0) not in (-1, 2) or len(made.inputs[0].outputs) != 1:
            return None
        index = [t is v for t in made.outputs].index(True)
        offset, source = int(np.sum(sizes.reshape(-1)[:index])), made.inputs[0]
    projection = _projection(source)
    if projection is None:
        return None
    back = only_consumer(pv.outputs[0], "Transpose")
    if back is None or list(back.attrs.get("perm", [])) != HEADS_PERM:
        return None
    merge = only_consumer(back.outputs[0], "Reshape")
    shape = constant_values(merge.inputs[1]) if merge is not None else None
    if shape is None or int(shape.reshape(-1)[-1]) != heads * size:
        return None
    out = only_consumer(merge.outputs[0], "MatMul")
    if out is None or out.inputs[0] is not merge.outputs[0]:
        return None
    out_bias = only_consumer(out.outputs[0], "Add")
    weight = out.inputs[1]
    if out_bias is None or not isinstance(weight, gs.Constant) or len(weight.outputs) != 1 or \
            np.asarray(weight.values).shape[:1] != (heads * size,) or _constant_index(out_bias, out.outputs[0]) is None:
        return None
    return ValueChain(v, projection[0], projection[1], offset, out, out_bias)


def value_chains(graph: gs.Graph) -> list[ValueChain]:
    """Every attention core whose V can be equalized (module docstring), in graph order."""
    layouts = core_layouts(graph)
    chains = []
    for node in graph.nodes:
        if node.op == "MatMul" and node.name in layouts and node.inputs[0] is not None and \
                producer(node.inputs[0]) is not None and producer(node.inputs[0]).op == "Softmax":
            chain = _value_chain(node, layouts[node.name])
            if chain is not None:
                chains.append(chain)
    return chains


def channel_ranges(graph: gs.Graph, tensors: list[str], feeds: Iterable) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per last-axis channel (min, max) of ``tensors`` over every position of ``feeds`` (ORT CPU)."""
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    wanted = set(tensors)

    def reduce(name: str, value: np.ndarray) -> None:
        if name in wanted:  # the graph's outputs come too
            flat = value.reshape(-1, value.shape[-1])
            merge_channels(lows, highs, name, flat.min(axis=0), flat.max(axis=0))

    stream_intermediates(graph, feeds, reduce, names=tensors)
    return {name: (lows[name], highs[name]) for name in lows}


def _set(node: gs.Node, index: int, values: np.ndarray, like: gs.Constant) -> None:
    """A new constant in ``node``'s input ``index`` (the old array may be shared with a copy of the graph)."""
    node.inputs[index] = gs.Constant(f"{node.name}_veq{index}", values.astype(np.asarray(like.values).dtype))


def centre_and_scale(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, e): every channel's centre, and its half-range over the channels' mean half-range (floored)."""
    z = (lo + hi) / 2.0
    half = np.maximum((hi - lo) / 2.0, 0.0)
    half = np.maximum(half, FLOOR * max(float(half.max()), 1e-12))
    return z, half / half.mean()


def equalize(chain: ValueChain, lo: np.ndarray, hi: np.ndarray) -> None:
    """Rewrite ``chain``'s four constants for V's channel ranges [lo, hi] (module docstring)."""
    z, e = centre_and_scale(lo, hi)
    columns = slice(chain.offset, chain.offset + z.size)
    w_const = chain.weight.inputs[1]
    weight = np.array(w_const.values, np.float64)
    weight[:, columns] /= e
    _set(chain.weight, 1, weight, w_const)
    b_index = _constant_index(chain.bias, chain.weight.outputs[0])
    b_const = chain.bias.inputs[b_index]
    bias = np.array(b_const.values, np.float64)
    bias.reshape(-1)[columns] = (bias.reshape(-1)[columns] - z) / e
    _set(chain.bias, b_index, bias, b_const)
    o_const = chain.out_weight.inputs[1]
    out_weight = np.array(o_const.values, np.float64)
    o_index = _constant_index(chain.out_bias, chain.out_weight.outputs[0])
    ob_const = chain.out_bias.inputs[o_index]
    out_bias = np.array(ob_const.values, np.float64)
    out_bias += (z @ out_weight).reshape(out_bias.shape)
    _set(chain.out_bias, o_index, out_bias, ob_const)
    _set(chain.out_weight, 1, out_weight * e[:, None], o_const)
    for tensor in rescaled_tensors(chain):
        rebase(tensor, "veq")


def rescaled_tensors(chain: ValueChain) -> list[gs.Tensor]:
    """The tensors whose values the rewrite changes: the V projection's outputs, V through its heads, probs x V,
    the context and the output projection's MatMul (its bias Add's output is the float one again). Each on the
    chain has one reader (``_value_chain``)."""
    tensors = [chain.weight.outputs[0], chain.bias.outputs[0]]
    tensor = chain.v
    while True:
        if all(tensor is not t for t in tensors):
            tensors.append(tensor)
        if tensor is chain.out_weight.outputs[0]:
            return tensors
        tensor = tensor.outputs[0].outputs[0]


def equalize_values(graph: gs.Graph, feeds: Iterable) -> int:
    """Centre and equalize V in every attention core it can (``value_chains``), its ranges measured on
    ``feeds``; the number of cores rewritten."""
    chains = value_chains(graph)
    if not chains:
        return 0
    ranges = channel_ranges(graph, [c.v.name for c in chains], feeds)
    done = 0
    for chain in chains:
        if chain.v.name in ranges:
            equalize(chain, *ranges[chain.v.name])
            done += 1
    return done
