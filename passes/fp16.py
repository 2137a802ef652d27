"""``fp16``: FP32 to FP16 with FP32 graph inputs/outputs kept, and an overflow guard.

Before                                    After
  input_ids ─► ... MatMul(W fp32) ...       input_ids ─► ... MatMul(W fp16) ... ─► Cast(fp32) ─► output
  a node whose activations reach 1e5        the same node in FP32, with Casts at its boundary

The guard runs the FP32 graph on the verification (or calibration) inputs, and keeps in FP32 every node with
an output whose magnitude exceeds ``margin`` × 65504 (FP16's largest finite value). LayerNormalization keeps
its FP32 accumulation (``stash_type=1``); ONNX Runtime's fused Attention/SkipLayerNorm kernels and TensorRT's
Softmax accumulate in FP32 internally. ``keep_fp32`` forces op types to stay FP32.

The conversion itself is onnxruntime.transformers' ``convert_float_to_float16`` (the maintained successor of
onnxruntime-tools), driven with tqc's block lists.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from tqc.compiler.activations import max_abs_per_tensor
from tqc.compiler.feeds import synthesize_feeds
from tqc.compiler.graph_io import to_graph, to_model
from tqc.passes.base import Option, Pass, PassContext, PassResult, Tolerance, parse_bool, parse_list
from tqc.passes.registry import register

FP16_MAX = 65504.0
QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear take float16 inputs and scales from opset 19
# Opset 18 moved these ops' ``axes`` from an attribute to an input; nothing else a transformer graph uses
# changed meaning between opsets 17 and 19 (the other schema changes add types or optional inputs).
_AXES_BECAME_INPUT = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                      "ReduceLogSumExp", "ReduceSumSquare")


def raise_opset(graph: gs.Graph, version: int = QDQ_FP16_OPSET) -> bool:
    """Lift the default-domain opset to ``version`` (for float16 Q/DQ), rewriting the ops whose form changed."""
    import numpy as np
    import onnx

    if graph.opset is None or int(graph.opset) >= version:
        return False
    for node in graph.nodes:
        if node.op in _AXES_BECAME_INPUT and "axes" in node.attrs:
            axes = gs.Constant(f"{node.name or node.outputs[0].name}_axes", np.array(node.attrs.pop("axes"), np.int64))
            node.inputs = [node.inputs[0], axes]
    graph.opset = version
    imports = [imp for imp in (graph.import_domains or []) if imp.domain not in ("", "ai.onnx")]
    graph.import_domains = [onnx.helper.make_opsetid("", version)] + imports
    return True


def replace_graph(graph: gs.Graph, new: gs.Graph) -> None:
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.import_domains = new.import_domains
    graph.opset = new.opset


def _unshare_initializers(model, blocked: set[str]) -> int:
    """Give FP32-kept nodes their own copy of initializers they share with FP16 nodes.

    A shared weight (fold merges equal small constants) cannot be FP16 for one consumer and FP32 for another.
    """
    if not blocked:
        return 0
    import onnx

    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    initializers = {t.name: t for t in model.graph.initializer}
    copies = 0
    for name, nodes in users.items():
        if name not in initializers:
            continue
        kinds = {node.name in blocked for node in nodes}
        if len(kinds) < 2:
            continue
        clone = onnx.TensorProto()
        clone.CopyFrom(initializers[name])
        clone.name = f"{name}_tqc_fp32"
        model.graph.initializer.append(clone)
        for node in nodes:
            if node.name in blocked:
                for i, value in enumerate(node.input):
                    if value == name:
                        node.input[i] = clone.name
        copies += 1
    return copies


@register
class Fp16(Pass):
    """Convert to FP16 (FP32 inputs/outputs), keeping overflowing nodes in FP32."""

    name = "fp16"
    options = {
        "guard": Option(parse_bool, True, "keep nodes whose activations exceed the FP16 range in FP32"),
        "margin": Option(float, 0.5, "fraction of 65504 above which a node is kept in FP32",
                         min=0, min_inclusive=False, max=1),
        "keep_fp32": Option(parse_list, [], "op types to keep in FP32 ('|'-separated)"),
    }
    # FP16 is not exact: 10 mantissa bits. Outputs of a LayerNorm-ended encoder stay within these bounds.
    tolerance = Tolerance(atol=0.05, rtol=0.05)

    def tolerance_for(self, ctx: PassContext) -> Tolerance:
        """On an INT8 graph, an FP16-rounded input can land on the neighbouring INT8 level: elementwise bounds
        no longer describe the change, the output cosine does (as for ``qdq``)."""
        if ctx.analyses.get("fp16_after_qdq"):
            return Tolerance(atol=math.inf, rtol=math.inf, min_cosine=0.99)
        return self.tolerance

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        for index, node in enumerate(graph.nodes):
            if not node.name:
                node.name = f"tqc_node_{index}"
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            # qdq,fp16: the Q/DQ scales become float16 with the tensors they quantize
            ctx.analyses["fp16_after_qdq"] = True
            if raise_opset(graph):
                ctx.note(f"fp16: opset raised to {QDQ_FP16_OPSET} for float16 Q/DQ scales")
        model = to_model(graph)
        blocked_nodes: list[str] = []
        peak = 0.0
        if self.values["guard"]:
            feeds = ctx.verification_feeds or synthesize_feeds(model)
            peaks = max_abs_per_tensor(model, feeds)
            limit = self.values["margin"] * FP16_MAX
            producers = {out: node.name for node in model.graph.node for out in node.output}
            peak = max(peaks.values(), default=0.0)
            blocked_nodes = sorted({producers[name] for name, value in peaks.items()
                                    if value > limit and name in producers})
        _unshare_initializers(model, set(blocked_nodes))
        for node in model.graph.node:
            if node.op_type == "LayerNormalization":
                for attr in node.attribute:
                    if attr.name == "stash_type":
                        attr.i = 1
        op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.values["keep_fp32"]))
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked_nodes,
                                             op_block_list=op_block, disable_shape_infer=False)
        new = to_graph(converted).toposort()  # the converter appends its Casts out of order
        casts_before = sum(1 for n in graph.nodes if n.op == "Cast")
        replace_graph(graph, new)
        ctx.note(f"fp16: {len(blocked_nodes)} node(s) kept in FP32 by the overflow guard"
                 + (f" ({', '.join(blocked_nodes[:5])}{', ...' if len(blocked_nodes) > 5 else ''})"
                    if blocked_nodes else "") + f"; peak |activation| {peak:.4g}")
        return PassResult(True, {"fp32_nodes_guarded": len(blocked_nodes),
                                 "casts_added": sum(1 for n in graph.nodes if n.op == "Cast") - casts_before,
                                 "peak_activation": round(peak, 3)})
