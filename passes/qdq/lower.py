"""The float-exact preparation ``qdq`` needs before quantizing an ONNX Runtime graph.

ONNX Runtime targets (``ort-cpu``, ``ort-cuda``): a fused com.microsoft Attention keeps its QKV projection
inside the op, where no Q/DQ pair can reach it. Every Attention that is not kept (QAttention sites) is
expanded into the standard form, whose packed QKV projection is an ordinary MatMul site::

    x ─► Attention(W_qkv, b, mask) ─► ctx        x ─► MatMul 'tqc_xattn<i>_qkv_matmul' (W_qkv) ─► Add(b) ─►
                                                   split heads ─► Q @ K^T ─► + mask ─► Softmax ─► @ V ─► ctx

``i`` counts the expanded attentions in graph order. The output keeps its name; numbers do not change
(float32 either way). An Attention of an FP16 graph stays fused (the expansion is written in float32), and
one whose QKV must stay float (``exclude``, or returned to float by the budget) is expanded all the same:
its MatMuls carry the prefix ``float_prefixes`` lists. ``trt`` and ``openvino`` graphs have no contrib ops:
nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.core.target import Target
from tqc.passes.fuse.attention_rewrite import expand_ort_attention
from tqc.passes.fuse.masks import MaskCache
from tqc.passes.rewrite import cleanup


@dataclass
class Lowered:
    expanded: int = 0                                   # Attentions expanded
    float_prefixes: list[str] = field(default_factory=list)  # name prefixes of expansions whose QKV stays float
    notes: list[str] = field(default_factory=list)


def is_ort_attention(node: gs.Node) -> bool:
    return node.op == "Attention" and node.domain == "com.microsoft"


def _float16_input(node: gs.Node) -> bool:
    tensor = node.inputs[0]
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    try:
        return dtype is not None and np.dtype(dtype) == np.float16
    except TypeError:
        return False


def lower(graph: gs.Graph, target: Target, keep: Iterable[str] = (), float_qkv: dict[str, str] | None = None) -> Lowered:
    """Expand the com.microsoft Attentions of an ORT-target graph, in place, except those named in ``keep``
    (they become QAttention) and FP16 ones; ``float_qkv`` maps those whose QKV projection stays float to why
    ("excluded by pattern")."""
    result = Lowered()
    keep, float_qkv = set(keep), dict(float_qkv or {})
    if not target.contrib_ops or not any(is_ort_attention(n) and n.name not in keep for n in graph.nodes):
        return result
    masks = MaskCache(graph)
    for index, node in enumerate([n for n in graph.nodes if is_ort_attention(n) and n.name not in keep]):
        if _float16_input(node):
            result.notes.append(f"qdq: '{node.name}' runs in FP16 (fused Attention of an FP16 graph): its QKV "
                                "projection stays FP16")
            continue
        if node.name in float_qkv:
            result.notes.append(f"qdq: '{node.name}' {float_qkv[node.name]}: its QKV projection stays float")
            result.float_prefixes.append(f"tqc_xattn{index}_")
        expand_ort_attention(graph, node, index, masks)
        result.expanded += 1
    cleanup(graph)
    return result
