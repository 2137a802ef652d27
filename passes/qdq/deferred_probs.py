"""Softmax's normalization deferred past probs x V's INT8 (``qdq{probs=deferred}``).

INT8 attention quantizes the probabilities per tensor on a fixed scale (1/127: a row's largest probability can be
1). A row that spreads its attention keeps few codes: with its largest probability 0.05 it has 7 of the 127. The
unnormalized exponentials exp(s - max s) reach exactly 1 in every row, so quantized on the same scale every row
keeps its full range; the division by the row's sum comes after the MatMul, by the sum of the same quantized
values, so each row's weights still sum to 1::

    s ─► Softmax ─► Q ─► DQ ─► MatMul(·, V) ─► context

    s ─► ReduceMax ─► Sub ─► Exp ─► e ─► Q(1/127) ─► DQ ─► ê ─► MatMul(·, V) ─► Div ─► context
    └─────────────────►┘                               └─► ReduceSum ──────────────►┘

Exact in float (softmax(s) V = (e V) / Σe). Both attention MatMuls stay INT8. MiniLM on trt (judged on ORT CPU,
2,400 held-out sentences): NN agreement 94.5 -> 95.0%, mean cosine 0.99913 -> 0.99923; with probs x V in float
94.6% (``bench/results/accuracy_trt_deferred_cpu.*``); calibrated on 400 sentences 94.9 -> 95.6%, 0.99917 -> 0.99926
(``accuracy_trt_deferred_c400_cpu.*``). TensorRT's MHA fusion looks for a Softmax between the two
MatMuls, so TensorRT will most likely run this form as separate INT8 GEMMs and pointwise kernels; its speed there was
not measured (no TensorRT here), which is why it is not the default.

A site is a Softmax over the last axis whose one reader is a per-tensor QuantizeLinear with zero point 0, whose
DequantizeLinear feeds only MatMuls, as their first input (the probabilities' Q/DQ that ``insert.py`` places).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values, only_consumer
from tqc.passes.rewrite import cleanup, detach, drop, produce, produce_reduce, rebase

QMAX = {np.dtype(np.int8): 127, np.dtype(np.uint8): 255}  # the largest code of a zero point 0 quantizer


def _reads_first(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The one node reading ``tensor``, of type ``op``, as its first input; else None."""
    node = only_consumer(tensor, op)
    return node if node is not None and node.inputs[0] is tensor else None


def _site(softmax: gs.Node, graph_outputs: list[gs.Tensor]) -> tuple[gs.Node, gs.Node, list[gs.Node]] | None:
    """(QuantizeLinear, DequantizeLinear, the MatMuls reading it) of a deferrable Softmax, or None. Probabilities
    (or their codes) that are also a graph output keep their meaning and name: no site."""
    if softmax.attrs.get("axis", -1) != -1 or len(softmax.outputs) != 1:
        return None
    quantize = _reads_first(softmax.outputs[0], "QuantizeLinear")
    if quantize is None or len(quantize.inputs) < 3 or quantize.attrs.get("axis", 1) not in (1, -1):
        return None
    scale, zero = constant_values(quantize.inputs[1]), constant_values(quantize.inputs[2])
    if scale is None or zero is None or scale.size != 1 or zero.size != 1 or int(zero.reshape(-1)[0]) != 0 or \
            np.dtype(zero.dtype) not in QMAX:
        return None
    dequantize = _reads_first(quantize.outputs[0], "DequantizeLinear")
    if dequantize is None or len(dequantize.inputs) < 3 or any(
            not np.array_equal(constant_values(dequantize.inputs[i]), constant_values(quantize.inputs[i]))
            for i in (1, 2)):
        return None
    matmuls = list(dequantize.outputs[0].outputs)
    if not matmuls or any(m.op != "MatMul" or m.inputs[0] is not dequantize.outputs[0] or
                          m.inputs[1] is dequantize.outputs[0] for m in matmuls):
        return None
    if any(t in graph_outputs for t in (softmax.outputs[0], quantize.outputs[0], dequantize.outputs[0])):
        return None
    return quantize, dequantize, matmuls


def defer_normalization(graph: gs.Graph) -> int:
    """Rewrite every deferrable Softmax -> Q/DQ -> MatMul site (``_site``: chosen before any rewrite); the number
    of sites."""
    sites = [(n, site) for n in graph.nodes if n.op == "Softmax" and (site := _site(n, graph.outputs)) is not None]
    for softmax, (quantize, dequantize, matmuls) in sites:
        scores, probs = softmax.inputs[0], softmax.outputs[0]
        prefix = softmax.name or probs.name
        dtype = probs.dtype or np.float32
        row_max = gs.Variable(f"{prefix}_row_max", dtype=dtype)
        produce_reduce(graph, "ReduceMax", f"{prefix}_row_max", scores, -1, row_max, f"{prefix}_row_max_axes")
        shifted = gs.Variable(f"{prefix}_shifted", dtype=dtype)
        produce(graph, "Sub", f"{prefix}_shifted", [scores, row_max], [shifted])
        drop(softmax)
        produce(graph, "Exp", f"{prefix}_exp", [shifted], [rebase(probs, "unnormalized")])
        old_scale, zero = constant_values(quantize.inputs[1]), constant_values(quantize.inputs[2])
        scale = gs.Constant(f"{prefix}_unnormalized_scale",
                            np.full(old_scale.shape, 1.0 / QMAX[np.dtype(zero.dtype)], dtype=old_scale.dtype))
        quantize.inputs = [quantize.inputs[0], scale, *quantize.inputs[2:]]
        dequantize.inputs = [dequantize.inputs[0], scale, *dequantize.inputs[2:]]
        rebase(quantize.outputs[0], "unnormalized")
        weights = rebase(dequantize.outputs[0], "unnormalized")
        row_sum = gs.Variable(f"{prefix}_row_sum", dtype=dtype)
        produce_reduce(graph, "ReduceSum", f"{prefix}_row_sum", weights, -1, row_sum, f"{prefix}_row_sum_axes")
        for index, matmul in enumerate(matmuls):
            context = matmul.outputs[0]
            unnormalized = gs.Variable(f"{context.name}_tqc_unnormalized", dtype=context.dtype)
            detach(context, writes=unnormalized)
            produce(graph, "Div", f"{prefix}_normalize{index or ''}", [unnormalized, row_sum], [context])
    if sites:
        cleanup(graph)
    return len(sites)
