"""MultiHeadAttention fed with heads in 4-D -> fed with [batch, sequence, hidden] (ORT targets).

Cores fused on heads split elsewhere (``core_attention``: ModernBERT) give MultiHeadAttention its query through
a Transpose and a Reshape back to 3-D, and its key and value as [B, N, S, D]. With rotary before it, every
layer keeps four Transposes, three Squeezes and two Reshapes around the op (ModernBERT-base: about 200 nodes,
each Transpose a kernel launch on CUDA). MultiHeadAttention and RotaryEmbedding both take [B, S, N·D]
(RotaryEmbedding with ``num_heads``), so::

    before:  X = MatMul(h, Wqkv)                                                  [B, S, 3·N·D]
             q4, k4, v4 = Squeeze(Split(Reshape(X, [0, 0, 3, N, D]), axis=-3), -3)   each [B, S, N, D]
             q = Reshape(Transpose(Rotary(Transpose(q4, 0213)), 0213), [0, 0, N·D])
             MultiHeadAttention(q, Rotary(Transpose(k4, 0213)), Transpose(v4, 0213), ...)

    after:   q, k, v = Split(X, [N·D, N·D, N·D], axis=-1)
             MultiHeadAttention(Rotary(q, num_heads=N), Rotary(k, num_heads=N), v, ...)

Heads that do not come from such a packed projection become Reshape(x4, [0, 0, N·D]), a view. A
MultiHeadAttention is rewritten only when all three of its inputs can be; anything else stays as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values, int_vector, producer
from tqc.passes.rewrite import NodeBuilder, produce


def _is_head_transpose(node: gs.Node | None) -> bool:
    return node is not None and node.op == "Transpose" and list(node.attrs.get("perm", ())) == [0, 2, 1, 3]


class _Flattener:
    """Builds the [B, S, N·D] form of head tensors; one Split per packed projection, shared by its three heads."""

    def __init__(self, graph: gs.Graph):
        self.build, self.splits = NodeBuilder(graph, "tqc_heads"), {}

    def heads_bnsh(self, t: gs.Tensor, heads: int, head_size: int) -> gs.Tensor | None:
        """``t`` [B, N, S, D] (a head Transpose, or a 4-D RotaryEmbedding of one) as [B, S, N·D]; None if
        it is neither."""
        node = producer(t)
        if _is_head_transpose(node):
            return self.heads_bsnh(node.inputs[0], heads, head_size)
        if node is not None and node.op == "RotaryEmbedding" and node.domain == "com.microsoft" and \
                "num_heads" not in node.attrs and "rotary_embedding_dim" not in node.attrs:
            inner = self.heads_bnsh(node.inputs[0], heads, head_size)
            if inner is None:
                return None
            return self.build.op("RotaryEmbedding", [inner] + list(node.inputs[1:]), t.dtype,
                                 attrs={**node.attrs, "num_heads": heads}, domain="com.microsoft")
        return None

    def heads_bsnh(self, t: gs.Tensor, heads: int, head_size: int) -> gs.Tensor:
        """``t`` [B, S, N, D] as [B, S, N·D]: a part of the packed projection's Split, or a Reshape view."""
        packed = self._packed_part(t, heads, head_size)
        if packed is not None:
            return packed
        return self.build.op("Reshape", [t, self.build.const("shape", [0, 0, heads * head_size])], t.dtype)

    def _packed_part(self, t: gs.Tensor, heads: int, head_size: int) -> gs.Tensor | None:
        """t = Squeeze(Split(Reshape(X, [0, 0, 3, N|-1, D]), axis=2|-3)[i], 2|-3) -> the i-th third of X's
        last axis (module docstring)."""
        squeeze = producer(t)
        if squeeze is None or squeeze.op != "Squeeze":
            return None
        axes = constant_values(squeeze.inputs[1]) if len(squeeze.inputs) > 1 else squeeze.attrs.get("axes")
        split = producer(squeeze.inputs[0])
        if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([2], [-3]) or split is None \
                or split.op != "Split" or len(split.outputs) != 3 or split.attrs.get("axis", 0) not in (2, -3):
            return None
        sizes = constant_values(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1].name else None
        if sizes is not None and [int(s) for s in sizes.reshape(-1)] != [1, 1, 1]:
            return None
        reshape = producer(split.inputs[0])
        target = int_vector(reshape.inputs[1]) if reshape is not None and reshape.op == "Reshape" else None
        if target is None or len(target) != 5 or target[:3] != [0, 0, 3] or target[3] not in (heads, -1) or \
                target[4] != head_size or reshape.attrs.get("allowzero", 0):
            return None
        x = reshape.inputs[0]
        if x.name not in self.splits:
            source = x
            if x.shape is None or len(x.shape) != 3:  # [B, S, ...] of unknown rank: flatten what follows S first
                source = self.build.op("Reshape", [x, self.build.const("shape", [0, 0, -1])], x.dtype)
            parts = [self.build.variable("part", x.dtype) for _ in range(3)]
            produce(self.build.graph, "Split", f"{parts[0].name}_split",
                    [source, self.build.const("sizes", [heads * head_size] * 3)], parts, attrs={"axis": -1})
            self.splits[x.name] = parts
        return self.splits[x.name][split.outputs.index(squeeze.inputs[0])]


def flatten_heads(graph: gs.Graph) -> int:
    """Every MultiHeadAttention whose query is Reshape(Transpose(q [B, N, S, D])) and whose key and value are
    [B, N, S, D] head tensors -> fed [B, S, N·D] (above). Returns the number rewritten; dead nodes stay for
    ``cleanup``."""
    flattener, count = _Flattener(graph), 0
    for node in [n for n in graph.nodes if n.op == "MultiHeadAttention" and n.domain == "com.microsoft"]:
        if len(node.inputs) < 3 or "num_heads" not in node.attrs:
            continue
        reshape = producer(node.inputs[0])
        target = int_vector(reshape.inputs[1]) if reshape is not None and reshape.op == "Reshape" else None
        transpose = producer(reshape.inputs[0]) if target is not None else None
        if target is None or len(target) != 3 or target[:2] != [0, 0] or not target[2] or target[2] < 1 or \
                not _is_head_transpose(transpose):
            continue
        heads = int(node.attrs["num_heads"])
        if target[2] % heads:
            continue
        head_size = target[2] // heads
        flat = [flattener.heads_bnsh(transpose.inputs[0], heads, head_size),
                flattener.heads_bnsh(node.inputs[1], heads, head_size),
                flattener.heads_bnsh(node.inputs[2], heads, head_size)]
        if any(t is None for t in flat):
            continue
        for index, tensor in enumerate(flat):
            node.inputs[index] = tensor
        count += 1
    return count
