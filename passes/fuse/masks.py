"""The attention mask: which graph inputs are the mask, the attention rules' steps that recognize it before a
Softmax (an additive mask, a masked_fill), and the forms the fused attentions take, each built once for the
whole graph (``MaskCache``)::

    additive_4d     Unsqueeze((1 - float(attention_mask)) * -10000, [1, 2])      [B, 1, 1, S]   standard targets
    int32_index     int32(attention_mask)                                        [B, S]         ORT, any padding
    end_positions   ReduceSum(int32(attention_mask), 1)                          [B]            ORT, right padding
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.core.target import input_role_by_name
from tqc.passes.fuse.engine import NoMatch, Step, Walk
from tqc.passes.fuse.match import ancestors_reach, consumers, describe, producer, scalar_value
from tqc.passes.rewrite import produce

MASK_FILL = -10000.0


def _indexes_a_gather(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` (through Casts) is the index of a Gather: token ids, token types, positions."""
    for user in consumers(tensor):
        if user.op == "Gather" and len(user.inputs) > 1 and user.inputs[1] is tensor:
            return True
        if user.op == "Cast" and _indexes_a_gather(user.outputs[0]):
            return True
    return False


def mask_input_names(graph: gs.Graph) -> set[str]:
    """The attention-mask inputs: those whose name says so (``core.target.input_role_by_name``); else, by role,
    the 2-D integer or boolean inputs that index no embedding Gather (a user's ``ids, attn`` signature)."""
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
            graph, mask = self.graph, self.source()
            as_float = gs.Variable("tqc_mask_float", dtype=np.float32)
            inverted = gs.Variable("tqc_mask_inverted", dtype=np.float32)
            additive = gs.Variable("tqc_mask_additive", dtype=np.float32)
            mask4d = gs.Variable("tqc_attention_mask_4d", dtype=np.float32)
            produce(graph, "Cast", "tqc_mask_cast", [mask], [as_float], attrs={"to": 1})
            produce(graph, "Sub", "tqc_mask_invert", [gs.Constant("tqc_one", np.array(1.0, np.float32)), as_float],
                    [inverted])
            produce(graph, "Mul", "tqc_mask_fill",
                    [inverted, gs.Constant("tqc_mask_fill_value", np.array(MASK_FILL, np.float32))], [additive])
            produce(graph, "Unsqueeze", "tqc_mask_unsqueeze",
                    [additive, gs.Constant("tqc_mask_axes", np.array([1, 2], np.int64))], [mask4d])
            self.built["additive"] = mask4d
        return self.built["additive"]

    def int32_index(self) -> gs.Variable:
        """[batch, sequence] int32 1/0 mask: any padding pattern."""
        if not self._reuse("index", "tqc_mask_index"):
            mask = self.source()
            index = gs.Variable("tqc_mask_index", dtype=np.int32)
            produce(self.graph, "Cast", "tqc_mask_index_cast", [mask], [index], attrs={"to": 6})
            self.built["index"] = index
        return self.built["index"]

    def end_positions(self) -> gs.Variable:
        """[batch] int32 count of kept tokens: right padding only, and what ORT's fused CUDA kernels take."""
        if not self._reuse("end", "tqc_mask_end_positions"):
            index = self.int32_index()
            ends = gs.Variable("tqc_mask_end_positions", dtype=np.int32)
            produce(self.graph, "ReduceSum", "tqc_mask_reduce",
                    [index, gs.Constant("tqc_mask_reduce_axes", np.array([1], np.int64))], [ends],
                    attrs={"keepdims": 0})
            self.built["end"] = ends
        return self.built["end"]


def mask_step(step: Step, w: Walk) -> list[Walk]:
    """An Add before the Softmax: one operand derived from the attention mask input, the other the scores."""
    node = producer(w.tensor)
    if node is None or node.op != "Add":
        if step.optional:
            return [w]
        raise NoMatch(f"expected the mask Add before Softmax, found {describe(node)}")
    mask_inputs = w["mask_inputs"]
    a, b = node.inputs
    a_from_mask, b_from_mask = ancestors_reach(a, mask_inputs), ancestors_reach(b, mask_inputs)
    if a_from_mask == b_from_mask:
        if step.optional and not a_from_mask:
            return [w]  # no mask here; the Add may be what a later step takes (a bias)
        raise NoMatch(f"Add '{node.name}' before Softmax has {'both' if a_from_mask else 'no'} operands derived "
                      f"from the attention mask input ({', '.join(sorted(mask_inputs)) or 'none found'})")
    scores, mask = (a, b) if b_from_mask else (b, a)
    return [w.bind(tensor=scores, mask=mask, nodes=[node])]


def mask_fill_step(step: Step, w: Walk) -> list[Walk]:
    """masked_fill before the Softmax: Where(condition, fill, scores) or Where(condition, scores, fill), the
    condition derived from the attention mask input, the fill a constant of at most -10000."""
    node = producer(w.tensor)
    if node is None or node.op not in step.op:
        raise NoMatch(f"expected the masked_fill Where before Softmax, found {describe(node)}")
    condition, first, second = node.inputs
    if not ancestors_reach(condition, w["mask_inputs"]):
        raise NoMatch(f"the condition of {describe(node)} does not derive from the attention mask input")
    for fill, scores, fill_when_true in ((first, second, True), (second, first, False)):
        value = scalar_value(fill)
        if value is not None and value <= MASK_FILL:
            return [w.bind(tensor=scores, mask_fill=(condition, value, fill_when_true), nodes=[node])]
    raise NoMatch(f"neither branch of {describe(node)} is a constant fill of at most {MASK_FILL:g}")
