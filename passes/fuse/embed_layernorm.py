"""EmbedLayerNormalization fusion (ONNX Runtime targets), only where each Gather's meaning is proven.

Before (BERT; RoBERTa computes its position ids from the padding; an export without a token-type input
gathers a constant row of zeros)::

    word[input_ids] ─┐
    type[ttype] ─────┼─► Add ─► Add ─► LayerNorm ─► x
    pos[positions] ──┘

After::

    EmbedLayerNormalization(input_ids, segment_ids, word, pos', segment, γ, β, [mask], [position_ids]) ─► x

The op computes ``word[input_ids] + pos[position_ids] + segment[segment_ids]``, where position ids default to
0..S-1. Each Gather is given the slot its index proves:

* **word**: the Gather indexed by a graph input (through Casts) with the largest table; that input is the op's
  ``input_ids`` (it sets batch and sequence). A second graph-input-indexed Gather is the segment (token type).
* **constant row**: an index whose every element provably equals one value ``c`` (a Slice/Expand/Gather of a
  constant buffer of equal values, ConstantOfShape; the buffered ``token_type_ids`` of an export without a
  token-type input) or a table of one row: ``table[c]`` is added into every row of the position table
  (``pos' = pos + table[c]``), which is exact up to float reassociation.
* **position**: the remaining Gather (when two remain, the one proven 0..S-1; the other, any ``[B, S]`` ids,
  takes the segment slot). An index proven to be 0..S-1 (Slice of an arange buffer from 0, step 1,
  up to the sequence length of ``input_ids``; Range(0, S, 1)) uses the op's default; any other index (RoBERTa's
  positions from the padding) goes to the op's ``position_ids`` input, which the op reads as given.

Anything else (two computed indices, an index of unknown rank, no position Gather) is left unfused, with the
reason shown by ``--explain fuse``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.layernorm import LayerNormMatch, layernorm_matches
from tqc.passes.fuse.match import through_identity, constant_values, consumers, producer
from tqc.passes.rewrite import detach, produce

# Ops whose output elements are all elements of their first input (selection, replication, reshaping).
_ELEMENT_PRESERVING = ("Expand", "Slice", "Gather", "GatherElements", "GatherND", "Reshape", "Unsqueeze", "Squeeze",
                       "Tile", "Flatten", "Transpose", "Identity", "Cast")


def _gather_leaves(tensor: gs.Tensor, leaves: list, nodes: list, readers: int = 1) -> bool:
    """Flatten an Add tree of embedding Gathers (at most 3 leaves); ``readers``: consumers the root may have."""
    node = producer(tensor)
    if node is None:
        return False
    if node.op == "Add" and len(consumers(tensor)) == readers:
        nodes.append(node)
        return all(_gather_leaves(t, leaves, nodes) for t in node.inputs) and len(leaves) <= 3
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and \
            isinstance(through_identity(node.inputs[0]), gs.Constant):
        leaves.append(node)
        nodes.append(node)
        return True
    return False


def _graph_input_behind(tensor: gs.Tensor, inputs: dict[str, gs.Tensor]) -> gs.Tensor | None:
    """The integer graph input ``tensor`` is (through Casts), else None."""
    for _ in range(4):
        if tensor.name in inputs and inputs[tensor.name] is tensor:
            return tensor
        node = producer(tensor)
        if node is None or node.op != "Cast":
            return None
        tensor = node.inputs[0]
    return None


def constant_index_value(tensor: gs.Tensor) -> int | None:
    """When every element of an integer index provably equals one constant: that value, else None.

    Proof: walking back through ops that only select, replicate or reshape their first input, a constant whose
    elements are all equal (or ConstantOfShape) is reached.
    """
    for _ in range(16):
        values = constant_values(tensor)
        if values is not None:
            flat = values.reshape(-1)
            if flat.size == 0 or not np.all(flat == flat[0]) or float(flat[0]) != int(flat[0]):
                return None
            return int(flat[0])
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            flat = np.asarray(value.values if value is not None else [0.0]).reshape(-1)
            return int(flat[0]) if flat.size == 1 and float(flat[0]) == int(flat[0]) else None
        if node.op not in _ELEMENT_PRESERVING:
            return None
        tensor = node.inputs[0]
    return None


def _scalar_int(tensor: gs.Tensor) -> int | None:
    values = constant_values(tensor)
    if values is None or values.size != 1:
        return None
    return int(values.reshape(-1)[0])


def _leads_with_ids_dims(tensor: gs.Tensor, ids: gs.Tensor) -> bool:
    """``tensor`` is ``ids``, or a Gather of rows by ``ids`` (the word embeddings [B, S, H]: ids' dimensions first)."""
    node = producer(tensor)
    return tensor is ids or (node is not None and node.op == "Gather" and node.attrs.get("axis", 0) == 0 and
                             node.inputs[1] is ids)


def _is_sequence_length(tensor: gs.Tensor, ids: gs.Tensor) -> bool:
    """``tensor`` holds dimension 1 of ``ids`` (Shape(ids)[1], or Shape of the word embeddings gathered by ids,
    through Unsqueeze/Squeeze/Cast/Concat of one)."""
    static = ids.shape[1] if ids.shape is not None and len(ids.shape) == 2 else None
    for _ in range(8):
        value = _scalar_int(tensor)
        if value is not None:
            return isinstance(static, int) and value == static
        node = producer(tensor)
        if node is None:
            return False
        if node.op in ("Unsqueeze", "Squeeze", "Cast", "Reshape") or (node.op == "Concat" and len(node.inputs) == 1):
            tensor = node.inputs[0]
        elif node.op == "Add" and 0 in (_scalar_int(node.inputs[0]), _scalar_int(node.inputs[1])):  # + past length 0
            tensor = node.inputs[1] if _scalar_int(node.inputs[0]) == 0 else node.inputs[0]
        elif node.op == "Shape":
            start, end = node.attrs.get("start", 0), node.attrs.get("end")
            return _leads_with_ids_dims(node.inputs[0], ids) and start == 1 and end == 2
        elif node.op == "Gather" and producer(node.inputs[0]) is not None and producer(node.inputs[0]).op == "Shape":
            shape = producer(node.inputs[0])
            return _leads_with_ids_dims(shape.inputs[0], ids) and not shape.attrs.get("start", 0) and \
                _scalar_int(node.inputs[1]) == 1
        else:
            return False
    return False


def is_arange_positions(index: gs.Tensor, ids: gs.Tensor) -> bool:
    """index holds 0..S-1 along its last axis (S = ids' sequence length), broadcast over the batch."""
    node = producer(index)
    while node is not None and node.op in ("Expand", "Unsqueeze", "Cast"):
        if node.op == "Unsqueeze":
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1:
                axes = constant_values(node.inputs[1])
            if axes is None or list(np.asarray(axes).reshape(-1)) != [0]:
                return False
        node = producer(node.inputs[0])
    if node is None:
        return False
    if node.op == "Range":
        return _scalar_int(node.inputs[0]) == 0 and _scalar_int(node.inputs[2]) == 1 and \
            _is_sequence_length(node.inputs[1], ids)
    if node.op != "Slice" or len(node.inputs) < 4:
        return False
    buffer = constant_values(node.inputs[0])
    if buffer is None or buffer.ndim not in (1, 2) or (buffer.ndim == 2 and buffer.shape[0] != 1):
        return False
    if not np.array_equal(buffer.reshape(-1), np.arange(buffer.size)):
        return False
    axes = constant_values(node.inputs[3])
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (buffer.ndim - 1, -1):
        return False
    if _scalar_int(node.inputs[1]) != 0:
        return False
    if len(node.inputs) > 4 and _scalar_int(node.inputs[4]) != 1:
        return False
    return _is_sequence_length(node.inputs[2], ids)


@dataclass
class EmbeddingPlan:
    word: gs.Node
    ids: gs.Tensor                     # the op's input_ids (the word Gather's graph input)
    segment: gs.Node | None
    segment_ids: gs.Tensor | None
    position: gs.Node
    position_ids: gs.Tensor | None     # None: the op's default 0..S-1
    constant_rows: list[np.ndarray]    # added into the position table


def plan_embedding(leaves: list[gs.Node], inputs: dict[str, gs.Tensor]) -> EmbeddingPlan | str:
    """Give each Gather its slot in the op, or say why that cannot be proven."""
    by_input, others, rows = [], [], []
    for leaf in leaves:
        table = constant_values(leaf.inputs[0])
        graph_input = _graph_input_behind(leaf.inputs[1], inputs)
        if graph_input is not None:
            by_input.append((leaf, graph_input, table.shape[0]))
            continue
        value = constant_index_value(leaf.inputs[1])
        if table.shape[0] == 1:
            value = 0 if value is None else value  # a one-row table: every valid index reads row 0
        if value is not None:
            if not -table.shape[0] <= value < table.shape[0]:
                return f"embedding Gather '{leaf.name}' reads constant row {value} of a {table.shape[0]}-row table"
            rows.append(table[value].astype(np.float32))
            continue
        others.append(leaf)
    if not by_input:
        return "no embedding Gather is indexed by a graph input (token ids)"
    by_input.sort(key=lambda item: -item[2])
    if len(by_input) > 2:
        return "more than two embedding Gathers are indexed by graph inputs"
    word, ids, _ = by_input[0]
    segment, segment_ids = (by_input[1][0], by_input[1][1]) if len(by_input) == 2 else (None, None)
    if len(others) == 2 and segment is None:
        # One proven 0..S-1 is the position; the other, any [B, S] ids, is exact in the segment slot.
        proven = [o for o in others if is_arange_positions(o.inputs[1], ids)]
        other = [o for o in others if o not in proven]
        if len(proven) == 1 and other[0].inputs[1].shape is not None and len(other[0].inputs[1].shape) == 2:
            segment, segment_ids, others = other[0], other[0].inputs[1], proven
    if len(others) > 1:
        return (f"embedding Gathers {', '.join(repr(o.name) for o in others)} are all indexed by computed ids and "
                "none or several are proven to be positions 0..S-1; kept as is")
    if not others:
        if segment is None:
            return "no position embedding Gather next to the word embedding"
        # ids and a second graph input (user-fed position or token-type ids): the segment slot is exact for both
        others, segment, segment_ids = [segment], None, None
        index = by_input[1][1]
    else:
        index = others[0].inputs[1]
    position = others[0]
    if _graph_input_behind(index, inputs) is None and is_arange_positions(index, ids):
        return EmbeddingPlan(word, ids, segment, segment_ids, position, None, rows)
    rank = len(index.shape) if index.shape is not None else None
    if rank not in (1, 2):
        return (f"position Gather '{position.name}' has ids of unknown rank (not proven 0..S-1); the op's "
                "position_ids input needs [B, S] or [1, S]")
    return EmbeddingPlan(word, ids, segment, segment_ids, position, index, rows)


def _beta(match: LayerNormMatch) -> gs.Tensor:
    """The LayerNorm's β, or zeros for one without bias (the op's β is not optional)."""
    if match.beta is not None:
        return through_identity(match.beta)
    zeros = np.zeros(constant_values(match.gamma).shape, np.float32)
    return gs.Constant(f"{match.last.name}_tqc_zero_beta", zeros)


def fuse_embed_layernorm(graph: gs.Graph, mask: gs.Tensor | None) -> tuple[int, gs.Tensor | None, str | None]:
    """LayerNorm(word[ids] + type[...] + pos[...]) -> EmbedLayerNormalization, each Gather in its proven slot.

    Returns (count, the op's int32 mask_index output when a mask was given, reason when not fused).
    """
    inputs = {t.name: t for t in graph.inputs}
    reason = "no LayerNorm over word + position embedding Gathers"
    for match in layernorm_matches(graph):
        ln = match.last
        leaves, nodes = [], []
        if not _gather_leaves(match.x, leaves, nodes, match.own_consumers_of_x) or len(leaves) < 2:
            continue
        if constant_values(match.gamma) is None or (match.beta is not None and constant_values(match.beta) is None):
            reason = f"embedding LayerNorm '{ln.name}' has non-constant scale or bias"
            continue
        plan = plan_embedding(leaves, inputs)
        if isinstance(plan, str):
            reason = plan
            continue
        position_table = through_identity(plan.position.inputs[0])
        if plan.constant_rows:
            folded = constant_values(position_table).astype(np.float32) + sum(plan.constant_rows)
            position_table = gs.Constant(f"{position_table.name}_tqc_with_constant_rows", folded.astype(np.float32))
        out = detach(ln.outputs[0])  # re-produced, same name, by the EmbedLayerNormalization below
        empty = gs.Variable.empty()

        def int32(t: gs.Tensor) -> gs.Tensor:  # the op takes int32 ids and masks
            if t.dtype == np.int32:
                return t
            cast = gs.Variable(f"{t.name}_int32", dtype=np.int32)
            produce(graph, "Cast", f"tqc_{t.name}_to_int32", [t], [cast], attrs={"to": 6})
            return cast

        position_ids = plan.position_ids
        if position_ids is not None and position_ids.shape is not None and len(position_ids.shape) == 1:
            unsqueezed = gs.Variable(f"{position_ids.name}_tqc_2d", dtype=position_ids.dtype)
            produce(graph, "Unsqueeze", f"tqc_{position_ids.name}_unsqueeze",
                    [position_ids, gs.Constant(f"tqc_{position_ids.name}_axes", np.array([0], np.int64))],
                    [unsqueezed])
            position_ids = unsqueezed
        op_inputs = [int32(plan.ids), int32(plan.segment_ids) if plan.segment else empty,
                     through_identity(plan.word.inputs[0]), position_table,
                     through_identity(plan.segment.inputs[0]) if plan.segment else empty,
                     through_identity(match.gamma), _beta(match)]
        mask_index = gs.Variable("tqc_embed_mask_index", dtype=np.int32)  # ORT's schema needs this output
        if mask is not None or position_ids is not None:
            op_inputs.append(int32(mask) if mask is not None else gs.Variable.empty())
        if position_ids is not None:
            op_inputs.append(int32(position_ids))
        produce(graph, "EmbedLayerNormalization", "tqc_embed_layernorm", op_inputs, [out, mask_index],
                attrs={"epsilon": match.epsilon}, domain="com.microsoft")
        return 1, (mask_index if mask is not None else None), None
    return 0, None, reason
