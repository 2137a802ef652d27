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

No ModelProto of the weights is built, so a model above protobuf's 2 GB converts and memory stays near the
weights' own size: the guard runs the graph through ``GraphSession`` (weights lent to ONNX Runtime), and the
converter runs on a skeleton whose large constants are shape-only stand-ins::

    graph ──► skeleton (stand-ins) ──► convert_float_to_float16 ──► which stand-ins became float16
      └────► each such FP32 array ──► ORT's own convert_np_to_float16, chunk by chunk ──► the new graph's array

The result is byte-identical to the converter run on the full model (tests/passes/test_fp16.py).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

import onnx_graphsurgeon as gs

from tqc.compiler.runtime.activations import max_abs_per_tensor
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.io.structure import infer_shapes
from tqc.compiler.io.graph import skeleton_of_graph, to_graph, to_model, update_tensor_types
from tqc.passes.base import Condition, Option, Pass, PassContext, PassResult, Tolerance, parse_bool, parse_list

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


def saturate_casts(graph: gs.Graph, beyond_fp16: set[str]) -> int:
    """Clip each FP32 tensor whose values were seen beyond FP16's range where a Cast takes it into FP16.

    Before                                         After
      Where(mask, scores, -3.4e38) ─► Cast(fp16)     Where(...) ─► Clip(-65504, 65504) ─► Cast(fp16)

    A node the overflow guard keeps in FP32 still hands its output to FP16 consumers, and Cast turns -3.4e38
    (``torch.finfo(float32).min``, the masked_fill of eager attention) into -inf. A row masked whole is then
    all -inf and its Softmax NaN on ONNX Runtime's CUDA kernels; the NaN reaches every real token through the
    next layer's padded keys (0 x NaN). Clipped, the row stays what it is in FP32: uniform. The guard's tensors
    are named as the graph had them, which the converter gives to its Cast's output."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "Cast" or node.attrs.get("to") != 10 or node.outputs[0].name not in beyond_fp16:
            continue
        source = node.inputs[0]
        clipped = gs.Variable(f"{source.name}_clipped_to_fp16_range", dtype=np.float32, shape=source.shape)
        bounds = [gs.Constant(f"{source.name}_fp16_{side}", np.array(value, np.float32))
                  for side, value in (("min", -FP16_MAX), ("max", FP16_MAX))]
        graph.nodes.append(gs.Node("Clip", f"{node.name}_saturate", inputs=[source, *bounds], outputs=[clipped]))
        node.inputs[0] = clipped
        count += 1
    if count:
        graph.toposort()
    return count


def replace_graph(graph: gs.Graph, new: gs.Graph) -> None:
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.import_domains = new.import_domains
    graph.opset = new.opset


def _unshare_initializers(model, blocked: set[str]) -> dict[str, str]:
    """Give FP32-kept nodes their own copy of initializers they share with FP16 nodes; returns copy -> original.

    A shared weight (fold merges equal small constants) cannot be FP16 for one consumer and FP32 for another.
    On a skeleton, a copy of a shape-only stand-in is a stand-in too: its array is the original's.
    """
    if not blocked:
        return {}
    import onnx

    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    initializers = {t.name: t for t in model.graph.initializer}
    copies: dict[str, str] = {}
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
        copies[clone.name] = name
    return copies


_CHUNK = 1 << 22  # elements converted at a time: bounds the converter's temporaries to a few tens of MB


def to_float16(array: np.ndarray) -> np.ndarray:
    """``convert_np_to_float16`` (ORT's: tiny magnitudes to 5.96e-08, finite overflow to ±65504) chunk by chunk,
    so that converting a 1 GB embedding table does not allocate several full-size temporaries."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    flat = np.ascontiguousarray(array).reshape(-1)
    out = np.empty(flat.shape, np.float16)
    for start in range(0, flat.size, _CHUNK):
        out[start:start + _CHUNK] = convert_np_to_float16(flat[start:start + _CHUNK])
    return out.reshape(array.shape)


@contextlib.contextmanager
def _shape_only_value_infos():
    """The converter reads a converted initializer's data only to learn its shape
    (``make_value_info_from_tensor``); a stand-in has no data, its dims say the same."""
    import onnx
    from onnxruntime.transformers import float16 as ort_float16

    original = ort_float16.make_value_info_from_tensor

    def from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    ort_float16.make_value_info_from_tensor = from_dims
    try:
        yield
    finally:
        ort_float16.make_value_info_from_tensor = original


class Fp16(Pass):
    """Convert to FP16 (FP32 inputs/outputs), keeping overflowing nodes in FP32."""

    name = "fp16"
    ensures = (Condition(f"opset >= {QDQ_FP16_OPSET} where a Q/DQ takes a float16 scale", lambda graph, ctx: next(
        (f"'{n.name}' has a float16 scale at opset {graph.opset}" for n in graph.nodes
         if n.op in ("QuantizeLinear", "DequantizeLinear") and len(n.inputs) > 1 and
         getattr(n.inputs[1], "dtype", None) == np.float16 and int(graph.opset) < QDQ_FP16_OPSET), None)),)
    options = {
        "guard": Option(parse_bool, True, "keep nodes whose activations exceed the FP16 range in FP32"),
        "margin": Option(float, 0.5, "fraction of 65504 above which a node is kept in FP32",
                         min=0, min_inclusive=False, max=1),
        "keep_fp32": Option(parse_list, [], "op types to keep in FP32 ('|'-separated)"),
    }
    # FP16 is not exact: 10 mantissa bits. Outputs of a LayerNorm-ended encoder stay within these bounds.
    tolerance = Tolerance(atol=0.05, rtol=0.05)

    # On an INT8 graph, an FP16-rounded input can land on the neighbouring INT8 level: elementwise bounds no
    # longer describe the change, the output cosine does (as for ``qdq``).
    tolerance_after_qdq = Tolerance(atol=math.inf, rtol=math.inf, min_cosine=0.99)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        for index, node in enumerate(graph.nodes):
            if not node.name:
                node.name = f"tqc_node_{index}"
        after_qdq = any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes)
        if after_qdq:
            # qdq,fp16: the Q/DQ scales become float16 with the tensors they quantize
            if raise_opset(graph):
                ctx.note(f"fp16: opset raised to {QDQ_FP16_OPSET} for float16 Q/DQ scales")
        blocked_nodes: list[str] = []
        peaks: dict[str, float] = {}
        peak = 0.0
        if self.values["guard"]:
            # the graph itself runs, its weights lent to ORT (no serialized copy: works above protobuf's 2 GB)
            light = infer_shapes(skeleton_of_graph(graph), strict=False)
            update_tensor_types(graph, light)  # the session exposes every tensor whose float type is known
            feeds = ctx.verification_feeds or synthesize_feeds(light)
            peaks = max_abs_per_tensor(graph, feeds)
            limit = self.values["margin"] * FP16_MAX
            producers = {out.name: node.name for node in graph.nodes for out in node.outputs}
            peak = max(peaks.values(), default=0.0)
            blocked_nodes = sorted({producers[name] for name, value in peaks.items()
                                    if value > limit and name in producers})
        # The converter runs on a skeleton: large constants are shape-only stand-ins, converted afterwards from
        # the graph's own arrays (exactly as the converter would), so no ModelProto of the weights is built.
        lean = not graph.functions
        model = skeleton_of_graph(graph) if lean else to_model(graph)
        copies = _unshare_initializers(model, set(blocked_nodes))
        for node in model.graph.node:
            if node.op_type == "LayerNormalization":
                for attr in node.attribute:
                    if attr.name == "stash_type":
                        attr.i = 1
        op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.values["keep_fp32"]))
        with _shape_only_value_infos():
            converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked_nodes,
                                                 op_block_list=op_block, disable_shape_infer=False)
        del model
        weights = self._convert_weights(graph, converted, copies) if lean else None
        new = to_graph(converted, weights).toposort()  # the converter appends its Casts out of order
        del converted, weights
        saturated = saturate_casts(new, {name for name, value in peaks.items() if value > FP16_MAX})
        casts_before = sum(1 for n in graph.nodes if n.op == "Cast")
        replace_graph(graph, new)
        ctx.note(f"fp16: {len(blocked_nodes)} node(s) kept in FP32 by the overflow guard"
                 + (f" ({', '.join(blocked_nodes[:5])}{', ...' if len(blocked_nodes) > 5 else ''})"
                    if blocked_nodes else "") + f"; peak |activation| {peak:.4g}")
        if saturated:
            ctx.note(f"fp16: {saturated} FP32 value(s) beyond FP16's range clipped to +-65504 where they enter FP16 "
                     "(a mask fill such as -3.4e38 stays finite: a Cast would make it -inf, and a row masked whole "
                     "NaN)")
        return PassResult(True, {"fp32_nodes_guarded": len(blocked_nodes), "casts_saturated": saturated,
                                 "casts_added": sum(1 for n in graph.nodes if n.op == "Cast") - casts_before,
                                 "peak_activation": round(peak, 3)},
                          tolerance=self.tolerance_after_qdq if after_qdq else None)

    @staticmethod
    def _convert_weights(graph: gs.Graph, converted, copies: dict[str, str]) -> dict[str, np.ndarray]:
        """Arrays for the converted skeleton's stand-ins: float16 where the converter made the stand-in float16.

        Each FP32 array the graph held is replaced by its FP16 version as soon as it is made (the graph is
        replaced by the converted one next), so the FP32 weights are freed one by one."""
        import onnx

        constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        wanted = [(t.name, t.data_type) for t in converted.graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL]
        weights: dict[str, np.ndarray] = {}
        halves: dict[str, np.ndarray] = {}
        for name, data_type in sorted(wanted, key=lambda item: item[0] not in copies):  # copies first
            source = constants[copies.get(name, name)]
            if data_type == onnx.TensorProto.FLOAT16 and source.values.dtype == np.float32:
                if source.name not in halves:
                    halves[source.name] = to_float16(source.values)
                weights[name] = halves[source.name]
                if name not in copies:
                    source.values = weights[name]  # the graph lets go of the FP32 array
            else:
                weights[name] = source.values
        return weights
