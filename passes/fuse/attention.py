"""Attention fusion: find each attention block by its Softmax, then rewrite it for the target.

Before (any rule of ``attention_rules``; here the sdpa/legacy export)::

    x ─► MatMul(Wq)+bq ─► Reshape ─► Transpose ─► Mul(√s) ─┐
    x ─► MatMul(Wk)+bk ─► Reshape ─► Transpose ─► Mul(√s) ─┴► MatMul ─► Add(mask) ─► Softmax ─► Where(IsNaN)
    x ─► MatMul(Wv)+bv ─► Reshape ─► Transpose ─────────────────────────────────────────────────┴► MatMul
        ─► (Reshape) ─► Transpose ─► Reshape ─► context          mask = 30 nodes from attention_mask, per layer

After, ``--target trt`` (standard ONNX that TensorRT 10 fuses into one MHA kernel)::

    x ─► MatMul([s·Wq | Wk | Wv]) + [s·bq | bk | bv] ─► Split ─► Reshape ─► Transpose ─► Q, K^T, V
    MatMul(Q, K^T) ─► Add(mask4d) ─► Softmax ─► MatMul(., V) ─► Transpose ─► Reshape ─► context
    mask4d = Unsqueeze((1 - float(attention_mask)) * -10000)      (built once, shared by every layer)

After, ``--target ort-cpu|ort-cuda`` (ONNX Runtime contrib op)::

    Attention(x, [Wq | Wk | Wv], [bq | bk | bv], mask_index=int32(attention_mask), num_heads, scale) ─► context

``context`` keeps its name, so tensors after the block line up with the graph before the pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.core.target import input_role_by_name
from tqc.passes.fuse.attention_rules import RULES, AttentionRule, Step
from tqc.passes.fuse.match import (Linear, NoMatch, ancestors_reach, consumers, constant_values, describe,
                                   match_linear, producer, split_scalar_operand)
from tqc.passes.rewrite import detach, detach_outputs, replace_output

MASK_FILL = -10000.0


@dataclass
class AttentionMatch:
    rule: AttentionRule
    softmax: gs.Node
    q: Linear
    k: Linear
    v: Linear
    num_heads: int
    head_size: int
    scale: float
    mask: gs.Tensor | None
    context: gs.Tensor  # [batch, sequence, hidden]
    nodes: list[gs.Node] = field(default_factory=list)


@dataclass
class Miss:
    """Why a Softmax was not fused: the closest rule and where it stopped."""

    softmax: str
    rule: str
    reason: str
    depth: int


def _walk(tensor: gs.Tensor, steps: tuple[Step, ...], what: str, depth: int, nodes: list[gs.Node]):
    """Follow ``steps`` backwards from ``tensor``; returns (tensor reached, scale factor, reshapes seen)."""
    scale = 1.0
    reshapes: list[gs.Node] = []
    for index, step in enumerate(steps):
        node = producer(tensor)
        here = f"{what} step {index + 1} ({step})"
        if step.op == "Scale":
            parts = split_scalar_operand(node) if node is not None and node.op in ("Mul", "Div") else None
            if parts is None:
                if step.optional:
                    continue
                raise NoMatch(f"{here}: expected Mul/Div by a scalar constant, found {describe(node)}", depth + index)
            tensor, factor = parts
            scale *= factor
        elif node is None or node.op != step.op:
            if step.optional:
                continue
            raise NoMatch(f"{here}: expected {step.op}, found {describe(node)}", depth + index)
        else:
            if step.perm is not None and tuple(node.attrs.get("perm", ())) != step.perm:
                if step.optional:
                    continue
                raise NoMatch(f"{here}: Transpose '{node.name}' has perm {list(node.attrs.get('perm', []))}",
                              depth + index)
            if node.op == "Reshape":
                reshapes.append(node)
            tensor = node.inputs[0]
        nodes.append(node)
    return tensor, scale, reshapes


def _heads_from_reshape(reshape: gs.Node, hidden: int) -> int | None:
    """Read H from a Reshape to [B, S, H, D] (constant shape, or Concat with constant H and D)."""
    shape = reshape.inputs[1]
    values = constant_values(shape)
    if values is not None and values.size == 4 and values[2] > 0:
        return int(values[2])
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


def match_rule(softmax: gs.Node, rule: AttentionRule, mask_inputs: set[str]) -> AttentionMatch:
    nodes: list[gs.Node] = [softmax]
    axis = softmax.attrs.get("axis", -1)
    if axis not in (-1, 3):
        raise NoMatch(f"Softmax axis {axis} is not the last axis", 0)
    # After the softmax: optional NaN guard, then the context MatMul.
    probs = softmax.outputs[0]
    users = consumers(probs)
    if rule.nan_guard:
        isnan = next((u for u in users if u.op == "IsNaN"), None)
        where = next((u for u in users if u.op == "Where"), None)
        if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs:
            raise NoMatch(f"after Softmax: expected the NaN guard Where(IsNaN(p), 0, p), found "
                          f"{', '.join(describe(u) for u in users) or 'nothing'}", 1)
        nodes += [isnan, where]
        probs = where.outputs[0]
        users = consumers(probs)
    elif any(u.op == "IsNaN" for u in users):
        raise NoMatch("after Softmax: a NaN guard this rule does not expect", 1)
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not probs:
        raise NoMatch(f"after Softmax: expected one MatMul(probs, V), found "
                      f"{', '.join(describe(u) for u in users) or 'nothing'}", 2)
    context_matmul = users[0]
    nodes.append(context_matmul)
    # Output path, forwards: (Reshape) -> Transpose[0,2,1,3] -> Reshape.
    tensor = context_matmul.outputs[0]
    for index, step in enumerate(rule.out_path):
        nexts = [n for n in consumers(tensor) if n.op != "Shape"]  # shape reads die with the old block
        node = nexts[0] if len(nexts) == 1 else None
        ok = node is not None and node.op == step.op and (
            step.perm is None or tuple(node.attrs.get("perm", ())) == step.perm)
        if not ok:
            if step.optional:
                continue
            raise NoMatch(f"context step {index + 1} ({step}): expected {step.op}, found "
                          f"{', '.join(describe(n) for n in nexts) or 'nothing'}", 3 + index)
        nodes.append(node)
        tensor = node.outputs[0]
    context = tensor
    # Before the softmax: mask Add, then scale, then the scores MatMul.
    depth = 6
    scores = softmax.inputs[0]
    mask = None
    node = producer(scores)
    if node is not None and node.op == "Add":
        a, b = node.inputs
        a_from_mask = ancestors_reach(a, mask_inputs)
        b_from_mask = ancestors_reach(b, mask_inputs)
        if b_from_mask and not a_from_mask:
            scores, mask = a, b
        elif a_from_mask and not b_from_mask:
            scores, mask = b, a
        else:
            raise NoMatch(f"scores: Add '{node.name}' before Softmax has no operand derived from the attention mask "
                          f"input ({', '.join(sorted(mask_inputs)) or 'none found'})", depth)
        nodes.append(node)
    elif rule.mask == "add":
        raise NoMatch(f"scores: expected the mask Add before Softmax, found {describe(node)}", depth)
    scale = 1.0
    if rule.score_scale:
        node = producer(scores)
        parts = split_scalar_operand(node) if node is not None and node.op in ("Mul", "Div") else None
        if parts is None:
            raise NoMatch(f"scores: expected Mul/Div by a scalar (the softmax scale), found {describe(node)}",
                          depth + 1)
        scores, scale = parts
        nodes.append(node)
    qk = producer(scores)
    if qk is None or qk.op != "MatMul":
        # A scale here, for a rule that expects none, stops this rule no further than one that expects it.
        stopped = depth + 1 if not rule.score_scale and qk is not None and qk.op in ("Mul", "Div") else depth + 2
        raise NoMatch(f"scores: expected MatMul(Q, K^T), found {describe(qk)}", stopped)
    nodes.append(qk)
    depth += 3
    q_end, q_scale, q_reshapes = _walk(qk.inputs[0], rule.q_path, "Q path", depth, nodes)
    k_end, k_scale, k_reshapes = _walk(qk.inputs[1], rule.k_path, "K path", depth + 10, nodes)
    v_end, _, v_reshapes = _walk(context_matmul.inputs[1], rule.v_path, "V path", depth + 20, nodes)
    q = match_linear(q_end, "Q projection", depth + 30)
    k = match_linear(k_end, "K projection", depth + 31)
    v = match_linear(v_end, "V projection", depth + 32)
    hidden = q.weight.shape[1]
    if k.weight.shape[1] != hidden or v.weight.shape[1] != hidden:
        raise NoMatch("projections: Q, K and V widths differ", depth + 33)
    heads = _heads_from_reshape(q_reshapes[-1], hidden) if q_reshapes else None
    if heads is None or hidden % heads:
        raise NoMatch(f"cannot read the number of heads from '{q_reshapes[-1].name if q_reshapes else '?'}'",
                      depth + 34)
    return AttentionMatch(rule=rule, softmax=softmax, q=q, k=k, v=v, num_heads=heads, head_size=hidden // heads,
                          scale=scale * q_scale * k_scale, mask=mask, context=context, nodes=nodes)


def find_attention(graph: gs.Graph, mask_inputs: set[str]) -> tuple[list[AttentionMatch], list[Miss]]:
    matches, misses = [], []
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        best: NoMatch | None = None
        best_rule = ""
        for rule in RULES:
            try:
                matches.append(match_rule(softmax, rule, mask_inputs))
                break
            except NoMatch as miss:
                if best is None or miss.depth > best.depth:
                    best, best_rule = miss, rule.name
        else:
            misses.append(Miss(softmax.name, best_rule, best.reason if best else "no rule", best.depth if best else 0))
    return matches, misses


def _indexes_a_gather(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` (through Casts) is the index of a Gather: token ids, token types, positions."""
    for user in consumers(tensor):
        if user.op == "Gather" and len(user.inputs) > 1 and user.inputs[1] is tensor:
            return True
        if user.op == "Cast" and _indexes_a_gather(user.outputs[0]):
            return True
    return False


def mask_input_names(graph: gs.Graph) -> set[str]:
    """The attention-mask inputs: those whose name says so (``core.target.input_role_by_name``); else, by role, the 2-D integer or boolean inputs
    that index no embedding Gather (a user's ``ids, attn`` signature)."""
    named = {t.name for t in graph.inputs if input_role_by_name(t.name) == "attention_mask"}
    if named:
        return named
    return {t.name for t in graph.inputs
            if t.shape is not None and len(t.shape) == 2 and t.dtype is not None and
            (np.issubdtype(np.dtype(t.dtype), np.integer) or np.dtype(t.dtype) == np.bool_) and
            not _indexes_a_gather(t)}


class MaskCache:
    """Builds each derived mask tensor once for the whole graph."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.built: dict[str, gs.Variable] = {}

    def source(self) -> gs.Tensor | None:
        names = mask_input_names(self.graph)
        for t in self.graph.inputs:
            if t.name in names:
                return t
        return None

    def _reuse(self, key: str, name: str) -> bool:
        """Whether mask ``key`` exists: built here, or by an earlier pass (fuse, then qdq's expansion)."""
        if key not in self.built:
            existing = self.graph.tensors().get(name)
            if existing is not None:
                self.built[key] = existing
        return key in self.built

    def additive_4d(self) -> gs.Variable:
        if not self._reuse("additive", "tqc_attention_mask_4d"):
            mask = self.source()
            as_float = gs.Variable("tqc_mask_float", dtype=np.float32)
            inverted = gs.Variable("tqc_mask_inverted", dtype=np.float32)
            additive = gs.Variable("tqc_mask_additive", dtype=np.float32)
            mask4d = gs.Variable("tqc_attention_mask_4d", dtype=np.float32)
            self.graph.nodes += [
                gs.Node("Cast", "tqc_mask_cast", attrs={"to": 1}, inputs=[mask], outputs=[as_float]),
                gs.Node("Sub", "tqc_mask_invert", inputs=[gs.Constant("tqc_one", np.array(1.0, np.float32)), as_float],
                        outputs=[inverted]),
                gs.Node("Mul", "tqc_mask_fill", inputs=[inverted, gs.Constant("tqc_mask_fill_value",
                                                                                np.array(MASK_FILL, np.float32))],
                        outputs=[additive]),
                gs.Node("Unsqueeze", "tqc_mask_unsqueeze",
                        inputs=[additive, gs.Constant("tqc_mask_axes", np.array([1, 2], np.int64))], outputs=[mask4d]),
            ]
            self.built["additive"] = mask4d
        return self.built["additive"]

    def int32_index(self) -> gs.Variable:
        """[batch, sequence] int32 1/0 mask: any padding pattern."""
        if not self._reuse("index", "tqc_mask_index"):
            mask = self.source()
            index = gs.Variable("tqc_mask_index", dtype=np.int32)
            self.graph.nodes.append(gs.Node("Cast", "tqc_mask_index_cast", attrs={"to": 6}, inputs=[mask],
                                            outputs=[index]))
            self.built["index"] = index
        return self.built["index"]

    def end_positions(self) -> gs.Variable:
        """[batch] int32 count of kept tokens: right padding only, and what ORT's fused CUDA kernels take."""
        if not self._reuse("end", "tqc_mask_end_positions"):
            index = self.int32_index()
            ends = gs.Variable("tqc_mask_end_positions", dtype=np.int32)
            self.graph.nodes.append(gs.Node("ReduceSum", "tqc_mask_reduce", attrs={"keepdims": 0},
                                            inputs=[index, gs.Constant("tqc_mask_reduce_axes", np.array([1], np.int64))],
                                            outputs=[ends]))
            self.built["end"] = ends
        return self.built["end"]


def _packed(match: AttentionMatch, fold_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    s = match.scale if fold_scale else 1.0
    hidden = match.q.weight.shape[1]
    zeros = np.zeros(hidden, np.float32)
    biases = [(b if b is not None else zeros) for b in (match.q.bias, match.k.bias, match.v.bias)]
    weight = np.concatenate([match.q.weight * np.float32(s), match.k.weight, match.v.weight], axis=1)
    bias = np.concatenate([biases[0] * np.float32(s), biases[1], biases[2]])
    return weight.astype(np.float32), bias.astype(np.float32)


def rewrite_trt(graph: gs.Graph, match: AttentionMatch, index: int, masks: MaskCache,
                prefix: str | None = None) -> None:
    hidden = match.q.weight.shape[1]
    heads, size = match.num_heads, match.head_size
    prefix = prefix or f"tqc_attn{index}"
    shared_input = match.q.x is match.k.x is match.v.x
    nodes: list[gs.Node] = []
    heads_shape = gs.Constant(f"{prefix}_heads_shape", np.array([0, 0, heads, size], np.int64))

    def split_heads(t: gs.Tensor, perm: list[int], tag: str) -> gs.Variable:
        r = gs.Variable(f"{prefix}_{tag}_heads", dtype=np.float32)
        out = gs.Variable(f"{prefix}_{tag}", dtype=np.float32)
        nodes.append(gs.Node("Reshape", f"{prefix}_{tag}_reshape", inputs=[t, heads_shape], outputs=[r]))
        nodes.append(gs.Node("Transpose", f"{prefix}_{tag}_transpose", attrs={"perm": perm}, inputs=[r],
                             outputs=[out]))
        return out

    if shared_input:
        weight, bias = _packed(match, fold_scale=True)
        qkv_mm = gs.Variable(f"{prefix}_qkv_matmul", dtype=np.float32)
        qkv = gs.Variable(f"{prefix}_qkv", dtype=np.float32)
        q_t, k_t, v_t = (gs.Variable(f"{prefix}_{n}_proj", dtype=np.float32) for n in "qkv")
        nodes += [
            gs.Node("MatMul", f"{prefix}_qkv_matmul", inputs=[match.q.x, gs.Constant(f"{prefix}_qkv_weight", weight)],
                    outputs=[qkv_mm]),
            gs.Node("Add", f"{prefix}_qkv_bias", inputs=[qkv_mm, gs.Constant(f"{prefix}_qkv_bias", bias)],
                    outputs=[qkv]),
            gs.Node("Split", f"{prefix}_qkv_split", attrs={"axis": -1},
                    inputs=[qkv, gs.Constant(f"{prefix}_qkv_split_sizes", np.array([hidden] * 3, np.int64))],
                    outputs=[q_t, k_t, v_t]),
        ]
    else:
        projected = []
        for tag, lin, s in (("q", match.q, match.scale), ("k", match.k, 1.0), ("v", match.v, 1.0)):
            mm = gs.Variable(f"{prefix}_{tag}_matmul", dtype=np.float32)
            nodes.append(gs.Node("MatMul", f"{prefix}_{tag}_matmul",
                                 inputs=[lin.x, gs.Constant(f"{prefix}_{tag}_weight", lin.weight * np.float32(s))],
                                 outputs=[mm]))
            if lin.bias is not None:
                out = gs.Variable(f"{prefix}_{tag}_proj", dtype=np.float32)
                nodes.append(gs.Node("Add", f"{prefix}_{tag}_bias",
                                     inputs=[mm, gs.Constant(f"{prefix}_{tag}_bias", lin.bias * np.float32(s))],
                                     outputs=[out]))
                mm = out
            projected.append(mm)
        q_t, k_t, v_t = projected
    q = split_heads(q_t, [0, 2, 1, 3], "q")
    k = split_heads(k_t, [0, 2, 3, 1], "kt")
    v = split_heads(v_t, [0, 2, 1, 3], "v")
    scores = gs.Variable(f"{prefix}_scores", dtype=np.float32)
    nodes.append(gs.Node("MatMul", f"{prefix}_qk", inputs=[q, k], outputs=[scores]))
    if match.mask is not None:
        masked = gs.Variable(f"{prefix}_masked_scores", dtype=np.float32)
        nodes.append(gs.Node("Add", f"{prefix}_mask_add", inputs=[scores, masks.additive_4d()], outputs=[masked]))
        scores = masked
    probs = gs.Variable(f"{prefix}_probs", dtype=np.float32)
    nodes.append(gs.Node("Softmax", f"{prefix}_softmax", attrs={"axis": -1}, inputs=[scores], outputs=[probs]))
    ctx4 = gs.Variable(f"{prefix}_context_heads", dtype=np.float32)
    ctx_t = gs.Variable(f"{prefix}_context_transposed", dtype=np.float32)
    nodes += [
        gs.Node("MatMul", f"{prefix}_pv", inputs=[probs, v], outputs=[ctx4]),
        gs.Node("Transpose", f"{prefix}_context_transpose", attrs={"perm": [0, 2, 1, 3]}, inputs=[ctx4],
                outputs=[ctx_t]),
    ]
    detach(match.context)  # re-produced under its name by the last Reshape (appended with the block's nodes)
    nodes.append(gs.Node("Reshape", f"{prefix}_context_reshape",
                         inputs=[ctx_t, gs.Constant(f"{prefix}_context_shape", np.array([0, 0, hidden], np.int64))],
                         outputs=[match.context]))
    graph.nodes += nodes


def rewrite_ort(graph: gs.Graph, match: AttentionMatch, index: int, masks: MaskCache,
                mask_format: str = "raw") -> None:
    if not (match.q.x is match.k.x is match.v.x):
        raise NoMatch("ORT Attention needs Q, K and V projected from one input", 0)
    prefix = f"tqc_attn{index}"
    weight, bias = _packed(match, fold_scale=False)
    inputs = [match.q.x, gs.Constant(f"{prefix}_qkv_weight", weight), gs.Constant(f"{prefix}_qkv_bias", bias)]
    if match.mask is not None:
        inputs.append(masks.end_positions() if mask_format == "end" else masks.int32_index())
    attrs = {"num_heads": match.num_heads, "mask_filter_value": MASK_FILL}
    if not math.isclose(match.scale, 1.0 / math.sqrt(match.head_size), rel_tol=1e-6):
        attrs["scale"] = float(match.scale)
    replace_output(graph, match.context, "Attention", prefix, inputs, attrs=attrs, domain="com.microsoft")


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
    match = AttentionMatch(rule=RULES[0], softmax=node, q=lin[0], k=lin[1], v=lin[2], num_heads=heads,
                           head_size=hidden // heads, scale=scale, mask=x if has_mask else None, context=context)
    rewrite_trt(graph, match, index, masks, prefix=f"tqc_xattn{index}")
