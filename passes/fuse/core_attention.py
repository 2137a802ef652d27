"""Attention cores whose Q, K and V arrive already split into heads ([batch, heads, sequence, head size]) from
something the projection rules do not cover -> ONNX Runtime's com.microsoft ``MultiHeadAttention`` (ORT
targets), or one standard form (``rewrite_core_standard``: the scale on the scores, K^T one Transpose, no NaN
guard) that TensorRT and OpenVINO fuse themselves. ModernBERT is the case: its Q and K are rotated (``rotary.py`` makes that one RotaryEmbedding each)
after the packed QKV projection is split, and its layers alternate a global mask and a sliding-window band.

The rules reuse the attention catalogue's steps (``attention.STEPS``) from the Softmax: after it (NaN guard or
not, the context MatMul, the heads merged back), then the mask Add, the scale, the scores MatMul and the K^T
path; ``heads`` checks Q and K are rotated and Q, K and V are [B, H, S, D] with H and D known::

    rotary-eager:        Softmax(Q4 @ Transpose(K4, [0,1,3,2]) * scale + mask) @ V4 -> [B, S, H·D]
    rotary-sdpa-legacy:  Softmax(Q4·√s @ Transpose(K4, [0,1,3,2])·√s + mask), NaN guard
    rotary-sdpa-dynamo:  the same, K^T as Reshape/Transpose[0,2,1]/Reshape

    check (sdpa rules): the mask is finite, or 0 / -inf, which ``nan_guard`` keeps exact (a finite copy, and the
    context times whether its row has any key), else the NaN guard's zeros for fully masked rows would be lost

    after:  MultiHeadAttention(Reshape(Transpose(Q4, [0,2,1,3]), [0, 0, H·D]), K4, V4,
                               attention_bias=mask, num_heads=H, scale=s)           (K, V given as BNSH)

The mask is the graph's own additive mask ([B, 1, S, S]: ModernBERT's global mask, or its band), passed as is:
the exporter builds each once and the layers share it; where an exporter writes one Where per layer over the
same inputs (sdpa), ``fold``'s merge of identical nodes (``fuse`` canonicalizes with it) has made them one
tensor, so each mask is one tensor for all its layers (the tests check it on every export).
Float -> float Casts (the legacy exporter's ``.float()`` on float tensors) are removed before matching.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse import attention
from tqc.passes.fuse.engine import Miss, NoMatch, Rule, Step, StepFunction, Walk, search
from tqc.passes.fuse.masks import MaskCache
from tqc.passes.fuse.nan_guard import build_factors, guard, mask_check
from tqc.passes.fuse.match import heads_from_split, producer, static_dims
from tqc.passes.fuse.rotary import is_rotation
from tqc.passes.fuse.window_mask import canonical_masks
from tqc.passes.rewrite import bypass, produce, replace_output

_FLOAT32 = (np.float32, np.dtype(np.float32))


def _heads(step: Step, w: Walk) -> list[Walk]:
    """Q and K rotated (``rotary.is_rotation``); Q, K, V of rank 4 with H and D known and equal; the context
    [B, S, H·D]; a mask of rank 4."""
    if not (is_rotation(producer(w["q"])) and is_rotation(producer(w["k"]))):
        raise NoMatch("Q and K are not rotated (these rules are for rotary encoders; other layouts are the "
                      "projection rules')")
    dims = [static_dims(w[role]) for role in "qkv"]
    if any(d is None or len(d) != 4 for d in dims):
        raise NoMatch("Q, K and V are not all 4-D [batch, heads, sequence, head size]")
    size = next((d[3] for d in dims if d[3] is not None), None)
    for d, role in zip(dims, "qkv"):
        d[3] = d[3] if d[3] is not None else size  # shape inference may not know H: read it from the split
        d[1] = d[1] if d[1] is not None else heads_from_split(w[role], d[3])
    heads = dims[0][1]
    if heads is None or size is None or any(d[1] != heads or d[3] != size for d in dims[1:]):
        raise NoMatch(f"the heads and head sizes of Q, K and V are not known and equal ({dims})")
    out = static_dims(w["out"])
    if out is None or len(out) != 3 or out[2] not in (None, heads * size):
        raise NoMatch(f"the merged context is not [batch, sequence, {heads * size}]")
    mask = w.get("mask")
    mask_dims = static_dims(mask) if mask is not None else None
    if mask is not None and (mask_dims is None or len(mask_dims) != 4 or mask_dims[1] not in (None, 1) or
                             mask_dims[2] == 1):
        raise NoMatch(f"the mask '{mask.name}' is not [batch, 1, sequence, sequence] ({mask_dims})")
    return [w.bind(heads=heads, head_size=size)]


def _mask_check(w: Walk) -> str | None:
    """A NaN guard zeroes the rows its mask masks entirely; the fused forms have no guard, so a guarded block
    fuses only on a mask ``nan_guard`` can keep exact: finite (dynamo's sdpa), or 0 / -inf (the legacy
    exporter's sdpa under transformers 5.2x), which ``nan_guard.guard`` turns finite with a row factor."""
    return mask_check(w.get("mask"))


STEPS: dict[str, StepFunction] = dict(attention.STEPS, heads=_heads)

_K_T = Step("k_path", ("Transpose",), perm=(0, 1, 3, 2))
_Q_SCALE, _K_SCALE = Step("q_path", attention.SCALE.op), Step("k_path", attention.SCALE.op)
_HEADS = Step("heads")


def _after(nan_guard: bool) -> tuple[Step, ...]:
    return (Step("softmax", ("Softmax",)), Step("nan_guard", ("IsNaN", "Where")) if nan_guard else
            Step("no_nan_guard"), Step("context", ("MatMul",))) + attention.MERGE_HEADS


RULES: tuple[Rule, ...] = (
    Rule("rotary-eager", "eager attention on heads split elsewhere (ModernBERT, rotary Q and K)", ("Softmax",),
         _after(False) + (attention.MASK, attention.SCORE_SCALE, attention.SCORES, _K_T, _HEADS)),
    Rule("rotary-sdpa-legacy", "sdpa through the TorchScript exporter on heads split elsewhere: √scale on Q and "
         "on K^T, NaN guard", ("Softmax",),
         _after(True) + (attention.MASK, attention.SCORES, _Q_SCALE, _K_SCALE, _K_T, _HEADS), _mask_check),
    Rule("rotary-sdpa-dynamo", "sdpa through the dynamo exporter on heads split elsewhere: K^T as "
         "Reshape/Transpose[0,2,1]/Reshape", ("Softmax",),
         _after(True) + (attention.MASK, attention.SCORES, _Q_SCALE, _K_SCALE, Step("k_path", ("Reshape",)),
                         Step("k_path", ("Transpose",), perm=(0, 2, 1)), Step("k_path", ("Reshape",)), _HEADS),
         _mask_check),
)


def drop_float_casts(graph: gs.Graph) -> int:
    """Remove Casts from float32 to float32 (exact: they pass the tensor through)."""
    count = 0
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op == "Cast" and node.attrs.get("to") == 1 and node.inputs[0].dtype in _FLOAT32:
            keep = id(node.outputs[0]) in outputs
            if keep and producer(node.inputs[0]) is None:
                continue  # a graph input cast straight to a graph output: both names must stay
            bypass(node, keep_output_name=keep)
            count += 1
    return count


def rewrite_core_standard(graph: gs.Graph, w: Walk, name: str) -> None:
    """The standard form of a core (targets without contrib ops; what TensorRT's MHA fusion takes):
    Reshape(Transpose(Softmax(MatMul(Q4, Transpose(K4)) * s [+ mask]) @ V4)) under the context's name."""
    def var(tag: str) -> gs.Variable:
        return gs.Variable(f"{name}_{tag}", dtype=np.float32)

    scale = w.get("score_scale", 1.0) * w.get("q_scale", 1.0) * w.get("k_scale", 1.0)
    steps = [("Transpose", [w["k"]], "kt", {"perm": [0, 1, 3, 2]}), ("MatMul", [w["q"], "kt"], "scores", {}),
             ("Mul", ["scores", gs.Constant(f"{name}_scale", np.array(scale, np.float32))], "scaled", {})]
    last = "scaled"
    if w.get("mask") is not None:
        steps.append(("Add", ["scaled", w["mask"]], "masked", {}))
        last = "masked"
    steps += [("Softmax", [last], "probs", {"axis": -1}), ("MatMul", ["probs", w["v"]], "context_heads", {}),
              ("Transpose", ["context_heads"], "context_transposed", {"perm": [0, 2, 1, 3]})]
    made: dict[str, gs.Tensor] = {}
    for op, inputs, tag, attrs in steps:
        made[tag] = var(tag)
        produce(graph, op, f"{name}_{tag}", [made[t] if isinstance(t, str) else t for t in inputs], [made[tag]],
                attrs=attrs)
    hidden = gs.Constant(f"{name}_context_shape", np.array([0, 0, w["heads"] * w["head_size"]], np.int64))
    replace_output(graph, w["out"], "Reshape", f"{name}_context", [made["context_transposed"], hidden])


def fuse_core_attention(graph: gs.Graph, mask_inputs: set[str], earlier: list[Miss], contrib: bool = True,
                        prefix: str = "tqc_mha", masks: MaskCache | None = None,
                        mask_format: str = "raw") -> tuple[list[str], list[Miss]]:
    """Every Softmax left in the graph against ``RULES``; the matches -> MultiHeadAttention (``contrib``), else
    the standard form (``rewrite_core_standard``). Returns (the rule of each match, a miss per Softmax left:
    this catalogue's or the ``earlier`` one's for the same Softmax, whichever got further). With ``masks``, a
    mask proven key padding or a window (``window_mask``) is given to MultiHeadAttention in a form built from
    the attention mask input without Shape ops."""
    if not any(n.op == "Softmax" for n in graph.nodes):
        return [], earlier
    drop_float_casts(graph)
    softmaxes = [n for n in graph.nodes if n.op == "Softmax"]
    found, misses = search(softmaxes, RULES, STEPS,
                           start=lambda node: Walk(node, bound=(("mask_inputs", mask_inputs),)))
    walks, factors = guard(graph, [w for _, w in found])
    canonical = canonical_masks(graph, masks, [w["mask"] for w in walks if w.get("mask") is not None],
                                mask_format) if contrib and masks is not None and walks else {}
    build_factors(graph, factors, canonical, masks.source() if masks is not None else None)
    before = {m.anchor: m for m in earlier}
    misses = [m if m.anchor not in before or m.step > before[m.anchor].step else before[m.anchor] for m in misses]
    for index, w in enumerate(walks):
        name, hidden = f"{prefix}{index}", w["heads"] * w["head_size"]
        if not contrib:
            rewrite_core_standard(graph, w, f"tqc_core{index}")
            continue
        transposed, query = (gs.Variable(f"{name}_{t}", dtype=np.float32) for t in ("q_transposed", "query"))
        produce(graph, "Transpose", f"{name}_q_transpose", [w["q"]], [transposed], attrs={"perm": [0, 2, 1, 3]})
        produce(graph, "Reshape", f"{name}_q_reshape",
                [transposed, gs.Constant(f"{name}_q_shape", np.array([0, 0, hidden], np.int64))], [query])
        mask = w.get("mask")
        kind, rebuilt = canonical.get(mask.name, ("bias", mask)) if mask is not None else (None, None)
        inputs = [query, w["k"], w["v"]] + ([gs.Variable.empty(), rebuilt] if kind == "key_padding" else
                                            [gs.Variable.empty(), gs.Variable.empty(), rebuilt] if kind else [])
        scale = w.get("score_scale", 1.0) * w.get("q_scale", 1.0) * w.get("k_scale", 1.0)
        attrs = {"num_heads": w["heads"]}
        if not math.isclose(scale, 1.0 / math.sqrt(w["head_size"]), rel_tol=1e-6):
            attrs["scale"] = float(scale)
        replace_output(graph, w["out"], "MultiHeadAttention", name, inputs, attrs=attrs, domain="com.microsoft")
    return [rule.name for rule, _ in found], misses

