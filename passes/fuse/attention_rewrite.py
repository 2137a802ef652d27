"""The attention rewrites: an ``AttentionBlock`` (what a rule matched, or what a contrib Attention op holds)
written for the target, through ``passes/rewrite.py``.

Standard form (targets without contrib ops: standard ONNX that TensorRT 10 fuses into one MHA kernel)::

    x ─► MatMul([s·Wq | Wk | Wv]) + [s·bq | bk | bv] ─► Split ─► Reshape ─► Transpose ─► Q, K^T, V
    MatMul(Q, K^T) ─► Add(mask4d) ─► Softmax ─► MatMul(., V) ─► Transpose ─► Reshape ─► context
    mask4d = Unsqueeze((1 - float(attention_mask)) * -10000)      (built once, shared by every layer: ``masks``)

Contrib form (ONNX Runtime)::

    Attention(x, [Wq | Wk | Wv], [bq | bk | bv], mask_index=int32(attention_mask), num_heads, scale) ─► context

``context`` keeps its name, so tensors after the block line up with the graph before the pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.engine import NoMatch
from tqc.passes.fuse.masks import MASK_FILL, MaskCache
from tqc.passes.fuse.match import Linear, constant_values, feeding_nodes
from tqc.passes.rewrite import detach, detach_outputs, produce, produce_reduce, redirect, replace_output


@dataclass
class AttentionBlock:
    """Softmax(Q K^T · scale [+ mask]) V over ``num_heads`` heads, Q/K/V projected by ``q``/``k``/``v``."""

    q: Linear
    k: Linear
    v: Linear
    num_heads: int
    head_size: int
    scale: float
    mask: gs.Tensor | None       # the additive mask the block had (None: no mask)
    context: gs.Tensor           # [batch, sequence, hidden]
    bias: gs.Tensor | None = None  # an additive [B or 1, H, S, S] bias computed elsewhere (stays as it is)
    bias_flat: bool = False      # the bias is [B*H, S, S] (heads flattened for a bmm): reshaped to [B, H, S, S]
    mask_fill: tuple[gs.Tensor, float, bool] | None = None  # masked_fill (condition, fill, fill where true):
    #                                                          kept as it is on standard targets


def _packed(block: AttentionBlock, fold_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    s = block.scale if fold_scale else 1.0
    hidden = block.q.weight.shape[1]
    zeros = np.zeros(hidden, np.float32)
    biases = [(b if b is not None else zeros) for b in (block.q.bias, block.k.bias, block.v.bias)]
    weight = np.concatenate([block.q.weight * np.float32(s), block.k.weight, block.v.weight], axis=1)
    bias = np.concatenate([biases[0] * np.float32(s), biases[1], biases[2]])
    return weight.astype(np.float32), bias.astype(np.float32)


def _projections(graph: gs.Graph, block: AttentionBlock, prefix: str, fold_scale: bool = True) -> list[gs.Tensor]:
    """Q (scaled when ``fold_scale``), K and V, [batch, sequence, hidden]: one packed MatMul and a Split when
    they share their input, else a MatMul (+ bias Add) each."""
    def var(name: str) -> gs.Variable:
        return gs.Variable(f"{prefix}_{name}", dtype=np.float32)

    if block.q.x is block.k.x is block.v.x:
        weight, bias = _packed(block, fold_scale)
        hidden = block.q.weight.shape[1]
        qkv_mm, qkv, outputs = var("qkv_matmul"), var("qkv"), [var(f"{n}_proj") for n in "qkv"]
        produce(graph, "MatMul", f"{prefix}_qkv_matmul", [block.q.x, gs.Constant(f"{prefix}_qkv_weight", weight)],
                [qkv_mm])
        produce(graph, "Add", f"{prefix}_qkv_bias", [qkv_mm, gs.Constant(f"{prefix}_qkv_bias", bias)], [qkv])
        produce(graph, "Split", f"{prefix}_qkv_split",
                [qkv, gs.Constant(f"{prefix}_qkv_split_sizes", np.array([hidden] * 3, np.int64))], outputs,
                attrs={"axis": -1})
        return outputs
    projected = []
    for tag, lin, s in (("q", block.q, block.scale if fold_scale else 1.0), ("k", block.k, 1.0), ("v", block.v, 1.0)):
        mm = var(f"{tag}_matmul")
        produce(graph, "MatMul", f"{prefix}_{tag}_matmul",
                [lin.x, gs.Constant(f"{prefix}_{tag}_weight", lin.weight * np.float32(s))], [mm])
        if lin.bias is not None:
            out = var(f"{tag}_proj")
            produce(graph, "Add", f"{prefix}_{tag}_bias",
                    [mm, gs.Constant(f"{prefix}_{tag}_bias", lin.bias * np.float32(s))], [out])
            mm = out
        projected.append(mm)
    return projected


def _kept_projections(graph: gs.Graph, block: AttentionBlock) -> str:
    """The roles (of ``qkv``) whose projection the rest of the graph still reads once the block is rewritten
    (``block.context`` detached): DeBERTa's c2p and p2c bias reads Q and K. Call after the detach."""
    roots = list(graph.outputs) + [t for t in (block.bias, block.mask_fill[0] if block.mask_fill else None)
                                   if t is not None]
    alive = feeding_nodes(roots)
    return "".join(role for role, lin in zip("qkv", (block.q, block.k, block.v)) if id(lin.matmul) in alive)


def rewrite_standard(graph: gs.Graph, block: AttentionBlock, index: int, masks: MaskCache,
                     prefix: str | None = None) -> None:
    """The standard form (above), re-producing ``block.context`` under its name.

    A projection the rest of the graph still reads (``_kept_projections``) is computed once: its readers take
    the packed projection's output instead (the old MatMul dies), and Q then carries no scale, which moves to
    a Mul on the scores (TensorRT's MHA pattern: MatMul, Mul, Add, Softmax, MatMul)."""
    hidden = block.q.weight.shape[1]
    prefix = prefix or f"tqc_attn{index}"
    mask4d = masks.additive_4d() if block.mask is not None and block.mask_fill is None else None
    detach(block.context)  # re-produced under its name by the last Reshape
    kept = _kept_projections(graph, block)
    q_t, k_t, v_t = _projections(graph, block, prefix, fold_scale="q" not in kept)
    for role, lin, projected in zip("qkv", (block.q, block.k, block.v), (q_t, k_t, v_t)):
        if role in kept:
            redirect(lin.output, projected)
    heads_shape = gs.Constant(f"{prefix}_heads_shape", np.array([0, 0, block.num_heads, block.head_size], np.int64))

    def var(name: str) -> gs.Variable:
        return gs.Variable(f"{prefix}_{name}", dtype=np.float32)

    def split_heads(t: gs.Tensor, perm: list[int], tag: str) -> gs.Variable:
        r, out = var(f"{tag}_heads"), var(tag)
        produce(graph, "Reshape", f"{prefix}_{tag}_reshape", [t, heads_shape], [r])
        produce(graph, "Transpose", f"{prefix}_{tag}_transpose", [r], [out], attrs={"perm": perm})
        return out

    q = split_heads(q_t, [0, 2, 1, 3], "q")
    k = split_heads(k_t, [0, 2, 3, 1], "kt")
    v = split_heads(v_t, [0, 2, 1, 3], "v")
    scores = var("scores")
    produce(graph, "MatMul", f"{prefix}_qk", [q, k], [scores])
    if "q" in kept:
        scaled = var("scaled_scores")
        scale = gs.Constant(f"{prefix}_scale", np.array(block.scale, np.float32))
        produce(graph, "Mul", f"{prefix}_scale", [scores, scale], [scaled])
        scores = scaled
    if block.bias is not None:
        biased = var("biased_scores")
        produce(graph, "Add", f"{prefix}_bias_add", [scores, _bias_4d(graph, block, prefix)], [biased])
        scores = biased
    if block.mask_fill is not None:
        filled = var("filled_scores")
        produce(graph, "Where", f"{prefix}_mask_fill", _fill_branches(block, scores, prefix), [filled])
        scores = filled
    elif mask4d is not None:
        masked = var("masked_scores")
        produce(graph, "Add", f"{prefix}_mask_add", [scores, mask4d], [masked])
        scores = masked
    probs, ctx4, ctx_t = var("probs"), var("context_heads"), var("context_transposed")
    produce(graph, "Softmax", f"{prefix}_softmax", [scores], [probs], attrs={"axis": -1})
    produce(graph, "MatMul", f"{prefix}_pv", [probs, v], [ctx4])
    produce(graph, "Transpose", f"{prefix}_context_transpose", [ctx4], [ctx_t], attrs={"perm": [0, 2, 1, 3]})
    produce(graph, "Reshape", f"{prefix}_context_reshape",
            [ctx_t, gs.Constant(f"{prefix}_context_shape", np.array([0, 0, hidden], np.int64))], [block.context])


def _contrib_attrs(block: AttentionBlock) -> dict:
    """Heads, mask fill and (unless it is the op's default 1/sqrt(head size)) scale of a contrib op."""
    attrs = {"num_heads": block.num_heads, "mask_filter_value": MASK_FILL}
    if not math.isclose(block.scale, 1.0 / math.sqrt(block.head_size), rel_tol=1e-6):
        attrs["scale"] = float(block.scale)
    return attrs


def rewrite_contrib(graph: gs.Graph, block: AttentionBlock, index: int, masks: MaskCache,
                    mask_format: str = "raw") -> None:
    """com.microsoft Attention (above), or MultiHeadAttention for a block with a bias; ``NoMatch`` when Q, K
    and V are not projected from one input."""
    if block.bias is not None:
        return _rewrite_biased(graph, block, index, masks, mask_format)
    if not (block.q.x is block.k.x is block.v.x):
        raise NoMatch("ORT Attention needs Q, K and V projected from one input", 0)
    prefix = f"tqc_attn{index}"
    weight, bias = _packed(block, fold_scale=False)
    inputs = [block.q.x, gs.Constant(f"{prefix}_qkv_weight", weight), gs.Constant(f"{prefix}_qkv_bias", bias)]
    if block.mask is not None:
        inputs.append(masks.end_positions() if mask_format == "end" else masks.int32_index())
    attrs = _contrib_attrs(block)
    replace_output(graph, block.context, "Attention", prefix, inputs, attrs=attrs, domain="com.microsoft")


def _bias_4d(graph: gs.Graph, block: AttentionBlock, prefix: str) -> gs.Tensor:
    """The block's bias as [B, H, S, S]: as it is, or a [B*H, S, S] bias unsqueezed to [B*H, 1, S, S] and
    reshaped to [-1, H, 0, 0] (0 copies S and S), with no Shape read: ONNX Runtime CUDA would run a computed
    target's arithmetic on the CPU, and one CPU node keeps a session from capturing a CUDA graph. (The export
    reshapes the biased scores by their shape, Shape(Q K^T + bias): reusing that target would keep the old
    Q K^T product computed only for its shape.)"""
    if not block.bias_flat:
        return block.bias
    lifted = gs.Variable(f"{prefix}_bias_lifted", dtype=np.float32)
    out = gs.Variable(f"{prefix}_bias_4d", dtype=np.float32)
    produce(graph, "Unsqueeze", f"{prefix}_bias_lifted",
            [block.bias, gs.Constant(f"{prefix}_bias_head_axis", np.array([1], np.int64))], [lifted])
    target = gs.Constant(f"{prefix}_bias_4d_shape", np.array([-1, block.num_heads, 0, 0], np.int64))
    produce(graph, "Reshape", f"{prefix}_bias_4d", [lifted, target], [out])
    return out


def _fill_branches(block: AttentionBlock, other: gs.Tensor, prefix: str) -> list[gs.Tensor]:
    """Where's inputs for the block's masked_fill: the fill where the graph had it, ``other`` elsewhere."""
    condition, value, fill_when_true = block.mask_fill
    fill = gs.Constant(f"{prefix}_mask_fill_value", np.array(value, np.float32))
    return [condition, fill, other] if fill_when_true else [condition, other, fill]


def _packed_for_bias(graph: gs.Graph, block: AttentionBlock, prefix: str) -> list[gs.Tensor]:
    """Q, K and V for MultiHeadAttention: projected from one input, one packed MatMul, one Add and a Split
    (``_projections``: three kernels where there were six), and every other reader of a projection (DeBERTa's
    c2p and p2c read Q and K) reads the Split's output, so each product is computed once; projected from
    different inputs, the projections as they are."""
    if not (block.q.x is block.k.x is block.v.x):
        return [block.q.output, block.k.output, block.v.output]
    projected = _projections(graph, block, prefix, fold_scale=False)
    for lin, tensor in zip((block.q, block.k, block.v), projected):
        redirect(lin.output, tensor)
    return projected


def _rewrite_biased(graph: gs.Graph, block: AttentionBlock, index: int, masks: MaskCache, mask_format: str) -> None:
    """MultiHeadAttention(Q, K, V, key_padding_mask, attention_bias), Q, K and V packed (``_packed_for_bias``)
    where one input feeds them (a bias such as DeBERTa's may read them too)::

        x@[Wq|Wk|Wv]+[bq|bk|bv] ─► Split ─► MultiHeadAttention(Q, K, V, mask_index, bias, num_heads, scale) ─► context

    A masked_fill mask (DeBERTa's: query and key padding, a padded query row all masked) stays the graph's own
    (``_masked_fill_as_bias``): exact at every position, padded query rows included, where a key padding mask
    would change those rows."""
    prefix, empty = f"tqc_mha{index}", gs.Variable.empty()
    mask, bias, context = empty, _bias_4d(graph, block, prefix), block.context
    q, k, v = _packed_for_bias(graph, block, prefix)
    if block.mask_fill is not None:
        bias, context = _masked_fill_as_bias(graph, block, bias, v, prefix)
    elif block.mask is not None:
        mask = masks.end_positions() if mask_format == "end" else masks.int32_index()
    inputs = [q, k, v, empty, mask, bias]
    attrs = _contrib_attrs(block)
    if context is block.context:
        replace_output(graph, block.context, "MultiHeadAttention", prefix, inputs, attrs=attrs, domain="com.microsoft")
    else:
        produce(graph, "MultiHeadAttention", prefix, inputs, [context], attrs=attrs, domain="com.microsoft")


def _masked_fill_as_bias(graph: gs.Graph, block: AttentionBlock, bias: gs.Tensor, v: gs.Tensor,
                         prefix: str) -> tuple[gs.Tensor, gs.Variable]:
    """A masked_fill (``condition`` [B, 1, S, S]) for MultiHeadAttention: ``bias + Where(condition, -10000, 0)``
    (exp(-10000) is 0, as exp(fill) was, and -10000 is a float16 too); a query row masked whole, uniform
    attention in the graph, is the mean of V (``v``: the op's V), put back by a Where on the op's output.
    Returns (the op's bias, the tensor the op writes)."""
    def var(name: str) -> gs.Variable:
        return gs.Variable(f"{prefix}_{name}", dtype=np.float32)

    def const(name: str, value, dtype=np.float32) -> gs.Constant:
        return gs.Constant(f"{prefix}_{name}", np.array(value, dtype))

    condition = block.mask_fill[0]
    additive, total, as_float, row_masked, whole, mean_v, attended = (
        var(n) for n in ("mask_additive", "bias", "mask_float", "row_masked", "row_masked_whole", "mean_v",
                         "attended"))
    fill = gs.Constant(f"{prefix}_mask_fill_value", np.array(MASK_FILL, np.float32))
    zero = const("zero", 0.0)
    branches = [fill, zero] if block.mask_fill[2] else [zero, fill]
    produce(graph, "Where", f"{prefix}_mask_additive", [condition, *branches], [additive])
    produce(graph, "Add", f"{prefix}_bias", [bias, additive], [total])
    produce(graph, "Cast", f"{prefix}_mask_float", [condition], [as_float], attrs={"to": 1})
    # masked where true: a row is masked whole where its minimum is 1
    produce_reduce(graph, "ReduceMin" if block.mask_fill[2] else "ReduceMax", f"{prefix}_row_masked", as_float, -1,
                   row_masked, f"{prefix}_{prefix}_row_masked_axes")
    produce(graph, "Squeeze", f"{prefix}_row_masked_whole", [row_masked, const("head_axis", [1], np.int64)],
            [whole])  # [B, S, 1]: 1.0 where the row is masked whole (masked where true), else 0.0
    produce_reduce(graph, "ReduceMean", f"{prefix}_mean_v", v, 1, mean_v, f"{prefix}_{prefix}_mean_v_axes")
    masked_whole = gs.Variable(f"{prefix}_row_masked_bool", dtype=np.bool_)
    produce(graph, "Cast", f"{prefix}_row_masked_bool", [whole], [masked_whole], attrs={"to": 9})
    if not block.mask_fill[2]:  # masked where false: a row is masked whole where its maximum is 0
        flipped = gs.Variable(f"{prefix}_row_masked_not", dtype=np.bool_)
        produce(graph, "Not", f"{prefix}_row_masked_not", [masked_whole], [flipped])
        masked_whole = flipped
    produce(graph, "Where", f"{prefix}_uniform_rows", [masked_whole, mean_v, attended], [detach(block.context)])
    return total, attended


def expand_ort_attention(graph: gs.Graph, node: gs.Node, index: int, masks: MaskCache) -> None:
    """com.microsoft Attention -> the standard form (packed QKV MatMul, Softmax core).

    Used by ``qdq`` for ONNX Runtime targets: the contrib op keeps its QKV projection in float, while the
    standard form exposes it as a MatMul that ONNX Runtime runs as MatMulIntegerToFloat.
    """
    x, weight_t, bias_t = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    weight = constant_values(weight_t).astype(np.float32)
    hidden = weight.shape[1] // 3
    bias = constant_values(bias_t).astype(np.float32) if bias_t is not None and constant_values(bias_t) is not None \
        else np.zeros(3 * hidden, np.float32)
    heads = int(node.attrs["num_heads"])
    scale = float(node.attrs.get("scale", 1.0 / math.sqrt(hidden // heads)))
    has_mask = len(node.inputs) > 3 and node.inputs[3].name != ""
    lin = [Linear(x, weight[:, i * hidden:(i + 1) * hidden], bias[i * hidden:(i + 1) * hidden], x, node, None)
           for i in range(3)]
    context = detach_outputs(node)[0]
    block = AttentionBlock(q=lin[0], k=lin[1], v=lin[2], num_heads=heads, head_size=hidden // heads, scale=scale,
                           mask=node.inputs[3] if has_mask else None, context=context)
    rewrite_standard(graph, block, index, masks, prefix=f"tqc_xattn{index}")
