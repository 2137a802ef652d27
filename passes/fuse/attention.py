"""Attention fusion: each attention block found by its Softmax, one rule per exporter variant (``engine``).

Each rule walks from the Softmax: after it (an optional NaN guard, the context MatMul, the heads merged back),
then before it, backwards (the mask Add, the scale, the scores MatMul, the Q, K and V paths down to their
projections ``x @ W + b``)::

    scores = MatMul(Q', K')  [* scale]  [+ mask]  -> Softmax -> [Where(IsNaN)]  -> MatMul(., V') -> out
    Q' = <q_path>(x @ Wq + bq)      K' = <k_path>(x @ Wk + bk)     V' = <v_path>(x @ Wv + bv)
    out = <merge_heads>(context)    (ends in the [batch, sequence, hidden] tensor the output dense reads)

A path step names an op and, for Transpose, its perm; a ``Mul/Div`` path step is a scale by a scalar constant
(either operand order) or by a scalar the graph computes from static dimensions (``1/sqrt(sqrt(Shape(Q)[-1]))``,
evaluated by ``match.evaluate_static``). The rule's check reads the number of heads and compares the widths.
All families of transformers 5 (BERT, RoBERTa, MiniLM, DistilBERT, ALBERT, ELECTRA, XLM-R, CamemBERT) share
these layouts; the exporter and attention implementation choose the rule. Two rules take an additive bias
computed elsewhere in the graph, which stays as it is and feeds the fused op: ``eager-bias`` (MPNet's relative
position bias: ``+ bias`` before the mask) and ``disentangled`` (DeBERTa-v2/v3: heads flattened to [B*H, S, D]
for bmm, the c2p + p2c scores as the bias, the mask a masked_fill). ``attention_rewrite`` writes the
match for the target; ``masks`` builds the mask forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from tqc.passes.fuse.attention_rewrite import AttentionBlock
from tqc.passes.fuse.engine import Miss, NoMatch, Rule, Step, StepFunction, Walk, operand_orders, search
from tqc.passes.fuse.masks import mask_fill_step, mask_step
from tqc.passes.fuse.match import (ancestors_reach, consumers, describe, heads_from_reshape, linear, producer,
                                   split_scalar_operand, static_dims)


def _role_steps(role: str, *steps: Step) -> tuple[Step, ...]:
    """The path steps of Q, K or V (kind ``q_path`` ...), from role-free templates."""
    return tuple(Step(f"{role}_path", s.op, perm=s.perm, optional=s.optional) for s in steps)


SCALE = Step("", ("Mul", "Div"))
FLAT = Step("", ("Reshape",))  # heads flattened into the batch, [B*H, S, D], for a bmm (DeBERTa)
SPLIT_HEADS = (Step("", ("Transpose",), perm=(0, 2, 1, 3)), Step("", ("Reshape",)))
SPLIT_HEADS_KT = (Step("", ("Transpose",), perm=(0, 2, 3, 1)), Step("", ("Reshape",)))
MERGE_HEADS = (Step("merge_heads", ("Reshape",), optional=True), Step("merge_heads", ("Transpose",), perm=(0, 2, 1, 3)),
               Step("merge_heads", ("Reshape",)))
PROJECTIONS = (Step("q_projection", ("MatMul",)), Step("k_projection", ("MatMul",)), Step("v_projection", ("MatMul",)))
MASK = Step("mask", ("Add",), optional=True)
BIAS = Step("bias", ("Add",), commutative=True)
SCORE_SCALE = Step("score_scale", ("Mul", "Div"))
SCORES = Step("scores", ("MatMul",))


def _block(w: Walk) -> AttentionBlock | str:
    """What the rewrites need, from a complete walk; or why the walk is no attention block."""
    q, k, v = w["q_linear"], w["k_linear"], w["v_linear"]
    hidden = q.weight.shape[1]
    if k.weight.shape[1] != hidden or v.weight.shape[1] != hidden:
        return "projections: Q, K and V widths differ"
    reshape = w.get("q_reshape")
    heads = heads_from_reshape(reshape, hidden) if reshape is not None else None
    if heads is None or hidden % heads:
        return f"cannot read the number of heads from '{reshape.name if reshape is not None else '?'}'"
    bias, flat = w.get("bias"), w.get("bias_flat", False)
    dims = static_dims(bias) if bias is not None else None
    rank = 3 if flat else 4
    if bias is not None and (dims is None or len(dims) != rank or (not flat and dims[1] not in (None, heads))):
        shape = "[batch x heads, S, S]" if flat else f"[batch or 1, {heads} heads, S, S]"
        return f"the bias '{bias.name}' is not proven {shape} (dimensions {dims})"
    fill = w.get("mask_fill")
    fill_dims = static_dims(fill[0]) if fill is not None else None
    if fill_dims is not None and (len(fill_dims) != 4 or fill_dims[1] != 1):
        return f"the masked_fill condition '{fill[0].name}' is not [batch, 1, S, S] (dimensions {fill_dims})"
    scale = w.get("score_scale", 1.0) * w.get("q_scale", 1.0) * w.get("k_scale", 1.0)
    return AttentionBlock(q=q, k=k, v=v, num_heads=heads, head_size=hidden // heads, scale=scale,
                          mask=w.get("mask"), context=w["out"], bias=bias, bias_flat=flat,
                          mask_fill=w.get("mask_fill"))


def _check(w: Walk) -> str | None:
    block = _block(w)
    return block if isinstance(block, str) else None


def _rule(name: str, description: str, before: tuple[Step, ...], q_path: tuple[Step, ...],
          k_path: tuple[Step, ...], nan_guard: bool, flat: bool = False) -> Rule:
    """Steps after the Softmax, ``before`` it, the Q/K/V paths, the projections; ``flat``: the probabilities
    and V flattened to [B*H, S, *] for a bmm."""
    after = (Step("softmax", ("Softmax",)), Step("nan_guard", ("IsNaN", "Where")) if nan_guard else
             Step("no_nan_guard")) + ((Step("flat_probs", ("Reshape",)),) if flat else ()) + \
        (Step("context", ("MatMul",)),) + MERGE_HEADS
    v_path = ((FLAT,) if flat else ()) + SPLIT_HEADS
    paths = _role_steps("q", *q_path) + _role_steps("k", *k_path) + _role_steps("v", *v_path)
    steps = after + before + paths + PROJECTIONS
    return Rule(name, description, ("Softmax",), steps, _check)


RULES: tuple[Rule, ...] = (
    _rule("eager", "transformers eager attention, legacy or dynamo exporter: (Q @ K^T) * scale + mask",
          (MASK, SCORE_SCALE, SCORES), SPLIT_HEADS, SPLIT_HEADS_KT, nan_guard=False),
    _rule("sdpa-legacy", "torch sdpa through the TorchScript exporter: sqrt(scale) on Q and on K^T, NaN guard",
          (MASK, SCORES), (SCALE,) + SPLIT_HEADS, (SCALE,) + SPLIT_HEADS_KT, nan_guard=True),
    _rule("sdpa-dynamo", "torch sdpa through the dynamo exporter: K^T built as Reshape/Transpose[0,2,1]/Reshape",
          (MASK, SCORES), (SCALE,) + SPLIT_HEADS,
          (SCALE, Step("", ("Reshape",)), Step("", ("Transpose",), perm=(0, 2, 1)), Step("", ("Reshape",))) +
          SPLIT_HEADS, nan_guard=True),
    _rule("sdpa-legacy-4x", "transformers < 4.58 sdpa through the TorchScript exporter (Optimum, sentence-"
          "transformers' ONNX backend): sqrt(scale) computed from Shape(Q)[-1] on Q and on K^T, no NaN guard",
          (MASK, SCORES), (SCALE,) + SPLIT_HEADS, (SCALE,) + SPLIT_HEADS_KT, nan_guard=False),
    _rule("eager-bias", "eager attention with an additive bias computed elsewhere in the graph (MPNet's relative "
          "position bias): (Q @ K^T) * scale + bias + mask", (MASK, BIAS, SCORE_SCALE, SCORES), SPLIT_HEADS,
          SPLIT_HEADS_KT, nan_guard=False),
    _rule("disentangled", "DeBERTa-v2/v3: heads flattened to [B*H, S, D] for bmm, K^T scaled, the c2p + p2c bias "
          "added to the scores, the mask applied by masked_fill (Where)",
          (Step("mask_fill", ("Where",)), Step("scores_4d", ("Reshape",)), BIAS, SCORES), (FLAT,) + SPLIT_HEADS,
          (SCALE, Step("", ("Transpose",), perm=(0, 2, 1)), FLAT) + SPLIT_HEADS, nan_guard=False, flat=True),
    _rule("k-transposed-late", "transformers 4.x eager: K split as [B,H,S,D], then K.transpose(-1, -2) before "
          "the scores", (MASK, SCORE_SCALE, SCORES), SPLIT_HEADS,
          (Step("", ("Transpose",), perm=(0, 1, 3, 2)),) + SPLIT_HEADS, nan_guard=False),
)


def _found(nodes: list[gs.Node]) -> str:
    return ", ".join(describe(n) for n in nodes) or "nothing"


def _softmax(step: Step, w: Walk) -> list[Walk]:
    axis = w.anchor.attrs.get("axis", -1)
    if axis not in (-1, 3):
        raise NoMatch(f"Softmax axis {axis} is not the last axis")
    return [w.bind(tensor=w.anchor.inputs[0], probs=w.anchor.outputs[0], nodes=[w.anchor])]


def _nan_guard(step: Step, w: Walk) -> list[Walk]:
    probs = w["probs"]
    users = consumers(probs)
    isnan = next((u for u in users if u.op == "IsNaN"), None)
    where = next((u for u in users if u.op == "Where"), None)
    if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs:
        raise NoMatch(f"expected the NaN guard Where(IsNaN(p), 0, p), found {_found(users)}")
    return [w.bind(probs=where.outputs[0], nodes=[isnan, where])]


def _no_nan_guard(step: Step, w: Walk) -> list[Walk]:
    if any(u.op == "IsNaN" for u in consumers(w["probs"])):
        raise NoMatch("a NaN guard after the Softmax, which this rule does not expect")
    return [w]


def _flat_probs(step: Step, w: Walk) -> list[Walk]:
    """Forwards: the probabilities reshaped to [B*H, S, S] for the context bmm."""
    nexts = [n for n in consumers(w["probs"]) if n.op != "Shape"]
    if len(nexts) != 1 or nexts[0].op not in step.op:
        raise NoMatch(f"expected one Reshape of the probabilities, found {_found(nexts)}")
    return [w.bind(probs=nexts[0].outputs[0], nodes=nexts)]


def _context(step: Step, w: Walk) -> list[Walk]:
    probs = w["probs"]
    users = consumers(probs)
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not probs:
        raise NoMatch(f"expected one MatMul(probs, V), found {_found(users)}")
    return [w.bind(v=users[0].inputs[1], out=users[0].outputs[0], nodes=[users[0]])]


def _merge_heads(step: Step, w: Walk) -> list[Walk]:
    """Forwards from the context MatMul: the heads merged back into [batch, sequence, hidden]."""
    nexts = [n for n in consumers(w["out"]) if n.op != "Shape"]  # shape reads die with the old block
    node = nexts[0] if len(nexts) == 1 else None
    if node is None or node.op not in step.op or (step.perm is not None and
                                                  tuple(node.attrs.get("perm", ())) != step.perm):
        if step.optional:
            return [w]
        raise NoMatch(f"expected {'/'.join(step.op)}, found {_found(nexts)}")
    return [w.bind(out=node.outputs[0], nodes=[node])]


def _scores_4d(step: Step, w: Walk) -> list[Walk]:
    """Backwards: the [B*H, S, S] scores reshaped to [B, H, S, S] (the bias is flat too: ``bias_flat``)."""
    node = producer(w.tensor)
    if node is None or node.op not in step.op:
        raise NoMatch(f"expected the Reshape of the scores to [B, H, S, S], found {describe(node)}")
    return [w.bind(tensor=node.inputs[0], bias_flat=True, nodes=[node])]


def _bias(step: Step, w: Walk) -> list[Walk]:
    """Add(scores, bias): each operand order whose bias does not come from the attention mask input (MPNet's
    relative position bias); the later steps decide which operand is the scores."""
    node = producer(w.tensor)
    if node is None or node.op not in step.op:
        raise NoMatch(f"expected the bias Add before Softmax, found {describe(node)}")
    fits = [w.bind(tensor=scores, bias=bias, nodes=[node]) for scores, bias in operand_orders(node, step)
            if not ancestors_reach(bias, w["mask_inputs"])]
    if not fits:
        raise NoMatch(f"both operands of {describe(node)} derive from the attention mask input")
    return fits


def _score_scale(step: Step, w: Walk) -> list[Walk]:
    node = producer(w.tensor)
    parts = split_scalar_operand(node) if node is not None and node.op in step.op else None
    if parts is None:
        raise NoMatch(f"expected Mul/Div by a scalar (the softmax scale), found {describe(node)}")
    return [w.bind(tensor=parts[0], score_scale=parts[1], nodes=[node])]


def _scores(step: Step, w: Walk) -> list[Walk]:
    qk = producer(w.tensor)
    if qk is None or qk.op != "MatMul":
        raise NoMatch(f"expected MatMul(Q, K^T), found {describe(qk)}")
    return [w.bind(q=qk.inputs[0], k=qk.inputs[1], nodes=[qk])]


def _path(step: Step, w: Walk) -> list[Walk]:
    """One op of the Q, K or V path (the role is the kind's first letter), walking back to the projection."""
    role = step.kind[0]
    node = producer(w[role])
    if step.op == SCALE.op:
        parts = split_scalar_operand(node) if node is not None and node.op in step.op else None
        if parts is None:
            if step.optional:
                return [w]
            raise NoMatch(f"expected Mul/Div by a scalar constant, found {describe(node)}")
        return [w.bind(nodes=[node], **{role: parts[0], f"{role}_scale": w.get(f"{role}_scale", 1.0) * parts[1]})]
    if node is None or node.op not in step.op:
        if step.optional:
            return [w]
        raise NoMatch(f"expected {'/'.join(step.op)}, found {describe(node)}")
    if step.perm is not None and tuple(node.attrs.get("perm", ())) != step.perm:
        if step.optional:
            return [w]
        raise NoMatch(f"Transpose '{node.name}' has perm {list(node.attrs.get('perm', []))}")
    reshape = {f"{role}_reshape": node} if node.op == "Reshape" else {}
    return [w.bind(nodes=[node], **{role: node.inputs[0]}, **reshape)]


def _projection(step: Step, w: Walk) -> list[Walk]:
    role = step.kind[0]
    found = linear(w[role], f"{role.upper()} projection")
    if isinstance(found, str):
        raise NoMatch(found)
    return [w.bind(nodes=[found.matmul], **{f"{role}_linear": found})]


STEPS: dict[str, StepFunction] = {
    "softmax": _softmax, "nan_guard": _nan_guard, "no_nan_guard": _no_nan_guard, "context": _context,
    "flat_probs": _flat_probs, "merge_heads": _merge_heads, "mask": mask_step, "mask_fill": mask_fill_step,
    "scores_4d": _scores_4d, "bias": _bias, "score_scale": _score_scale, "scores": _scores,
    "q_path": _path, "k_path": _path, "v_path": _path,
    "q_projection": _projection, "k_projection": _projection, "v_projection": _projection,
}


@dataclass
class AttentionMatch:
    """A Softmax some rule matched: the rule, and the block the rewrites take."""

    rule: Rule
    softmax: gs.Node
    block: AttentionBlock


def find_attention(graph: gs.Graph, mask_inputs: set[str]) -> tuple[list[AttentionMatch], list[Miss]]:
    """Every Softmax against every rule: the matches, and a ``Miss`` (closest rule, why) for each other one."""
    softmaxes = [n for n in graph.nodes if n.op == "Softmax"]
    found, misses = search(softmaxes, RULES, STEPS,
                           start=lambda node: Walk(node, bound=(("mask_inputs", mask_inputs),)))
    return [AttentionMatch(rule, w.anchor, _block(w)) for rule, w in found], misses
