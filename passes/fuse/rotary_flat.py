"""Rotary attention on [B, S, hidden] rather than on 4-D heads (ORT targets, after ``rotary`` and
``core_attention``): ONNX Runtime's ``RotaryEmbedding`` takes the 3-D form with ``num_heads``, and
``MultiHeadAttention`` takes 3-D query, key and value, so the head split and merge around them go::

    before  M [B, S, 3·H·D] ─► Reshape [0, 0, 3, H, D] ─► Split(axis -3) ─► Squeeze ×3 ─► Transpose ×3 ─┐
              q: RotaryEmbedding ─► Transpose ─► Reshape [0, 0, H·D] ─► MHA query                         │
              k: RotaryEmbedding ─► MHA key        v: ─► MHA value          (9 shape nodes a layer)  ◄────┘
    after   M ─► Split(axis -1, [H·D] ×3) ─► q, k: RotaryEmbedding(num_heads=H) ─► MHA(q, k, v)

The same arithmetic (the Reshape's [3, H, D] is the packed projection's column order, which the 3-D split
keeps); taken only where every tensor between M and the MultiHeadAttention has no other reader and the
Reshape's target is a constant (the legacy exporter's; the dynamo exporter's Slices and computed target keep
the 4-D form).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values, consumers, producer
from tqc.passes.rewrite import produce


def _only_reader(tensor: gs.Tensor, node: gs.Node) -> bool:
    return consumers(tensor) == [node]


def _head(tensor: gs.Tensor, reader: gs.Node) -> tuple[gs.Node, int] | None:
    """(the Split, its output index) for Transpose(Squeeze(Split output), [0, 2, 1, 3]) read by ``reader``."""
    transpose = producer(tensor)
    if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3] \
            or not _only_reader(tensor, reader):
        return None
    squeeze = producer(transpose.inputs[0])
    if squeeze is None or squeeze.op != "Squeeze" or not _only_reader(transpose.inputs[0], transpose):
        return None
    axes = constant_values(squeeze.inputs[1]) if len(squeeze.inputs) > 1 else squeeze.attrs.get("axes")
    split = producer(squeeze.inputs[0])
    if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([-3], [2]) or split is None or \
            split.op != "Split" or not _only_reader(squeeze.inputs[0], squeeze):
        return None
    return split, list(split.outputs).index(squeeze.inputs[0])


def _rotated(tensor: gs.Tensor, reader: gs.Node) -> gs.Node | None:
    """The 4-D RotaryEmbedding (no num_heads, rotate-half) that ``tensor`` is, read by ``reader`` alone."""
    rotary = producer(tensor)
    if rotary is None or rotary.op != "RotaryEmbedding" or rotary.attrs.get("num_heads") or \
            rotary.attrs.get("interleaved", 0) or not _only_reader(tensor, reader):
        return None
    return rotary


def flatten_rotary_heads(graph: gs.Graph) -> int:
    """The rewrite of the module docstring, for every MultiHeadAttention it fits; returns how many."""
    done = 0
    for index, mha in enumerate([n for n in graph.nodes if n.op == "MultiHeadAttention"]):
        heads = int(mha.attrs.get("num_heads", 0))
        query, key, value = mha.inputs[:3]
        merge = producer(query)
        if heads < 1 or merge is None or merge.op != "Reshape" or not _only_reader(query, mha):
            continue
        back = producer(merge.inputs[0])
        if back is None or back.op != "Transpose" or list(back.attrs.get("perm", [])) != [0, 2, 1, 3] or \
                not _only_reader(merge.inputs[0], merge):
            continue
        q_rotary, k_rotary = _rotated(back.inputs[0], back), _rotated(key, mha)
        if q_rotary is None or k_rotary is None:
            continue
        parts = [_head(q_rotary.inputs[0], q_rotary), _head(k_rotary.inputs[0], k_rotary), _head(value, mha)]
        if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1 or [p[1] for p in parts] != [0, 1, 2]:
            continue
        split = parts[0][0]
        sizes = constant_values(split.inputs[1]) if len(split.inputs) > 1 else None
        split_to = producer(split.inputs[0])
        target = constant_values(split_to.inputs[1]) if split_to is not None and split_to.op == "Reshape" else None
        if split.attrs.get("axis") not in (-3, 2) or (sizes is not None and list(np.asarray(sizes)) != [1, 1, 1]) \
                or target is None or len(target) != 5 or list(target[:3]) != [0, 0, 3] or \
                int(target[3]) not in (-1, heads) or int(target[4]) < 1 or \
                not _only_reader(split.inputs[0], split):
            continue
        hidden = heads * int(target[4])
        merged_width = constant_values(merge.inputs[1])
        if merged_width is None or list(np.asarray(merged_width)) != [0, 0, hidden]:
            continue
        prefix = f"tqc_rotary_flat{index}"
        q, k, v = (gs.Variable(f"{prefix}_{t}", dtype=np.float32) for t in "qkv")
        produce(graph, "Split", f"{prefix}_split",
                [split_to.inputs[0], gs.Constant(f"{prefix}_sizes", np.array([hidden] * 3, np.int64))],
                [q, k, v], attrs={"axis": -1})
        rotated = []
        for tag, source, rotary in (("q", q, q_rotary), ("k", k, k_rotary)):
            out = gs.Variable(f"{prefix}_{tag}_rotated", dtype=np.float32)
            produce(graph, "RotaryEmbedding", f"{prefix}_{tag}_rotary", [source] + list(rotary.inputs[1:]), [out],
                    attrs={**rotary.attrs, "num_heads": heads}, domain="com.microsoft")
            rotated.append(out)
        mha.inputs = rotated + [v] + list(mha.inputs[3:])
        done += 1
    return done
