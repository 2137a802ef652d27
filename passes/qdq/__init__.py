"""``qdq``: insert QuantizeLinear/DequantizeLinear from a calibration table, with placement per target.

Before                                 After (--target trt)
  x ─► MatMul(W) ─► y                    x ─► Q(s_x, 0) ─► DQ ─► MatMul ─► y
                                         W_int8 ─► DQ(s_w per output channel, axis 1) ─┘
  probs ─► MatMul(V)                     probs ─► Q/DQ ─► MatMul ◄─ DQ ◄─ Q ◄─ V   (INT8 MHA: head size 16/32/64)

After (--target ort-cpu|ort-cuda)
  x ─► Q(u8, s, zp) ─► DQ ─► MatMul      one Q/DQ pair per consumer (ORT fuses DQ->MatMul into
  W_int8 ─► DQ(axis 1) ───────┘          MatMulIntegerToFloat); com.microsoft Attention is expanded first
                                         so its QKV projection is a quantizable MatMul (ort-cuda), or
                                         becomes Q(u8) ─► QAttention (INT8 QKV inside ORT's fused
                                         attention kernel; ort-cpu's default: 1.1x faster there).

``trt``: symmetric INT8, zero-point 0, activations per tensor, weights per output channel, Q/DQ on MatMul/Gemm
inputs (never outputs), optional residual Adds, attention batched MatMuls where TensorRT's INT8 MHA applies,
mask Add, LayerNorm, GELU and Softmax math left in float, equal scales across Concat, GEMV-shaped MatMuls
skipped. ``ort-*``: asymmetric UINT8 activations (a GELU output's [-0.17, 10] range keeps all 8 bits), INT8
weights per channel. The pass is deterministic given the table, and running it twice changes nothing.

Shared weights (ALBERT's layers): x1 ─► Mul(1/s) ─► Q/DQ ─► MatMul ◄─ DQ(W·diag(s) INT8) ─► MatMul ◄─ Q/DQ ◄─ Mul(1/s) ◄─ x2,
one s from the union of both consumers' ranges, one INT8 copy (``shared_weights=copy``: one per consumer).
FP16 graphs (``fp16,qdq``): scales take the float type of the tensor they quantize (float16, opset 19).
``method`` applies to smoothed activations too (x/s measured on the calibration data). INT8 attention needs the
sequences the model will see within TensorRT's limit (``tqc.compiler.core.target``).

``budget=0.995`` adds the accuracy protection: the output cosine of the quantized graph is measured on the
calibration data; while it is below the budget, the MatMul whose quantization costs most (measured one at a
time) goes back to float.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import (TRT_INT8_MHA_HEAD_SIZES, TRT_INT8_MHA_MAX_SEQUENCE, position_table_rows,
                                       sequence_bound)
from tqc.passes.base import (NO_CONTRIB_OPS, Condition, Option, Pass, PassContext, PassResult, Tolerance, parse_bool,
                             parse_list)
from tqc.passes.fp16 import QDQ_FP16_OPSET, raise_opset
from tqc.passes.fuse.attention import MaskCache, expand_ort_attention
from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.registry import register

TRT_MHA_HEAD_SIZES = TRT_INT8_MHA_HEAD_SIZES
TRT_MHA_MAX_SEQUENCE = TRT_INT8_MHA_MAX_SEQUENCE
FLOP_TOKENS = 128  # FLOP shares are reported for a 128-token sequence


@dataclass
class Site:
    """One quantizable MatMul/Gemm: its activation inputs and (for linear layers) its constant weight."""

    node: gs.Node
    activations: list[int]          # input indices to quantize as activations
    weight: int | None              # input index of the constant weight
    weight_axis: int                # per-channel axis of the weight
    kind: str                       # "linear" | "attention"
    flops_per_token: float
    eligible: bool = True           # attention MatMuls count in the FLOPs but are quantized for trt only


def _is_dq(t: gs.Tensor) -> bool:
    node = producer(t)
    return node is not None and node.op == "DequantizeLinear"


def graph_sequence_bound(graph: gs.Graph, ctx: PassContext) -> tuple[int | None, str]:
    """The longest sequence the model will see: --shapes, else calibration lengths and the position table."""
    profiles = ctx.shapes
    feeds = ctx.calibration_batches() + list(ctx.verification_feeds or [])
    lengths = [int(v.shape[1]) for feed in feeds for v in feed.values() if getattr(v, "ndim", 0) >= 2]
    made = {out.name: node for node in graph.nodes for out in node.outputs}
    gathers = []
    for node in graph.nodes:
        if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and len(node.inputs[0].shape) == 2:
            gathers.append((int(node.inputs[0].shape[0]), node.inputs[1].name))

    def producer(name):
        node = made.get(name)
        return (node.op, [t.name for t in node.inputs]) if node is not None else None

    positions = position_table_rows(gathers, producer, {t.name for t in graph.inputs})
    return sequence_bound([p.max for p in profiles.values()], lengths, positions)


def _matmul_sites(graph: gs.Graph, op_types: list[str], target: str, attention: bool,
                  notes: list[str], max_sequence: tuple[int | None, str] = (None, "")) -> list[Site]:
    sites = []
    long_sequence_noted = False
    for node in graph.nodes:
        if node.op not in op_types or len(node.inputs) < 2:
            continue
        a, b = node.inputs[0], node.inputs[1]
        b_values = constant_values(b)
        if b_values is None and _is_dq(b):
            b_values = constant_values(producer(b).inputs[0])  # an INT8 weight from an earlier qdq
        if b_values is not None and b_values.ndim == 2:
            if node.op == "Gemm":
                trans_b = int(node.attrs.get("transB", 0))
                k, n = b_values.shape[::-1] if trans_b else b_values.shape
                axis = 0 if trans_b else 1
            else:
                k, n = b_values.shape
                axis = 1
            leading = list(a.shape[:-1]) if a.shape is not None else None
            if leading and all(isinstance(d, int) for d in leading) and int(np.prod(leading)) == 1:
                # [1, K] @ [K, N]: a GEMV; INT8 gains nothing there (and TensorRT skips it).
                notes.append(f"qdq: '{node.name}' is GEMV-shaped ([1, {k}] @ [{k}, {n}]); left in float")
                continue
            sites.append(Site(node, [0], 1, axis, "linear", 2.0 * k * n))
        elif isinstance(a, gs.Variable) and isinstance(b, gs.Variable):
            layout = _heads_layout(node)
            if layout is None:
                continue
            heads, head = layout
            site = Site(node, [0, 1], None, 0, "attention", 2.0 * FLOP_TOKENS * heads * head)
            if not (attention and target in ("trt", "openvino")):
                site.eligible = False
            elif target == "trt" and head not in TRT_MHA_HEAD_SIZES:
                notes.append(f"qdq: attention MatMul '{node.name}' has head size {head}; TensorRT's INT8 MHA "
                             f"needs {TRT_MHA_HEAD_SIZES}: left in float")
                site.eligible = False
            elif max_sequence[0] is not None and max_sequence[0] > TRT_MHA_MAX_SEQUENCE:
                if not long_sequence_noted:
                    notes.append(f"qdq: sequences up to {max_sequence[0]} ({max_sequence[1]}) exceed TensorRT's INT8 "
                                 f"MHA limit of {TRT_MHA_MAX_SEQUENCE}: the attention batched MatMuls stay in float "
                                 "(give --shapes with a max sequence <= 512 to quantize them)")
                    long_sequence_noted = True
                site.eligible = False
            sites.append(site)
    return sites


def _heads_layout(node: gs.Node) -> tuple[int, int] | None:
    """(heads, head size) of a tqc-canonical attention MatMul: its inputs come from Reshape [0, 0, H, D]
    then Transpose (Q @ K^T, probs @ V)."""
    for t in node.inputs:
        transpose = producer(t)
        reshape = producer(transpose.inputs[0]) if transpose is not None and transpose.op == "Transpose" else None
        if reshape is not None and reshape.op == "Reshape":
            values = constant_values(reshape.inputs[1])
            if values is not None and values.size == 4 and values[2] > 0 and values[3] > 0:
                return int(values[2]), int(values[3])
    return None


def _float_type(tensor: gs.Tensor) -> type:
    """The float type of a tensor a Q/DQ pair quantizes: its scales and dequantized output take it."""
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    try:
        return np.float16 if dtype is not None and np.dtype(dtype) == np.float16 else np.float32
    except TypeError:
        return np.float32


def _float_type_of_array(values: np.ndarray) -> type:
    return np.float16 if values.dtype == np.float16 else np.float32


def _quantize_weight(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
    amax = np.abs(values).max(axis=reduce_axes)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    scaled = values / scale.reshape(shape)  # the one float temporary: rounded and clipped in place
    np.round(scaled, out=scaled)
    np.clip(scaled, -127, 127, out=scaled)
    return scaled.astype(np.int8), scale


@dataclass
class QdqState:
    """qdq's working state for one run (the budget step applies the placement several times)."""

    skip: list[str] = field(default_factory=list)                # sites the budget keeps in float
    smoothed_ranges: dict = field(default_factory=dict)          # (site, s) -> measured range of x / s
    attention_expanded: int = 0
    qattention: int = 0
    full_cosine: float | None = None                             # budget: output cosine with every site quantized
    sensitivity: dict[str, float] = field(default_factory=dict)  # budget: cosine each site costs, worst first


class Quantizer:
    def __init__(self, graph: gs.Graph, table, target: str, method: str, percentile: float):
        self.graph = graph
        self.table = table
        self.target = target
        self.method = method
        self.percentile = percentile
        self.shared: dict[str, gs.Tensor] = {}
        self.counter = 0
        # Weights used by several sites (ALBERT's layers share theirs): one smoothing vector per weight, from
        # the union of its consumers' activation ranges, and one INT8 copy, dequantized once for every consumer.
        self.shared_factors: dict[tuple[str, int], np.ndarray] = {}
        self.weight_outputs: dict[tuple[str, int, bool], gs.Tensor] = {}
        self.names: set[str] = set(graph.tensors().keys())
        # Ranges of smoothed activations x / s measured on the calibration data (methods other than 'max'):
        # the table holds x's ranges only, and a percentile of x / s is not a function of them.
        self.source = None                                       # the calibration data, re-iterable
        self.range_cache: dict[tuple[str, bytes], object] = {}   # (site, s) -> TensorRange, across apply() calls
        self.measured: dict[str, object] = {}
        self.float16 = False  # a float16 tensor was quantized: the graph needs opset 19

    def unique_name(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``...: two distinct tensors must never share a name."""
        candidate, index = name, 1
        while candidate in self.names:
            index += 1
            candidate = f"{name}_{index}"
        self.names.add(candidate)
        return candidate

    def unique_base(self, name: str, suffixes: tuple[str, ...]) -> str:
        """``name`` (or ``name_2``...) such that no ``name + suffix`` is taken yet; reserves them."""
        base, index = name, 1
        while any(f"{base}{suffix}" in self.names for suffix in suffixes):
            index += 1
            base = f"{name}_{index}"
        self.names.update(f"{base}{suffix}" for suffix in suffixes)
        return base

    @staticmethod
    def weight_key(site: Site) -> tuple[str, int]:
        return site.node.inputs[site.weight].name, site.weight_axis

    def _smoothing_inputs(self, site: Site):
        """(channel mins, channel maxes, weight, input axis of the weight), or None when smoothing cannot apply."""
        node = site.node
        entry = self.table.tensors.get(node.inputs[0].name)
        weight = constant_values(node.inputs[site.weight])
        if entry is None or entry.channel_min is None or weight is None:
            return None
        cmin = np.asarray(entry.channel_min, np.float64)
        cmax = np.asarray(entry.channel_max, np.float64)
        in_axis = 0 if site.weight_axis == 1 else 1  # [K, N] for MatMul, [N, K] for Gemm with transB
        if cmin.size != weight.shape[in_axis]:
            return None
        return cmin, cmax, weight, in_axis

    @staticmethod
    def _factors(act: np.ndarray, weight: np.ndarray, axis: int, alpha: float) -> np.ndarray:
        act = np.maximum(act, 1e-5)
        wmax = np.maximum(np.abs(weight).max(axis=axis).astype(np.float64), 1e-5)
        return np.clip(act ** alpha / wmax ** (1.0 - alpha), 1e-4, 1e4)

    def smoothing_vector(self, site: Site, alpha: float) -> np.ndarray | None:
        """The SmoothQuant vector s of a linear site (shared by every site of its weight), or None."""
        inputs = self._smoothing_inputs(site)
        if inputs is None:
            return None
        s = self.shared_factors.get(self.weight_key(site))
        if s is None:
            cmin, cmax, weight, _ = inputs
            s = self._factors(np.maximum(np.abs(cmin), np.abs(cmax)), weight, site.weight_axis, alpha)
        return s

    def measure_smoothed(self, requests: list[tuple[str, gs.Tensor, np.ndarray]]) -> None:
        """Calibrate x / s for every (site name, x, s) on the float graph, so that ``method`` (percentile,
        entropy, mse) applies to the smoothed activations as it does to plain ones. 'max' needs no data:
        max(x / s) is max over channels of the table's channel max / s."""
        if self.method == "max" or not requests:
            return
        missing = [(key, tensor, s) for key, tensor, s in requests if (key, s.tobytes()) not in self.range_cache]
        if missing:
            if self.source is None:
                raise TqcError(f"qdq: method={self.method} with SmoothQuant measures the smoothed activations on the "
                               "calibration data, and a calibration table has only the unsmoothed ranges: give "
                               "--calib DATA, or use smooth=0 or method=max")
            from tqc.compiler.analysis.calibration import calibrate

            probe = self.graph.copy()  # shares the weight arrays
            tensors = probe.tensors()
            names = []
            for index, (_, tensor, s) in enumerate(missing):
                out = gs.Variable(f"tqc_smoothed_probe{index}", dtype=_float_type(tensor))
                probe.nodes.append(gs.Node("Mul", f"tqc_smoothed_probe{index}_Mul", inputs=[
                    tensors[tensor.name], gs.Constant(f"tqc_smoothed_probe{index}_factor",
                                                      (1.0 / s).astype(_float_type(tensor)))],
                    outputs=[out]))
                names.append(out.name)
            probe.toposort()
            table = calibrate(probe, self.source, names, model_hash="probe")
            for (key, _, s), name in zip(missing, names):
                self.range_cache[(key, s.tobytes())] = table.tensors[name]
        for key, _, s in requests:
            self.measured[key] = self.range_cache[(key, s.tobytes())]

    def _smoothed_range(self, key: str, lo: float, hi: float) -> tuple[float, float]:
        """The range of a smoothed activation: measured with ``method`` when it was, else [lo, hi] ('max')."""
        entry = self.measured.get(key)
        if entry is None:
            return lo, hi
        if self.target == "trt":
            amax = entry.symmetric(self.method, self.percentile)
            return -amax, amax
        return entry.asymmetric(self.method, self.percentile)

    def plan_shared_weights(self, sites: list[Site], alpha: float) -> int:
        """One smoothing vector for each weight that several linear sites use: from the channel-wise largest
        |activation| over all of them, so the one smoothed weight is exact for every consumer."""
        groups: dict[tuple[str, int], list[Site]] = {}
        for site in sites:
            if site.kind == "linear" and site.weight is not None:
                groups.setdefault(self.weight_key(site), []).append(site)
        shared = 0
        for key, members in groups.items():
            inputs = [self._smoothing_inputs(site) for site in members]
            inputs = [i for i in inputs if i is not None]
            if len(members) < 2 or len(inputs) < 2 or len({i[0].size for i in inputs}) > 1:
                continue
            act = np.max([np.maximum(np.abs(cmin), np.abs(cmax)) for cmin, cmax, _, _ in inputs], axis=0)
            self.shared_factors[key] = self._factors(act, inputs[0][2], key[1], alpha)
            shared += 1
        return shared

    def _range_params(self, lo: float, hi: float):
        """Scale and zero-point for the range [lo, hi]: symmetric INT8 for trt, asymmetric UINT8 for ORT."""
        if self.target == "trt":
            amax = max(abs(lo), abs(hi))
            return np.float32(max(amax, 1e-8) / 127.0), np.int8(0)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = np.float32(max(hi - lo, 1e-8) / 255.0)
        return scale, np.uint8(np.clip(round(-lo / float(scale)), 0, 255))

    def _params(self, name: str, fixed_amax: float | None = None):
        if fixed_amax is not None:
            return self._range_params(-fixed_amax, fixed_amax) if self.target == "trt" else \
                self._range_params(0.0, fixed_amax)
        entry = self.table.tensors[name]
        if self.target == "trt":
            amax = entry.symmetric(self.method, self.percentile)
            return self._range_params(-amax, amax)
        return self._range_params(*entry.asymmetric(self.method, self.percentile))

    def _qdq_pair(self, tensor: gs.Tensor, tag: str, scale, zero_point) -> gs.Variable:
        ftype = _float_type(tensor)  # FP16 graphs: float16 scales (opset 19), as TensorRT's strong typing wants
        self.float16 |= ftype is np.float16
        scale_c = gs.Constant(f"{tag}_scale", np.array(scale, ftype))
        zp_c = gs.Constant(f"{tag}_zero_point", np.array(zero_point))
        quantized = gs.Variable(f"{tag}_quantized", dtype=zp_c.values.dtype)
        dequantized = gs.Variable(f"{tag}_dequantized", dtype=ftype)
        self.graph.nodes += [
            gs.Node("QuantizeLinear", f"{tag}_QuantizeLinear", inputs=[tensor, scale_c, zp_c], outputs=[quantized]),
            gs.Node("DequantizeLinear", f"{tag}_DequantizeLinear", inputs=[quantized, scale_c, zp_c],
                    outputs=[dequantized]),
        ]
        return dequantized

    def fake_quantize(self, tensor: gs.Tensor, consumer: gs.Node, fixed_amax: float | None = None) -> gs.Tensor:
        """Q -> DQ of ``tensor``; shared per tensor for trt, dedicated per consumer for ORT."""
        key = tensor.name
        shared = self.target in ("trt", "openvino")  # one Q/DQ per tensor (openvino: one FakeQuantize)
        if shared and key in self.shared:
            return self.shared[key]
        if self.target == "openvino":
            from tqc.passes.qdq.openvino import activation_params

            entry = self.table.tensors[key] if fixed_amax is None else None
            scale, zero_point = activation_params(entry, consumer, self.method, self.percentile, fixed_amax)
        else:
            scale, zero_point = self._params(key, fixed_amax)
        self.counter += 1
        tag = f"{key}_tqc{self.counter}" if not shared else key
        dequantized = self._qdq_pair(tensor, tag, scale, zero_point)
        if shared:
            self.shared[key] = dequantized
        return dequantized

    def smooth(self, site: Site, alpha: float) -> bool:
        """SmoothQuant on one linear site: x' = x / s (a Mul), W' = diag(s) W, then quantize x' and W'.

        Exact in float. x' takes its range from the table's per-channel ranges divided by s (the 'max'
        method); returns False (plain quantization) when the table has no per-channel ranges. A weight that
        several sites share takes the vector ``plan_shared_weights`` made for all of them, and is smoothed and
        quantized once.
        """
        node = site.node
        tensor = node.inputs[0]
        inputs = self._smoothing_inputs(site)
        if inputs is None:
            return False
        cmin, cmax, weight, in_axis = inputs
        key = self.weight_key(site)
        s = self.smoothing_vector(site, alpha)
        lo, hi = self._smoothed_range(node.name, float((cmin / s).min()), float((cmax / s).max()))
        self.counter += 1
        tag = f"{node.name or tensor.name}_tqc_smooth{self.counter}"
        ftype = _float_type(tensor)
        scaled = gs.Variable(f"{tag}_input", dtype=ftype)
        self.graph.nodes.append(gs.Node("Mul", f"{tag}_Mul", inputs=[tensor, gs.Constant(f"{tag}_factor",
                                        (1.0 / s).astype(ftype))], outputs=[scaled]))
        node.inputs[0] = self._qdq_pair(scaled, tag, *self._range_params(lo, hi))
        cached = self.weight_outputs.get((*key, True)) if key in self.shared_factors else None
        if cached is not None:
            node.inputs[site.weight] = cached
            return True
        factor = s.astype(np.float32)
        node.inputs[site.weight] = gs.Constant(self.unique_name(f"{node.inputs[site.weight].name}_smoothed"),
                                               np.asarray(weight, np.float32) *
                                               (factor[:, None] if in_axis == 0 else factor[None, :]))
        self.quantize_weight(site, _float_type_of_array(weight))
        if key in self.shared_factors:
            self.weight_outputs[(*key, True)] = node.inputs[site.weight]
        return True

    def qattention_vector(self, node: gs.Node, alpha: float) -> np.ndarray | None:
        """The smoothing vector of a fused Attention's input (ones when alpha is 0), or None."""
        entry = self.table.tensors.get(node.inputs[0].name)
        weight = constant_values(node.inputs[1])
        if entry is None or weight is None or entry.channel_min is None:
            return None
        weight = weight.astype(np.float64)
        s = np.ones(weight.shape[0])
        if alpha > 0:
            cmin = np.asarray(entry.channel_min, np.float64)
            cmax = np.asarray(entry.channel_max, np.float64)
            act = np.maximum(np.maximum(np.abs(cmin), np.abs(cmax)), 1e-5)
            s = np.clip(act ** alpha / np.maximum(np.abs(weight).max(axis=1), 1e-5) ** (1.0 - alpha), 1e-4, 1e4)
        return s

    def qattention(self, node: gs.Node, alpha: float) -> bool:
        """com.microsoft Attention -> [Mul(1/s)] -> QuantizeLinear(u8) -> QAttention(INT8 per-column weights)."""
        x = node.inputs[0]
        entry = self.table.tensors.get(x.name)
        weight = constant_values(node.inputs[1])
        bias = constant_values(node.inputs[2]) if len(node.inputs) > 2 else None
        if entry is None or weight is None or bias is None or entry.channel_min is None:
            return False
        if _float_type(x) is np.float16:
            return False  # ORT's QAttention takes float32 only
        cmin = np.asarray(entry.channel_min, np.float64)
        cmax = np.asarray(entry.channel_max, np.float64)
        weight = weight.astype(np.float64)
        s = self.qattention_vector(node, alpha)
        lo, hi = self._smoothed_range(node.name, float((cmin / s).min()), float((cmax / s).max()))
        scale, zero_point = self._range_params(lo, hi)
        self.counter += 1
        tag = f"{node.name}_tqc_q{self.counter}"
        source = x
        if alpha > 0:
            source = gs.Variable(f"{tag}_input", dtype=np.float32)
            self.graph.nodes.append(gs.Node("Mul", f"{tag}_Mul", inputs=[x, gs.Constant(
                f"{tag}_factor", (1.0 / s).astype(np.float32))], outputs=[source]))
        quantized = gs.Variable(f"{tag}_quantized", dtype=np.uint8)
        scale_c = gs.Constant(f"{tag}_scale", np.array(scale, np.float32))
        zp_c = gs.Constant(f"{tag}_zero_point", np.array(zero_point, np.uint8))
        self.graph.nodes.append(gs.Node("QuantizeLinear", f"{tag}_QuantizeLinear", inputs=[source, scale_c, zp_c],
                                        outputs=[quantized]))
        q_weight, w_scale = _quantize_weight((weight * s[:, None]).astype(np.float32), 1)
        mask = node.inputs[3] if len(node.inputs) > 3 else gs.Variable.empty()
        inputs = [quantized, gs.Constant(f"{tag}_weight_int8", q_weight), gs.Constant(f"{tag}_bias", bias.astype(np.float32)),
                  scale_c, gs.Constant(f"{tag}_weight_scale", w_scale), mask, zp_c,
                  gs.Constant(f"{tag}_weight_zero_point", np.zeros(w_scale.shape, np.int8))]
        out = node.outputs[0]
        node.outputs = [gs.Variable(f"{out.name}_tqc_detached")]
        attrs = {"num_heads": node.attrs["num_heads"]}
        self.graph.nodes.append(gs.Node("QAttention", f"{tag}_QAttention", domain="com.microsoft", attrs=attrs,
                                        inputs=inputs, outputs=[out]))
        return True

    def quantize_weight(self, site: Site, ftype: type | None = None) -> None:
        """Per-channel INT8 weight and its DequantizeLinear (scales in ``ftype``, else the weight's own float
        type); a weight several sites share is quantized once."""
        weight = site.node.inputs[site.weight]
        ftype = ftype or _float_type(weight)
        self.float16 |= ftype is np.float16
        key = (weight.name, site.weight_axis, False)
        if key in self.weight_outputs:
            site.node.inputs[site.weight] = self.weight_outputs[key]
            return
        values = np.asarray(constant_values(weight), np.float32)
        q, scale = _quantize_weight(values, site.weight_axis)
        name = self.unique_base(weight.name, ("_int8", "_scale", "_zero_point", "_dequantized"))
        q_c = gs.Constant(f"{name}_int8", q)
        s_c = gs.Constant(f"{name}_scale", scale.astype(ftype))
        zp_c = gs.Constant(f"{name}_zero_point", np.zeros(scale.shape, np.int8))
        out = gs.Variable(f"{name}_dequantized", dtype=ftype)
        self.graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_DequantizeLinear",
                                        attrs={"axis": site.weight_axis}, inputs=[q_c, s_c, zp_c], outputs=[out]))
        site.node.inputs[site.weight] = out
        self.weight_outputs[key] = out


@register
class Qdq(Pass):
    """Insert Q/DQ from a calibration table (INT8), placed per target, with optional accuracy budget."""

    name = "qdq"
    requires = (Condition("calibration data", lambda graph, ctx: None if ctx.has_calibration() else
                          "give --calib DATA or --calib-table TABLE", on="context"),)
    ensures = (NO_CONTRIB_OPS,
               Condition("a DequantizeLinear after every QuantizeLinear", lambda graph, ctx: next(
                   (f"'{n.name}' feeds no DequantizeLinear" for n in graph.nodes if n.op == "QuantizeLinear" and
                    n.outputs and not any(c.op in ("DequantizeLinear", "QAttention") for c in n.outputs[0].outputs)),
                   None)))
    options = {
        "method": Option(str, "max", "activation range: max, percentile, entropy, mse",
                         choices=("max", "percentile", "entropy", "mse")),
        "percentile": Option(float, 99.99, "percentile for method=percentile (99.9, 99.99 or 99.999)",
                             min=90, max=100),  # below 90 clipping saturates a tenth of the values: no range
        "exclude": Option(parse_list, [], "node-name patterns to keep in float ('|'-separated, fnmatch)"),
        "op_types": Option(parse_list, ["MatMul", "Gemm"], "op types to quantize"),
        "residual": Option(parse_bool, False, "trt: also quantize both inputs of residual Adds"),
        "attention": Option(parse_bool, True, "trt: quantize the attention batched MatMuls (INT8 MHA)"),
        "budget": Option(float, 0.0, "minimum mean output cosine on the calibration data (0: off)",
                         min=0, max=1),
        "budget_runtime": Option(str, "ort", "engine the budget step measures on: ort (ORT CPU, optimizations off) "
                                 "or openvino (OpenVINO CPU: its own INT8 kernels)", choices=("ort", "openvino")),
        "qattention": Option(str, "auto", "ORT targets: quantize fused Attention ops as com.microsoft "
                             "QAttention (INT8 QKV projection inside ORT's fused attention kernel) instead of "
                             "expanding them into a quantizable MatMul; 'auto': on ort-cpu (1.1x faster there) "
                             "unless a budget is set (the budget step can return any QKV projection to float only "
                             "in the expanded form)",
                             choices=("auto", "true", "false")),
        "smooth": Option(float, 0.75, "SmoothQuant strength alpha in [0, 1] (0: off): per-channel factors move "
                         "activation outliers into the weights; the activation range then comes from the "
                         "table's per-channel ranges", min=0, max=1),
        "shared_weights": Option(str, "share", "a weight several MatMuls use (ALBERT's layers): 'share' smooths it "
                                 "once for all of them (one vector from the union of their activation ranges) and "
                                 "keeps one INT8 copy; 'copy' gives every consumer its own smoothed INT8 copy",
                                 choices=("share", "copy")),
    }
    # Quantization is judged statistically, not elementwise: outputs must keep this cosine to the float graph.
    tolerance = Tolerance(atol=math.inf, rtol=math.inf, min_cosine=0.98)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # Histograms only when the range method needs them: 'max' reads the data once.
        ctx.calibration_table(graph, histograms=self.values["method"] != "max")
        self.state = QdqState()
        notes: list[str] = []
        stats_extra = {}
        if self.values["budget"] > 0:
            sites = self.place(graph, ctx, notes, skip=set())
            if sites:
                from tqc.passes.qdq.budget import enforce_budget

                kept = enforce_budget(self, graph, ctx, sites)
                stats_extra = {"kept_float_by_budget": len(kept), "budget_full_cosine": round(self.state.full_cosine, 6)}
                if kept:
                    ctx.note("qdq: kept in float by the accuracy budget: " + ", ".join(kept))
            notes.clear()  # apply() places again and says the same
        stats = self.apply(graph, ctx, notes, skip=set(self.state.skip))
        stats.update(stats_extra)
        for note in notes:
            ctx.note(note)
        return PassResult(stats["quantized_matmuls"] > 0 or stats.get("attention_expanded", 0) > 0, stats)

    def place(self, graph: gs.Graph, ctx: PassContext, notes: list[str], skip: set[str]) -> list[Site]:
        excluded = {n.name for n in graph.nodes if n.op == "Attention" and n.domain == "com.microsoft" and
                    any(fnmatch.fnmatch(n.name, pattern) for pattern in self.values["exclude"])}
        float_prefixes = []  # expanded excluded attentions: their QKV projection stays float
        if self.uses_qattention(ctx.target):
            quantizer = self.quantizer(graph, ctx)
            attentions = [n for n in graph.nodes if n.op == "Attention" and n.domain == "com.microsoft"
                          and n.name not in skip and n.name not in excluded and len(n.inputs) > 2]
            vectors = [(n, quantizer.qattention_vector(n, self.values["smooth"])) for n in attentions]
            quantizer.measure_smoothed([(n.name, n.inputs[0], v) for n, v in vectors
                                        if v is not None and constant_values(n.inputs[2]) is not None])
            for node in [n for n in graph.nodes if n.op == "Attention" and n.domain == "com.microsoft"]:
                if node.name not in skip and node.name not in excluded and \
                        quantizer.qattention(node, self.values["smooth"]):
                    self.state.qattention += 1
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if ctx.target not in ("trt", "openvino") and \
                any(n.op == "Attention" and n.domain == "com.microsoft" for n in graph.nodes):
            masks = MaskCache(graph)
            for index, node in enumerate([n for n in graph.nodes if n.op == "Attention" and n.domain == "com.microsoft"]):
                if _float_type(node.inputs[0]) is np.float16:
                    # the expansion is written in float32; in an FP16 graph the fused op stays, its QKV in FP16
                    notes.append(f"qdq: '{node.name}' runs in FP16 (fused Attention of an FP16 graph): its QKV "
                                 "projection stays FP16")
                    continue
                if node.name in excluded:
                    notes.append(f"qdq: '{node.name}' excluded by pattern: its QKV projection stays float")
                    float_prefixes.append(f"tqc_xattn{index}_")
                expand_ort_attention(graph, node, index, masks)
                self.state.attention_expanded += 1
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        bound = graph_sequence_bound(graph, ctx) if ctx.target == "trt" and self.values["attention"] else (None, "")
        sites = _matmul_sites(graph, self.values["op_types"], ctx.target, self.values["attention"], notes, bound)
        chosen = []
        for site in sites:
            if not site.eligible:
                continue
            if any(site.node.name.startswith(prefix) for prefix in float_prefixes):
                continue
            if any(fnmatch.fnmatch(site.node.name, pattern) for pattern in self.values["exclude"]):
                notes.append(f"qdq: '{site.node.name}' excluded by pattern")
                continue
            if site.node.name in skip:
                continue
            if all(_is_dq(site.node.inputs[i]) for i in site.activations):
                continue  # already quantized: running qdq twice changes nothing
            missing = [site.node.inputs[i].name for i in site.activations
                       if site.node.inputs[i].name not in ctx.calibration.tensors and not self._fixed(site, i)]
            if missing:
                notes.append(f"qdq: '{site.node.name}' input '{missing[0]}' is not in the calibration table; "
                             "left in float")
                continue
            chosen.append(site)
        return chosen

    def quantizer(self, graph: gs.Graph, ctx: PassContext) -> Quantizer:
        quantizer = Quantizer(graph, ctx.calibration, ctx.target, self.values["method"], self.values["percentile"])
        quantizer.source = ctx.calibration_source
        quantizer.range_cache = self.state.smoothed_ranges
        return quantizer

    def uses_qattention(self, target: str) -> bool:
        choice = str(self.values["qattention"]).lower()
        if target in ("trt", "openvino") or choice == "false":
            return False
        return choice == "true" or (target == "ort-cpu" and not self.values["budget"] > 0)

    @staticmethod
    def _fixed(site: Site, index: int) -> float | None:
        """Softmax outputs lie in [0, 1]: their range needs no calibration."""
        node = producer(site.node.inputs[index])
        return 1.0 if node is not None and node.op == "Softmax" else None

    def apply(self, graph: gs.Graph, ctx: PassContext, notes: list[str], skip: set[str]) -> dict:
        sites = self.place(graph, ctx, notes, skip)
        all_sites = _matmul_sites(graph, self.values["op_types"], ctx.target, self.values["attention"], [])
        total_flops = sum(s.flops_per_token for s in all_sites)
        # QAttention: an INT8 QKV projection, and the two batched MatMuls in float inside ORT's kernel.
        qattention_int8 = 0.0
        for node in graph.nodes:
            if node.op == "QAttention":
                k, n = constant_values(node.inputs[1]).shape
                qattention_int8 += 2.0 * k * n
                total_flops += 2.0 * k * n + 2 * 2.0 * FLOP_TOKENS * (n // 3)
        quantizer = self.quantizer(graph, ctx)
        int8_flops = qattention_int8
        smoothed = 0
        if self.values["smooth"] > 0 and self.values["shared_weights"] == "share":
            quantizer.plan_shared_weights(sites, self.values["smooth"])
        if self.values["smooth"] > 0:
            vectors = [(site, quantizer.smoothing_vector(site, self.values["smooth"])) for site in sites
                       if site.kind == "linear"]
            quantizer.measure_smoothed([(site.node.name, site.node.inputs[0], v) for site, v in vectors if v is not None])
        for site in sites:
            if self.values["smooth"] > 0 and site.kind == "linear" and quantizer.smooth(site, self.values["smooth"]):
                smoothed += 1
                int8_flops += site.flops_per_token
                continue
            for index in site.activations:
                tensor = site.node.inputs[index]
                site.node.inputs[index] = quantizer.fake_quantize(tensor, site.node, self._fixed(site, index))
            if site.weight is not None and not _is_dq(site.node.inputs[site.weight]):
                quantizer.quantize_weight(site)
            int8_flops += site.flops_per_token
        residuals = 0
        if ctx.target == "trt" and self.values["residual"]:
            for node in [n for n in graph.nodes if n.op == "Add"]:
                a, b = node.inputs
                if isinstance(a, gs.Variable) and isinstance(b, gs.Variable) and \
                        a.name in ctx.calibration.tensors and b.name in ctx.calibration.tensors and \
                        not _is_dq(a) and not _is_dq(b):
                    node.inputs[0] = quantizer.fake_quantize(a, node)
                    node.inputs[1] = quantizer.fake_quantize(b, node)
                    residuals += 1
        concats = _equalize_concat_scales(graph)
        if quantizer.float16 and raise_opset(graph):
            notes.append(f"qdq: opset raised to {QDQ_FP16_OPSET}: Q/DQ of float16 tensors take float16 scales")
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return {
            "quantized_matmuls": len(sites),
            "linear": sum(1 for s in sites if s.kind == "linear"),
            "attention_bmm": sum(1 for s in sites if s.kind == "attention"),
            "float_matmuls": len(all_sites) - len(sites),
            "residual_adds": residuals,
            "concat_equalized": concats,
            "smoothed": smoothed,
            "q_nodes": sum(1 for n in graph.nodes if n.op == "QuantizeLinear"),
            "dq_nodes": sum(1 for n in graph.nodes if n.op == "DequantizeLinear"),
            "int8_matmul_flops": round(int8_flops / total_flops, 4) if total_flops else 0.0,
            "attention_expanded": self.state.attention_expanded,
            "qattention": sum(1 for n in graph.nodes if n.op == "QAttention"),
            "method": self.values["method"] + (f":{self.values['percentile']:g}" if self.values["method"] == "percentile" else ""),
        }


def _equalize_concat_scales(graph: gs.Graph) -> int:
    """Concat of dequantized inputs: give every input the largest scale, so TensorRT can concat in INT8."""
    count = 0
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        dqs = [producer(t) for t in node.inputs]
        if not dqs or any(d is None or d.op != "DequantizeLinear" or len(d.inputs) < 2 for d in dqs):
            continue
        scales = [constant_values(d.inputs[1]) for d in dqs]
        if any(s is None or s.size != 1 for s in scales):
            continue
        largest = max(float(s.reshape(-1)[0]) for s in scales)
        for d in dqs:
            q = producer(d.inputs[0])
            for holder in (d, q):
                if holder is not None and len(holder.inputs) > 1:
                    holder.inputs[1] = gs.Constant(f"{holder.name}_equalized_scale",
                                                   np.array(largest, constant_values(holder.inputs[1]).dtype))
        count += 1
    return count
