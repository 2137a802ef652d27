"""SmoothQuant's Mul and the shift's Add folded into the node that writes the smoothed input (``Target.shift_folded``).

``qdq{shift}`` centres a smoothed linear input per channel: ``x ─► Mul(1/s) ─► Add(-z/s) ─► Q``. On ONNX Runtime
CPU that Add is a node of its own (1-9% of MiniLM's INT8 time for one per layer input). Two producers can take it:

``fold_into_attention``: the attention output, written by a QAttention, takes both the Mul and the Add into its
value columns (softmax rows sum to 1; below). ``fold_shift``: where ``x`` is a LayerNorm's output, the shift can
live in the LayerNorm instead::

    LN(gamma, beta) ─► x ─► Mul(1/s) ─► Add(-z/s) ─► Q          LN(gamma, beta - z) ─► x - z ─► Mul(1/s) ─► Q
                       └──► Sum(..., b) (the residual)     =>                          └──► Sum(..., b + z)
                       └──► MatMul(W) ─► Add(c) (split)                                └──► MatMul(W) ─► Add(c + z W)

exact in float: every other reader of ``x`` gets ``z`` back through a constant it already adds (the residual
Sum's bias, the bias after the split's float MatMul: ``split_producer.py``). No node is added, the Add is gone,
and the INT8 codes are the shifted ones. Where a reader cannot take ``z`` back (no such constant, a graph output,
a second smoothed reader) the Add stays. LayerNormalization (beta: input 2) and com.microsoft's
EmbedLayerNormalization (beta: input 6, its normalized output 0) are read. On MiniLM (ort-cpu) the two leave three
Muls and one Add per layer where the unshifted placement had four Muls (the Add: the FFN output layer's, after
GELU, which no producer can take): with the shift on every input 0.94-1.03x the time of the placement without it, NN
agreement 93.7 -> 95.7% (``bench/results/qdq_speed_shift_folded_r*_cpu.json``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values
from tqc.passes.qdq.smoothing_chain import fold_at_quantizers, smoothing_chain
from tqc.passes.rewrite import rebase

BETA_INPUT = {"LayerNormalization": 2, "EmbedLayerNormalization": 6}  # op -> the index of its beta input
BIAS_READERS = ("Add", "Sum", "BiasGelu", "FastGelu")  # ops that add a per-channel constant to their input


def _channel_constant_index(node: gs.Node, data: gs.Tensor, width: int) -> int | None:
    """The index of ``node``'s one per-channel constant input (``width`` values on the last axis), beside ``data``
    read once; None where it has none or several."""
    if sum(t is data for t in node.inputs) > 1:
        return None
    found = [i for i, t in enumerate(node.inputs) if t is not data and constant_values(t) is not None]
    if len(found) != 1:
        return None
    values = constant_values(node.inputs[found[0]])
    return found[0] if values.size == width and values.shape[-1] == width else None


def _compensation(reader: gs.Node, x: gs.Tensor, d: np.ndarray) -> tuple[gs.Node, int, np.ndarray] | None:
    """How ``reader`` takes back a shift ``d`` added to ``x``: (node, input index, the constant's new value), or None.
    A Sum / Add with a per-channel constant takes ``-d``; a MatMul by a constant [C, N] whose only reader adds a
    per-channel constant takes ``-d W`` there."""
    if reader.op in ("Add", "Sum"):
        index = _channel_constant_index(reader, x, d.size)
        if index is None:
            return None
        values = constant_values(reader.inputs[index])
        return reader, index, (values.astype(np.float64) - d.reshape(values.shape)).astype(values.dtype)
    if reader.op != "MatMul" or reader.inputs[0] is not x or len(reader.inputs) != 2:
        return None
    weight = constant_values(reader.inputs[1])
    out = reader.outputs[0]
    if weight is None or weight.ndim != 2 or weight.shape[0] != d.size or len(out.outputs) != 1:
        return None
    after = out.outputs[0]
    index = _channel_constant_index(after, out, weight.shape[1]) if after.op in BIAS_READERS else None
    if index is None or (after.op in ("BiasGelu", "FastGelu") and index != 1):
        return None
    values = constant_values(after.inputs[index])
    moved = values.astype(np.float64) - (d @ weight.astype(np.float64)).reshape(values.shape)
    return after, index, moved.astype(values.dtype)


def _fold(graph: gs.Graph, q: gs.Node) -> bool:
    """Fold the shift before ``q`` into the LayerNorm that writes its input (module docstring); False where not."""
    shifted = q.inputs[0]
    add = shifted.inputs[0] if shifted.inputs else None
    chain = smoothing_chain(q)
    if add is None or add.op != "Add" or chain is None:
        return False
    x, factor, offset = chain
    norm = x.inputs[0] if x.inputs else None
    if norm is None or norm.op not in BETA_INPUT or norm.outputs[0] is not x or x in graph.outputs or \
            len(norm.inputs) <= BETA_INPUT[norm.op]:
        return False
    beta = constant_values(norm.inputs[BETA_INPUT[norm.op]])
    if beta is None or beta.shape != (factor.size,) or np.any(factor == 0):
        return False
    mul = next(t for t in add.inputs if constant_values(t) is None).inputs[0]
    d = offset.astype(np.float64) / factor.astype(np.float64)  # (x + d) f = x f + offset
    changes = []
    for reader in x.outputs:
        if reader is mul:
            continue
        change = _compensation(reader, x, d)
        if change is None or any(node is change[0] and slot == change[1] for node, slot, _ in changes):
            return False  # (one constant taking z back twice, e.g. a Sum of x and x W: left as it is)
        changes.append(change)
    name = q.name
    for index, (node, slot, values) in enumerate(changes):
        node.inputs[slot] = gs.Constant(f"{name}_shifted_reader{index}", values)
    norm.inputs[BETA_INPUT[norm.op]] = gs.Constant(f"{name}_shifted_beta",
                                                   (beta.astype(np.float64) + d).astype(beta.dtype))
    q.inputs[0] = mul.outputs[0]
    rebase(x, "shifted")  # it holds x + z now
    return True


def fold_shift(graph: gs.Graph) -> int:
    """Fold every shift Add between a LayerNorm and an activation's QuantizeLinear into the LayerNorm's beta, the
    other readers of its output taking it back (module docstring). Returns how many folded."""
    return fold_at_quantizers(graph, _fold)


# QAttention's inputs (com.microsoft): the INT8 packed q, k, v weight [K, 3H], its bias [3H], its per-column scales
QATTENTION_WEIGHT, QATTENTION_BIAS, QATTENTION_WEIGHT_SCALE = 1, 2, 4


def _fold_into_attention(graph: gs.Graph, q: gs.Node) -> bool:
    """Fold the smoothing Mul (and shift Add) before ``q`` into the value columns of the QAttention that writes
    its input (``fold_into_attention``); False where not."""
    chain = smoothing_chain(q)
    if chain is None:
        return False
    x, factor, offset = chain
    attention = x.inputs[0] if x.inputs else None
    if attention is None or attention.op != "QAttention" or attention.outputs[0] is not x or len(x.outputs) != 1 \
            or x in graph.outputs or "qkv_hidden_sizes" in attention.attrs or \
            len(attention.inputs) <= QATTENTION_WEIGHT_SCALE:
        return False
    bias = constant_values(attention.inputs[QATTENTION_BIAS])
    scale = constant_values(attention.inputs[QATTENTION_WEIGHT_SCALE])
    hidden = factor.size
    if bias is None or scale is None or bias.shape != (3 * hidden,) or scale.shape != (3 * hidden,) or \
            np.any(factor <= 0):
        return False
    values = slice(2 * hidden, 3 * hidden)  # v's columns: output channel j is v's column j (heads concatenated)
    new_scale, new_bias = scale.astype(np.float64), bias.astype(np.float64)
    new_scale[values] *= factor
    new_bias[values] = new_bias[values] * factor + offset
    name = q.name
    attention.inputs[QATTENTION_WEIGHT_SCALE] = gs.Constant(f"{name}_smoothed_value_scale",
                                                            new_scale.astype(scale.dtype))
    attention.inputs[QATTENTION_BIAS] = gs.Constant(f"{name}_shifted_value_bias", new_bias.astype(bias.dtype))
    q.inputs[0] = x
    rebase(x, "smoothed")  # it holds x f + c now
    return True


def fold_into_attention(graph: gs.Graph) -> int:
    """Fold the smoothing Mul f and shift Add c of an attention output's linear layer into the value columns of the
    QAttention before it: softmax rows sum to 1, so P (x W_v + b_v) f + c = P (x W_v f + b_v f + c), and W_v f is
    the same INT8 codes with per-column scales times f (f > 0). Exact in float, two nodes fewer per layer. Returns
    how many folded."""
    return fold_at_quantizers(graph, _fold_into_attention)
