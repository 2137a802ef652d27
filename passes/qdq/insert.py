"""The rewrite half of ``qdq``: apply a ``QdqPlan`` (``tqc.passes.qdq.plan``) to the float graph.

Before                                 After (--target trt)
  x ─► MatMul(W) ─► y                    x ─► Q(s_x, 0) ─► DQ ─► MatMul ─► y
                                         W_int8 ─► DQ(s_w per output channel, axis 1) ─┘
  probs ─► MatMul(V)                     probs ─► Q/DQ ─► MatMul ◄─ DQ ◄─ Q ◄─ V   (INT8 MHA: head size 16/32/64)

After (--target ort-cpu|ort-cuda)
  x ─► Q(u8, s, zp) ─► DQ ─► MatMul      one Q/DQ pair per consumer (ORT fuses DQ->MatMul into
  W_int8 ─► DQ(axis 1) ───────┘          MatMulIntegerToFloat)
  x ─► Attention(W, b)                   x ─► [Mul(1/s)] ─► Q(u8) ─► QAttention(W·diag(s) INT8, b)  (QAttention sites)

SmoothQuant (``smooth`` > 0): x ─► Mul(1/s) ─► Q/DQ ─► MatMul ◄─ DQ(INT8 of diag(s)·W): exact in float.
Shared weights (ALBERT's layers): x1 ─► Mul(1/s) ─► Q/DQ ─► MatMul ◄─ DQ(W·diag(s) INT8) ─► MatMul ◄─ Q/DQ ◄─
Mul(1/s) ◄─ x2, one s from the union of both consumers' ranges, one INT8 copy (``shared_weights=copy``: one
per consumer). trt ``residual``: both inputs of the planned Adds get Q/DQ. Concat of dequantized inputs: every
input takes the largest scale (TensorRT concatenates in INT8). FP16 graphs: scales take the float type of the
tensor they quantize (float16, opset 19).

The order is that of the single-step pass this replaced, so the compiled bytes are the same: QAttention
sites first (then cleanup), then the remaining attentions are expanded (``tqc.passes.qdq.lower``), then the
MatMul sites are quantized in the order of the lowered graph, then residual Adds and Concat scales.

Smoothed ranges are measured here, not in the plan: with ``method`` other than ``max`` the range of x / s is
calibrated on a probe of the graph as the insertion has left it at that point (QAttention sites already
converted, attentions expanded), and s itself depends on how shared weights are smoothed, which is how to
quantize, not where. The plan stays a function of the graph and the table; the measured ranges are cached by
(site, s) across the budget's candidates (``range_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.calibration import CalibrationTable, TensorRange
from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import Target
from tqc.passes.fp16 import QDQ_FP16_OPSET, raise_opset
from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.qdq.lower import is_ort_attention, lower
from tqc.passes.qdq.openvino import activation_params
from tqc.passes.qdq.refine import (ALPHA_TOKENS, ALPHAS, bias_shift, gptq_round, layer_error,
                                    per_channel_scale, round_nearest)
from tqc.passes.qdq.plan import (ATTENTION, LINEAR, PlannedSite, QdqPlan, float_type, is_dq, qattention_node_name,
                                 qattention_tag)
from tqc.passes.rewrite import cleanup, produce, rebase, replace_output


@dataclass
class Site:
    """A planned site bound to its node in the graph being rewritten."""

    node: gs.Node
    planned: PlannedSite

    @property
    def kind(self) -> str:
        return self.planned.kind

    @property
    def activations(self) -> tuple[int, ...]:
        return self.planned.activations

    @property
    def weight(self) -> int | None:
        return self.planned.weight

    @property
    def weight_axis(self) -> int:
        return self.planned.weight_axis

    @property
    def flops_per_token(self) -> float:
        return self.planned.flops_per_token


@dataclass(frozen=True)
class InsertOptions:
    """How to quantize the planned sites (``qdq``'s options that are not about where)."""

    method: str = "max"
    percentile: float = 99.99
    smooth: float = 0.75
    shared_weights: str = "share"
    smooth_search: bool = False   # SmoothQuant alpha per layer from ``refine.ALPHAS`` (needs smooth > 0)
    rounding: str = "nearest"     # INT8 weight codes: nearest, or gptq (on the calibration data)
    bias_correct: bool = False    # shift each linear layer's bias by its mean output error
    shift: bool = False           # center each smoothed input channel before quantizing (Outlier Suppression+)
    smooth_cap: float = 1.0       # cap smoothed channel ranges at this quantile of them, per layer where it helps

    @property
    def needs_samples(self) -> bool:
        """Whether a refinement needs token samples of the layer inputs (``analysis.layer_inputs``)."""
        return self.smooth_search or self.rounding == "gptq" or self.bias_correct or \
            (self.smooth_cap < 1 and self.smooth > 0)


def _code_range(zero_point) -> tuple[int, int]:
    """(qmin, qmax) of the integer type of a zero point (UINT8 or INT8)."""
    info = np.iinfo(np.asarray(zero_point).dtype)
    return int(info.min), int(info.max)


def float_type_of_array(values: np.ndarray) -> type:
    return np.float16 if values.dtype == np.float16 else np.float32


def quantize_weight_array(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
    amax = np.abs(values).max(axis=reduce_axes)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    scaled = values / scale.reshape(shape)  # the one float temporary: rounded and clipped in place
    np.round(scaled, out=scaled)
    np.clip(scaled, -127, 127, out=scaled)
    return scaled.astype(np.int8), scale


class Quantizer:
    """Writes Q/DQ pairs, INT8 weights, SmoothQuant Muls and QAttention nodes into one graph, with names no
    tensor of the graph has yet."""

    def __init__(self, graph: gs.Graph, table: CalibrationTable, target: Target, method: str, percentile: float):
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
        # (site, s) -> (the method's range of x / s, kept: it beats 'max' at the layer output); across insert() calls
        self.range_cache: dict[tuple[str, bytes], tuple[TensorRange, bool]] = {}
        self.measured: dict[str, TensorRange | None] = {}
        self.plain: dict[str, bool] = {}  # unsmoothed tensor -> the method's range kept (else 'max')
        self.float16 = False  # a float16 tensor was quantized: the graph needs opset 19
        # Refinements on token samples of the layer inputs (tensor name -> float32 [T, K]; empty: none)
        self.samples: dict[str, np.ndarray] = {}
        self.alphas: dict[str, float] = {}        # node name -> SmoothQuant alpha chosen for it
        self.caps: dict[str, float] = {}          # node name -> the range cap chosen for it (1: none)
        self.smooth_cap = 1.0                     # the cap tried on every layer with a sample (``smooth_cap``)
        self.smooth_search = False                # alpha chosen per layer from ``ALPHAS``
        self.codes: dict[bytes, np.ndarray] = {}  # GPTQ codes by (weight, input sample) digest: kept across calls
        self.rounding = "nearest"
        self.bias_correct = False
        self.multi_use: set[str] = set()          # weights several sites share: rounded to nearest
        self.shift = False                        # channel-wise shift of smoothed inputs (``shift_vector``)
        self.refined = {"alpha": 0, "gptq": 0, "bias": 0, "shift": 0, "cap": 0}
        self.activations: dict[tuple[str, str], tuple] = {}  # (tensor, consumer) -> its Q's (scale, zero point)

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
        z = self.shift_vector(site.node, cmin, cmax, weight.shape[site.weight_axis])
        if z is not None:
            cmin, cmax = cmin - z, cmax - z
        return cmin, cmax, weight, in_axis

    def input_shift(self, site: Site) -> np.ndarray | None:
        """The shift z of a linear site's input (``shift_vector``), or None."""
        entry = self.table.tensors.get(site.node.inputs[0].name)
        weight = constant_values(site.node.inputs[site.weight]) if site.weight is not None else None
        if entry is None or entry.channel_min is None or weight is None or weight.ndim != 2:
            return None
        return self.shift_vector(site.node, entry.channel_min, entry.channel_max, weight.shape[site.weight_axis])

    def shift_vector(self, node: gs.Node, cmin: np.ndarray, cmax: np.ndarray, outputs: int) -> np.ndarray | None:
        """Outlier Suppression+'s channel-wise shift z = (max + min) / 2 of a linear layer's input, with ``shift``
        on: x - z is centred on zero in every channel, so a symmetric range (trt's INT8 activations) spends its
        codes on the values there are, and z W moves into the layer's bias (exact in float). None where it
        cannot apply: shift off, a weight several sites share, or no bias of the layer's N outputs to hold z W."""
        if not self.shift or node.inputs[1].name in self.multi_use:
            return None
        holder = (node, 2) if is_ort_attention(node) and len(node.inputs) > 2 and \
            constant_values(node.inputs[2]) is not None else bias_holder(node)
        if holder is None or np.asarray(constant_values(holder[0].inputs[holder[1]])).shape != (outputs,):
            return None
        return (np.asarray(cmin, np.float64) + np.asarray(cmax, np.float64)) / 2.0

    @staticmethod
    def _factors(act: np.ndarray, weight: np.ndarray, axis: int, alpha: float, cap: float = 1.0) -> np.ndarray:
        """SmoothQuant's s = act^alpha / max|W row|^(1 - alpha); with ``cap`` < 1, every channel whose smoothed
        range act / s passes the ``cap`` quantile of the layer's smoothed ranges takes the s that brings it down
        to that quantile (``smooth_cap``: MiniLM's FFN output layers keep one GELU channel at 3x the next)."""
        act = np.maximum(act, 1e-5)
        wmax = np.maximum(np.abs(weight).max(axis=axis).astype(np.float64), 1e-5)
        s = np.clip(act ** alpha / wmax ** (1.0 - alpha), 1e-4, 1e4)
        if cap < 1:
            ranges = act / s
            s = np.clip(s * np.maximum(1.0, ranges / max(float(np.quantile(ranges, cap)), 1e-12)), 1e-4, 1e4)
        return s

    def smoothing_vector(self, site: Site, alpha: float) -> np.ndarray | None:
        """The SmoothQuant vector s of a linear site (shared by every site of its weight), or None."""
        inputs = self._smoothing_inputs(site)
        if inputs is None:
            return None
        s = self.shared_factors.get(self.weight_key(site))
        if s is None:
            cmin, cmax, weight, _ = inputs
            s = self._factors(np.maximum(np.abs(cmin), np.abs(cmax)), weight, site.weight_axis,
                              self.alphas.get(site.node.name, alpha), self.caps.get(site.node.name, 1.0))
        return s

    def smoothed_weight(self, site: Site, s: np.ndarray) -> np.ndarray:
        """diag(s) W of a linear site as [K, N] (a Gemm's transposed weight turned back), in float."""
        _, _, weight, in_axis = self._smoothing_inputs(site)
        weight = np.asarray(weight, np.float32)
        return weight * s[:, None].astype(np.float32) if in_axis == 0 else (weight * s[None, :].astype(np.float32)).T

    def measure_smoothed(self, requests: list[tuple[str, gs.Tensor, np.ndarray, np.ndarray, np.ndarray | None]]
                         ) -> None:
        """Calibrate x / s (with ``shift``: (x - z) / s) for every (site name, x, s, smoothed weight [K, N], z or
        None) on the graph, so that ``method``
        (percentile, entropy, mse) applies to the smoothed activations as it does to plain ones, then keep the
        method's range only where it lowers the error at the layer's output, ||(Q/DQ(x/s) - x/s) @ W'||^2 over
        the calibration data, below the 'max' range's. A clipping method is right for a tensor whose extremes
        are rare noise (a GELU output) and wrong for one whose extremes carry the signal (a LayerNorm output
        feeding attention); the layer's output error tells them apart per tensor. 'max' needs no data:
        max(x / s) is max over channels of the table's channel max / s."""
        if self.method == "max" or not requests:
            return
        missing = [r for r in requests if (r[0], _vector_key(r[2], r[4])) not in self.range_cache]
        if missing:
            if self.source is None:
                raise TqcError(f"qdq: method={self.method} with SmoothQuant measures the smoothed activations on the "
                               "calibration data, and a calibration table has only the unsmoothed ranges: give "
                               "--calib DATA, or use smooth=0 or method=max")
            from tqc.compiler.analysis.calibration import calibrate, range_output_errors

            probe = self.graph.copy()  # shares the weight arrays
            tensors = probe.tensors()
            names = []
            for index, (_, tensor, s, _, z) in enumerate(missing):
                out = gs.Variable(f"tqc_smoothed_probe{index}", dtype=float_type(tensor))
                probe.nodes.append(gs.Node("Mul", f"tqc_smoothed_probe{index}_Mul", inputs=[
                    tensors[tensor.name], gs.Constant(f"tqc_smoothed_probe{index}_factor",
                                                      (1.0 / s).astype(float_type(tensor)))],
                    outputs=[out]))
                if z is not None:
                    scaled, out = out, gs.Variable(f"tqc_shifted_probe{index}", dtype=float_type(tensor))
                    probe.nodes.append(gs.Node("Add", f"tqc_shifted_probe{index}_Add", inputs=[
                        scaled, gs.Constant(f"tqc_shifted_probe{index}_shift", (-z / s).astype(float_type(tensor)))],
                        outputs=[out]))
                names.append(out.name)
            probe.toposort()
            table = calibrate(probe, self.source, names, model_hash="probe", percentiles=(self.percentile,))
            candidates = {}
            for (_, tensor, s, weight, z), name in zip(missing, names):
                max_range = self._range_params(*self._max_smoothed_range(tensor, s, z))
                method_range = self._range_params(*self._method_range(table.tensors[name]))
                candidates[name] = (np.asarray(weight, np.float32),
                                    [(float(scale), int(zp), *_code_range(zp)) for scale, zp in (max_range, method_range)])
            errors = range_output_errors(probe, self.source, candidates)
            for (key, _, s, _, z), name in zip(missing, names):
                self.range_cache[(key, _vector_key(s, z))] = (table.tensors[name], errors[name][1] < errors[name][0])
        for key, _, s, _, z in requests:
            entry, kept = self.range_cache[(key, _vector_key(s, z))]
            self.measured[key] = entry if kept else None

    def _max_smoothed_range(self, tensor: gs.Tensor, s: np.ndarray, z: np.ndarray | None = None
                            ) -> tuple[float, float]:
        """The 'max' range of (x - z) / s: from the table's per-channel ranges of x."""
        entry = self.table.tensors[tensor.name]
        z = 0.0 if z is None else z
        return (float(((np.asarray(entry.channel_min, np.float64) - z) / s).min()),
                float(((np.asarray(entry.channel_max, np.float64) - z) / s).max()))

    def _method_range(self, entry: TensorRange, method: str | None = None) -> tuple[float, float]:
        """The range ``method`` (default: the pass's) gives a tensor, symmetric where the target wants it."""
        method = method or self.method
        if self.target.symmetric_int8_activations:
            amax = entry.symmetric(method, self.percentile)
            return -amax, amax
        return entry.asymmetric(method, self.percentile)

    def check_plain_ranges(self, sites: list[Site]) -> None:
        """The unsmoothed inputs of linear sites: keep the method's range of a tensor only where it lowers the
        summed error at the outputs of the linear layers it feeds (on the calibration data) below 'max''s."""
        if self.method == "max" or self.source is None:
            return
        groups: dict[str, list[np.ndarray]] = {}
        for site in sites:
            tensor = site.node.inputs[0]
            weight = constant_values(site.node.inputs[site.weight]) if site.weight is not None else None
            if site.kind == LINEAR and weight is not None and weight.ndim == 2 and tensor.name in self.table.tensors:
                weight = np.asarray(weight, np.float32)
                groups.setdefault(tensor.name, []).append(weight if site.weight_axis == 1 else weight.T)
        missing = {name: np.concatenate(weights, axis=1) for name, weights in groups.items()
                   if (f"plain:{name}", b"") not in self.range_cache}
        if missing:
            from tqc.compiler.analysis.calibration import range_output_errors

            candidates = {}
            for name, weight in missing.items():
                entry = self.table.tensors[name]
                params = [self._range_params(*self._method_range(entry, m)) for m in ("max", self.method)]
                candidates[name] = (weight, [(float(scale), int(zp), *_code_range(zp)) for scale, zp in params])
            errors = range_output_errors(self.graph.copy(), self.source, candidates)
            for name in missing:
                self.range_cache[(f"plain:{name}", b"")] = (self.table.tensors[name], errors[name][1] < errors[name][0])
        for name in groups:
            self.plain[name] = self.range_cache[(f"plain:{name}", b"")][1]

    def tensor_method(self, name: str) -> str:
        """The range method of an unsmoothed tensor: 'max' where ``check_plain_ranges`` found it better."""
        return "max" if self.plain.get(name) is False else self.method

    def _smoothed_range(self, key: str, lo: float, hi: float) -> tuple[float, float]:
        """The range of a smoothed activation: the method's where it was measured and kept, else [lo, hi]
        ('max')."""
        entry = self.measured.get(key)
        return (lo, hi) if entry is None else self._method_range(entry)

    def method_sites(self) -> tuple[int, int]:
        """(sites that take the method's range, sites measured for it)."""
        decisions = [e is not None for e in self.measured.values()] + list(self.plain.values())
        return sum(decisions), len(decisions)

    def plan_shared_weights(self, sites: list[Site], alpha: float) -> int:
        """One smoothing vector for each weight that several linear sites use: from the channel-wise largest
        |activation| over all of them, so the one smoothed weight is exact for every consumer."""
        groups: dict[tuple[str, int], list[Site]] = {}
        for site in sites:
            if site.kind == LINEAR and site.weight is not None:
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
        """Scale and zero-point for the range [lo, hi]: symmetric INT8 where the target wants it (trt), else
        asymmetric UINT8."""
        if self.target.symmetric_int8_activations:
            amax = max(abs(lo), abs(hi))
            return np.float32(max(amax, 1e-8) / 127.0), np.int8(0)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = np.float32(max(hi - lo, 1e-8) / 255.0)
        return scale, np.uint8(np.clip(round(-lo / float(scale)), 0, 255))

    def _params(self, name: str, fixed_amax: float | None = None):
        if fixed_amax is not None:
            return self._range_params(-fixed_amax, fixed_amax) if self.target.symmetric_int8_activations else \
                self._range_params(0.0, fixed_amax)
        return self._range_params(*self._method_range(self.table.tensors[name], self.tensor_method(name)))

    def _qdq_pair(self, tensor: gs.Tensor, tag: str, scale, zero_point) -> gs.Variable:
        ftype = float_type(tensor)  # FP16 graphs: float16 scales (opset 19), as TensorRT's strong typing wants
        self.float16 |= ftype is np.float16
        scale_c = gs.Constant(f"{tag}_scale", np.array(scale, ftype))
        zp_c = gs.Constant(f"{tag}_zero_point", np.array(zero_point))
        quantized = gs.Variable(f"{tag}_quantized", dtype=zp_c.values.dtype)
        dequantized = gs.Variable(f"{tag}_dequantized", dtype=ftype)
        produce(self.graph, "QuantizeLinear", f"{tag}_QuantizeLinear", [tensor, scale_c, zp_c], [quantized])
        produce(self.graph, "DequantizeLinear", f"{tag}_DequantizeLinear", [quantized, scale_c, zp_c], [dequantized])
        return dequantized

    def fake_quantize(self, tensor: gs.Tensor, consumer: gs.Node, fixed_amax: float | None = None) -> gs.Tensor:
        """Q -> DQ of ``tensor``; shared per tensor for trt, dedicated per consumer for ORT."""
        key = tensor.name
        shared = not self.target.qdq_per_consumer  # one Q/DQ per tensor (openvino: one FakeQuantize)
        if shared and key in self.shared:
            self.activations[(key, consumer.name)] = self.activations[(key, "")]
            return self.shared[key]
        if self.target.activation_form_by_consumer:
            entry = self.table.tensors[key] if fixed_amax is None else None
            scale, zero_point = activation_params(entry, consumer, self.tensor_method(key), self.percentile, fixed_amax)
        else:
            scale, zero_point = self._params(key, fixed_amax)
        self.counter += 1
        tag = f"{key}_tqc{self.counter}" if not shared else key
        self.activations[(key, consumer.name)] = self.activations[(key, "")] = (scale, zero_point)
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
        ftype = float_type(tensor)
        scaled = gs.Variable(f"{tag}_input", dtype=ftype)
        produce(self.graph, "Mul", f"{tag}_Mul", [tensor, gs.Constant(f"{tag}_factor", (1.0 / s).astype(ftype))],
                [scaled])
        z = self.input_shift(site)
        if z is not None:
            scaled = self.apply_shift(scaled, tag, z, s, node, self.smoothed_weight(site, np.ones_like(s)))
        params = self._range_params(lo, hi)
        node.inputs[0] = self._qdq_pair(scaled, tag, *params)
        cached = self.weight_outputs.get((*key, True)) if key in self.shared_factors else None
        if cached is not None:
            node.inputs[site.weight] = cached
            return True
        factor = s.astype(np.float32)
        node.inputs[site.weight] = gs.Constant(self.unique_name(f"{node.inputs[site.weight].name}_smoothed"),
                                               np.asarray(weight, np.float32) *
                                               (factor[:, None] if in_axis == 0 else factor[None, :]))
        self.quantize_weight(site, float_type_of_array(weight), self.scaled_sample(tensor.name, s, z), params,
                             None if z is None else z / s)
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
            cmin, cmax, _ = self.attention_ranges(node)
            s = self._factors(np.maximum(np.abs(cmin), np.abs(cmax)), weight, 1,
                              self.alphas.get(node.name, alpha), self.caps.get(node.name, 1.0))
        return s

    def attention_ranges(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(channel mins, channel maxes, shift) of a fused Attention's input: less the shift where it applies."""
        entry = self.table.tensors[node.inputs[0].name]
        cmin = np.asarray(entry.channel_min, np.float64)
        cmax = np.asarray(entry.channel_max, np.float64)
        z = self.shift_vector(node, cmin, cmax, constant_values(node.inputs[1]).shape[1])
        return (cmin, cmax, None) if z is None else (cmin - z, cmax - z, z)

    def qattention(self, node: gs.Node, alpha: float) -> bool:
        """com.microsoft Attention -> [Mul(1/s)] -> QuantizeLinear(u8) -> QAttention(INT8 per-column weights)."""
        x = node.inputs[0]
        entry = self.table.tensors.get(x.name)
        weight = constant_values(node.inputs[1])
        bias = constant_values(node.inputs[2]) if len(node.inputs) > 2 else None
        if entry is None or weight is None or bias is None or entry.channel_min is None:
            return False
        if float_type(x) is np.float16:
            return False  # ORT's QAttention takes float32 only
        cmin, cmax, z = self.attention_ranges(node) if alpha > 0 else (
            np.asarray(entry.channel_min, np.float64), np.asarray(entry.channel_max, np.float64), None)
        weight = weight.astype(np.float64)
        s = self.qattention_vector(node, alpha)
        lo, hi = self._smoothed_range(node.name, float((cmin / s).min()), float((cmax / s).max()))
        scale, zero_point = self._range_params(lo, hi)
        self.counter += 1
        tag = qattention_tag(node.name, self.counter)
        source = x
        if alpha > 0:
            source = gs.Variable(f"{tag}_input", dtype=np.float32)
            produce(self.graph, "Mul", f"{tag}_Mul", [x, gs.Constant(f"{tag}_factor", (1.0 / s).astype(np.float32))],
                    [source])
            if z is not None:
                source = self.apply_shift(source, tag, z, s, node, weight)
                bias = constant_values(node.inputs[2])
        quantized = gs.Variable(f"{tag}_quantized", dtype=np.uint8)
        scale_c = gs.Constant(f"{tag}_scale", np.array(scale, np.float32))
        zp_c = gs.Constant(f"{tag}_zero_point", np.array(zero_point, np.uint8))
        produce(self.graph, "QuantizeLinear", f"{tag}_QuantizeLinear", [source, scale_c, zp_c], [quantized])
        smoothed = (weight * s[:, None]).astype(np.float32)
        sample = self.scaled_sample(x.name, s, z)
        q_weight, w_scale = self.round_weight(smoothed, 1, sample)
        corrected = self.corrected_bias(np.asarray(bias, np.float32), sample, smoothed, (scale, zero_point), q_weight,
                                        w_scale, None if z is None else z / s)
        bias = bias if corrected is None else corrected
        mask = node.inputs[3] if len(node.inputs) > 3 else gs.Variable.empty()
        inputs = [quantized, gs.Constant(f"{tag}_weight_int8", q_weight), gs.Constant(f"{tag}_bias", bias.astype(np.float32)),
                  scale_c, gs.Constant(f"{tag}_weight_scale", w_scale), mask, zp_c,
                  gs.Constant(f"{tag}_weight_zero_point", np.zeros(w_scale.shape, np.int8))]
        replace_output(self.graph, node.outputs[0], "QAttention", qattention_node_name(tag), inputs,
                       attrs={"num_heads": node.attrs["num_heads"]}, domain="com.microsoft")
        return True

    def choose_smoothing(self, name: str, x_name: str, cmin: np.ndarray, cmax: np.ndarray, weight: np.ndarray,
                         default: float, z: np.ndarray | None = None) -> None:
        """SmoothQuant's alpha and range cap for one layer (W as [K, N]): the point of the grid (``ALPHAS`` with
        ``smooth_search``, else ``default`` alone) x (no cap, ``smooth_cap``) whose smoothing gives the lowest
        error at the layer's output on the token sample (INC's auto-alpha per layer); ``default`` and no cap
        without a sample. The grid is judged on ``ALPHA_TOKENS`` tokens of the sample, spread evenly."""
        x = self.samples.get(x_name)
        if name in self.alphas:  # chosen by an earlier call (the budget's candidates)
            self.refined["alpha"] += self.alphas[name] != default
            self.refined["cap"] += self.caps.get(name, 1.0) < 1
            return
        if x is None or x.shape[1] != weight.shape[0]:
            return
        grid = [(alpha, cap) for alpha in (ALPHAS if self.smooth_search else (default,))
                for cap in ((1.0, self.smooth_cap) if self.smooth_cap < 1 else (1.0,))]
        weight = np.asarray(weight, np.float32)
        x = x[np.linspace(0, x.shape[0] - 1, min(ALPHA_TOKENS, x.shape[0])).astype(int)]
        if z is not None:  # the shifted input (cmin, cmax are its ranges); z W is in the bias, exactly
            x = x - z.astype(np.float32)
        reference = x @ weight
        act = np.maximum(np.abs(cmin), np.abs(cmax))
        errors = []
        for alpha, cap in grid:
            s = self._factors(act, weight, 1, alpha, cap)
            scale, zero_point = self._range_params(float((cmin / s).min()), float((cmax / s).max()))
            smoothed = weight * s[:, None].astype(np.float32)
            w_scale = per_channel_scale(smoothed)
            errors.append(layer_error(x, weight, reference, s, (float(scale), int(zero_point), *_code_range(zero_point)),
                                      round_nearest(smoothed, w_scale) * w_scale, centred=self.bias_correct))
        self.alphas[name], self.caps[name] = grid[int(np.argmin(errors))]
        self.refined["alpha"] += self.alphas[name] != default
        self.refined["cap"] += self.caps[name] < 1

    def search_smoothing(self, sites: list[Site], attentions: list[gs.Node], default: float) -> None:
        """Per-layer alpha and cap (``choose_smoothing``) for the linear sites (not shared weights: they keep one
        vector from the union of their consumers' ranges, uncapped) and the QAttention nodes with a sample."""
        for site in sites:
            inputs = self._smoothing_inputs(site) if site.kind == LINEAR else None
            if inputs is None or self.weight_key(site) in self.shared_factors:
                continue
            cmin, cmax, weight, in_axis = inputs
            z = self.input_shift(site)
            self.choose_smoothing(site.node.name, site.node.inputs[0].name, cmin, cmax,
                                  weight if in_axis == 0 else weight.T, default, z)
        for node in attentions:
            entry = self.table.tensors.get(node.inputs[0].name)
            weight = constant_values(node.inputs[1])
            if entry is not None and entry.channel_min is not None and weight is not None:
                cmin, cmax, z = self.attention_ranges(node)
                self.choose_smoothing(node.name, node.inputs[0].name, cmin, cmax, weight, default, z)

    def round_weight(self, values: np.ndarray, axis: int, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """INT8 codes and per-channel scales of a weight: GPTQ on the layer's input sample ``x`` (already
        divided by the smoothing vector) with ``rounding=gptq``, else round to nearest."""
        q, scale = quantize_weight_array(values, axis)
        if self.rounding != "gptq" or x is None or values.ndim != 2:
            return q, scale
        kn = values if axis == 1 else values.T
        if x.shape[1] != kn.shape[0]:
            return q, scale
        digest = hashlib.sha1(np.ascontiguousarray(kn).tobytes() + np.ascontiguousarray(x).tobytes()).digest()
        codes = self.codes.get(digest)
        if codes is None:
            codes = self.codes[digest] = gptq_round(kn, scale, x)
        self.refined["gptq"] += 1
        return (codes if axis == 1 else np.ascontiguousarray(codes.T)), scale

    def scaled_sample(self, name: str, s: np.ndarray | None, z: np.ndarray | None = None) -> np.ndarray | None:
        """The token sample of tensor ``name`` less the shift ``z`` and divided by the smoothing vector ``s`` (the
        quantized input)."""
        x = self.samples.get(name)
        if x is None or s is None:
            return x
        if x.shape[1] != s.size:
            return None
        if z is not None:
            x = x - z.astype(np.float32)
        return x / s.astype(np.float32)

    def apply_shift(self, scaled: gs.Tensor, tag: str, z: np.ndarray, s: np.ndarray, node: gs.Node,
                    weight: np.ndarray) -> gs.Tensor:
        """x / s -> x / s - z / s (an Add after the smoothing Mul), and z W (``weight`` [K, N] in float, before
        smoothing) added to the layer's bias, a copy: the layer's float output is the same."""
        ftype = float_type(scaled)
        shifted = gs.Variable(f"{tag}_shifted", dtype=ftype)
        produce(self.graph, "Add", f"{tag}_Shift", [scaled, gs.Constant(f"{tag}_shift", (-z / s).astype(ftype))],
                [shifted])
        holder, index = (node, 2) if is_ort_attention(node) else bias_holder(node)
        bias = np.asarray(constant_values(holder.inputs[index]))
        moved = (bias.astype(np.float64) + z @ np.asarray(weight, np.float64)).astype(bias.dtype)
        holder.inputs[index] = gs.Constant(self.unique_name(f"{holder.inputs[index].name}_shifted"), moved)
        if holder is not node and node.outputs[0] not in self.graph.outputs:
            rebase(node.outputs[0], "shifted")  # (x - z) W: the bias Add after it gives x W + b back
        self.refined["shift"] += 1
        return shifted

    def corrected_bias(self, bias: np.ndarray, x: np.ndarray | None, weight: np.ndarray,
                       activation: tuple | None, codes: np.ndarray, scale: np.ndarray,
                       offset: np.ndarray | None = None) -> np.ndarray | None:
        """``bias`` less the layer's mean output error on the sample ``x`` (the quantized input, W [K, N] as it
        is quantized), or None when bias correction is off or cannot apply. ``offset``: the shift z / s of a
        shifted input; without bias correction its part of the bias, z W, is taken through the INT8 weight
        (z / s) dq(Wq) instead, as the unshifted layer takes it: the shift then changes the activation's
        quantization only, never what the weight's rounding costs (z W in float left every token the rounding
        error of -z / s, the same sign in every token: MiniLM's mean cosine fell to 0.88)."""
        dequantized = codes.astype(np.float32) * scale.astype(np.float32)
        if offset is not None and not self.bias_correct and bias.shape == (weight.shape[1],):
            return (bias.astype(np.float64) + offset.astype(np.float64) @ (dequantized - weight).astype(np.float64)
                    ).astype(bias.dtype)
        if not self.bias_correct or x is None or activation is None or bias.shape != (weight.shape[1],):
            return None
        shift = bias_shift(x, weight, None, (float(activation[0]), int(activation[1]), *_code_range(activation[1])),
                           dequantized)
        self.refined["bias"] += 1
        return (bias.astype(np.float64) - shift).astype(bias.dtype)

    def correct_linear_bias(self, site: Site, x: np.ndarray | None, activation: tuple | None,
                            codes: np.ndarray, scale: np.ndarray, values: np.ndarray,
                            offset: np.ndarray | None = None) -> None:
        """Bias correction of a linear site: its bias is a Gemm's C, or the constant operand of the one node that
        takes the MatMul's output (Add, Sum, FastGelu / BiasGelu, SkipLayerNormalization's bias); a copy is shifted."""
        node = site.node
        kn = values if site.weight_axis == 1 else values.T
        codes_kn = codes if site.weight_axis == 1 else codes.T
        found = bias_holder(node)
        if found is None:
            return
        holder, index = found
        bias = constant_values(holder.inputs[index])
        shifted = self.corrected_bias(np.asarray(bias), x, kn, activation, codes_kn, scale, offset)
        if shifted is not None:
            holder.inputs[index] = gs.Constant(self.unique_name(f"{holder.inputs[index].name}_corrected"), shifted)

    def quantize_weight(self, site: Site, ftype: type | None = None, x: np.ndarray | None = None,
                        activation: tuple | None = None, offset: np.ndarray | None = None) -> None:
        """Per-channel INT8 weight and its DequantizeLinear (scales in ``ftype``, else the weight's own float
        type); a weight several sites share is quantized once (rounded to nearest). ``x``: the token sample of
        the quantized input and ``activation`` its (scale, zero point), for GPTQ and bias correction; ``offset``:
        the input's shift z / s (``corrected_bias``)."""
        weight = site.node.inputs[site.weight]
        ftype = ftype or float_type(weight)
        self.float16 |= ftype is np.float16
        key = (weight.name, site.weight_axis, False)
        if key in self.weight_outputs:
            site.node.inputs[site.weight] = self.weight_outputs[key]
            return
        values = np.asarray(constant_values(weight), np.float32)
        q, scale = self.round_weight(values, site.weight_axis, None if weight.name in self.multi_use else x)
        if site.kind == LINEAR:
            self.correct_linear_bias(site, x, activation, q, scale, values, offset)
        name = self.unique_base(weight.name, ("_int8", "_scale", "_zero_point", "_dequantized"))
        q_c = gs.Constant(f"{name}_int8", q)
        s_c = gs.Constant(f"{name}_scale", scale.astype(ftype))
        zp_c = gs.Constant(f"{name}_zero_point", np.zeros(scale.shape, np.int8))
        out = gs.Variable(f"{name}_dequantized", dtype=ftype)
        produce(self.graph, "DequantizeLinear", f"{name}_DequantizeLinear", [q_c, s_c, zp_c], [out],
                attrs={"axis": site.weight_axis})
        site.node.inputs[site.weight] = out
        self.weight_outputs[key] = out


def insert(graph: gs.Graph, plan: QdqPlan, table: CalibrationTable, options: InsertOptions,
           source: Iterable | None = None, range_cache: dict[tuple[str, bytes], tuple[TensorRange, bool]] | None = None,
           sample_cache: dict[str, np.ndarray] | None = None, refine_cache: dict | None = None,
           progress: Callable[[str], None] = lambda message: None) -> tuple[dict[str, object], list[str]]:
    """Apply ``plan`` to ``graph`` (the float graph it was planned on, or a copy): (stats, notes).

    ``source``: the calibration data (re-iterable), needed to measure smoothed ranges for methods other than
    'max' and for the refinements (``smooth_search``, ``rounding=gptq``, ``bias_correct``); ``range_cache``,
    ``sample_cache``: measured ranges and layer-input samples kept across calls; ``refine_cache``: the
    refinements' choices (alpha per layer, GPTQ codes), so the budget's candidates do not repeat them."""
    notes: list[str] = []
    alpha = options.smooth
    range_cache = {} if range_cache is None else range_cache
    refine_cache = {} if refine_cache is None else refine_cache
    samples = layer_samples(graph, plan, options, source, {} if sample_cache is None else sample_cache, progress)
    asked = [name for name, on in (("smooth_search", options.smooth_search), ("rounding=gptq", options.rounding ==
             "gptq"), ("bias_correct", options.bias_correct)) if on]
    if asked and source is None:  # smooth_cap (on by default) is left off without the data as well, silently
        notes.append(f"qdq: {', '.join(asked)} need(s) the calibration data itself (--calib DATA), not a table: "
                     "left off")
    if options.shift and alpha == 0:
        notes.append("qdq: shift centres the smoothed inputs, and smooth=0 turns SmoothQuant off: left off")
    if options.smooth_search and alpha == 0:
        notes.append("qdq: smooth_search chooses SmoothQuant's alpha per layer, and smooth=0 turns SmoothQuant off: "
                     "left off")
    multi_use = shared_weight_names(graph, plan)

    def quantizer() -> Quantizer:
        made = Quantizer(graph, table, plan.target, options.method, options.percentile)
        made.source = source
        made.range_cache = range_cache
        made.samples = samples
        made.rounding = options.rounding
        made.bias_correct = options.bias_correct
        made.shift = options.shift
        made.multi_use = multi_use
        made.alphas = refine_cache.setdefault("alphas", {})
        made.caps = refine_cache.setdefault("caps", {})
        made.smooth_cap = options.smooth_cap
        made.smooth_search = options.smooth_search
        made.codes = refine_cache.setdefault("codes", {})
        return made

    refined = {"alpha": 0, "gptq": 0, "bias": 0, "shift": 0, "cap": 0}
    search = options.smooth_search or options.smooth_cap < 1  # alpha and cap per layer (``choose_smoothing``)

    def tally(q: Quantizer) -> None:
        for key, value in q.refined.items():
            refined[key] += value

    measured = [0, 0]  # sites taking the method's range, sites measured for it

    def count(q: Quantizer) -> None:
        kept, total = q.method_sites()
        measured[0] += kept
        measured[1] += total

    if plan.qattention_enabled:
        converting = quantizer()
        wanted = {site.id for site in plan.qattention}
        attentions = [n for n in graph.nodes if is_ort_attention(n) and n.name in wanted]
        if search and alpha > 0:
            converting.search_smoothing([], attentions, alpha)
        vectors = [(n, converting.qattention_vector(n, alpha)) for n in attentions]
        converting.measure_smoothed([(n.name, n.inputs[0], v, constant_values(n.inputs[1]) * v[:, None],
                                      converting.attention_ranges(n)[2] if alpha > 0 else None)
                                     for n, v in vectors if v is not None and constant_values(n.inputs[2]) is not None])
        for node in attentions:
            if not converting.qattention(node, alpha):
                raise TqcError(f"qdq: internal error: planned QAttention site '{node.name}' cannot be converted")
        count(converting)
        tally(converting)
        cleanup(graph)
    lowered = lower(graph, plan.target, keep={site.id for site in plan.qattention}, float_qkv=plan.float_attentions)

    planned = {site.id: site for site in plan.sites}
    sites: list[Site] = []
    for node in graph.nodes:
        site = planned.pop(node.name, None)
        if site is not None:
            sites.append(Site(node, site))
    if planned:
        raise TqcError(f"qdq: internal error: planned site '{next(iter(planned))}' is not in the graph")
    quantize = quantizer()
    int8_flops = plan.qattention_int8_flops
    smoothed = 0
    if alpha > 0 and options.shared_weights == "share":
        quantize.plan_shared_weights(sites, alpha)
    if alpha > 0 and search:
        quantize.search_smoothing(sites, [], alpha)
    if alpha > 0:
        vectors = [(site, quantize.smoothing_vector(site, alpha)) for site in sites if site.kind == LINEAR]
        quantize.measure_smoothed([(site.node.name, site.node.inputs[0], v, quantize.smoothed_weight(site, v),
                                    quantize.input_shift(site))
                                   for site, v in vectors if v is not None])
    quantize.check_plain_ranges([site for site in sites if not (alpha > 0 and site.kind == LINEAR and
                                                               quantize._smoothing_inputs(site) is not None)])
    for site in sites:
        if alpha > 0 and site.kind == LINEAR and quantize.smooth(site, alpha):
            smoothed += 1
            int8_flops += site.flops_per_token
            continue
        source_name = site.node.inputs[0].name
        for index, fixed in zip(site.activations, site.planned.fixed_amax):
            site.node.inputs[index] = quantize.fake_quantize(site.node.inputs[index], site.node, fixed)
        if site.weight is not None and not is_dq(site.node.inputs[site.weight]):
            quantize.quantize_weight(site, x=quantize.scaled_sample(source_name, None),
                                     activation=quantize.activations.get((source_name, site.node.name)))
        int8_flops += site.flops_per_token
    count(quantize)
    tally(quantize)
    if options.method != "max" and source is None:
        notes.append(f"qdq: method={options.method} ranges taken unchecked: without --calib DATA (a table only) the "
                     "layer output error that decides between them and 'max' cannot be measured")
    if measured[1]:
        notes.append(f"qdq: method={options.method} lowers the layer output error at {measured[0]} of {measured[1]} "
                     "linear-layer inputs on the calibration data; the others keep the 'max' range")
    residuals = 0
    adds = set(plan.residual_adds)
    for node in [n for n in graph.nodes if n.op == "Add" and n.name in adds]:
        a, b = node.inputs
        if isinstance(a, gs.Variable) and isinstance(b, gs.Variable) and a.name in table.tensors and \
                b.name in table.tensors and not is_dq(a) and not is_dq(b):
            node.inputs[0] = quantize.fake_quantize(a, node)
            node.inputs[1] = quantize.fake_quantize(b, node)
            residuals += 1
    concats = equalize_concat_scales(graph)
    if quantize.float16 and raise_opset(graph):
        notes.append(f"qdq: opset raised to {QDQ_FP16_OPSET}: Q/DQ of float16 tensors take float16 scales")
    cleanup(graph)
    stats: dict[str, object] = {
        "quantized_matmuls": len(sites),
        "linear": sum(1 for s in sites if s.kind == LINEAR),
        "attention_bmm": sum(1 for s in sites if s.kind == ATTENTION),
        "float_matmuls": len(plan.matmuls) - len(sites),
        "residual_adds": residuals,
        "concat_equalized": concats,
        "smoothed": smoothed,
        "q_nodes": sum(1 for n in graph.nodes if n.op == "QuantizeLinear"),
        "dq_nodes": sum(1 for n in graph.nodes if n.op == "DequantizeLinear"),
        "int8_matmul_flops": round(int8_flops / plan.total_flops, 4) if plan.total_flops else 0.0,
        "attention_expanded": lowered.expanded,
        "qattention": sum(1 for n in graph.nodes if n.op == "QAttention"),
        "method": options.method + (f":{options.percentile:g}" if options.method == "percentile" else ""),
    }
    if measured[1]:
        stats["method_ranges"] = measured[0]
    if options.smooth_search and alpha > 0:
        stats["alpha_changed"] = refined["alpha"]
    if options.smooth_cap < 1 and alpha > 0:
        stats["smooth_capped"] = refined["cap"]
    if options.rounding == "gptq":
        stats["gptq_weights"] = refined["gptq"]
    if options.bias_correct:
        stats["bias_corrected"] = refined["bias"]
    if options.shift:
        stats["shifted"] = refined["shift"]
    return stats, notes


def _vector_key(s: np.ndarray, z: np.ndarray | None) -> bytes:
    """The range cache's key of a smoothing vector and a shift."""
    return s.tobytes() if z is None else s.tobytes() + b"shift" + np.asarray(z, np.float64).tobytes()


def bias_holder(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(node, input index) of a linear layer's constant bias: a Gemm's C, or the constant operand of the one node
    that takes the MatMul's output (Add, Sum, FastGelu / BiasGelu, SkipLayerNormalization's bias); None without."""
    holder, index = (node, 2) if node.op == "Gemm" else (None, None)
    if holder is None:
        consumers = node.outputs[0].outputs
        if len(consumers) == 1:
            consumer = consumers[0]
            indices = {"Add": (0, 1), "Sum": tuple(range(len(consumer.inputs))), "FastGelu": (1,),
                       "BiasGelu": (1,), "SkipLayerNormalization": (4,)}
            for i in indices.get(consumer.op, ()):
                if i < len(consumer.inputs) and consumer.inputs[i] is not node.outputs[0] and \
                        constant_values(consumer.inputs[i]) is not None:
                    holder, index = consumer, i
    if holder is None or index >= len(holder.inputs) or constant_values(holder.inputs[index]) is None:
        return None
    return holder, index


def shared_weight_names(graph: gs.Graph, plan: QdqPlan) -> set[str]:
    """Weights that several planned sites read (ALBERT's layers): one INT8 copy, so rounded to nearest."""
    users: dict[str, int] = {}
    planned = {site.id: site for site in plan.sites if site.weight is not None}
    for node in graph.nodes:
        site = planned.get(node.name)
        if site is not None and site.weight < len(node.inputs):
            users[node.inputs[site.weight].name] = users.get(node.inputs[site.weight].name, 0) + 1
    return {name for name, count in users.items() if count > 1}


def linear_input_widths(graph: gs.Graph, planned: dict[str, PlannedSite] | None = None) -> dict[str, int]:
    """Input tensor -> input features of the fused attentions and of the ``planned`` linear sites (without a plan:
    of every MatMul / Gemm whose second input is a constant 2-D weight)."""
    widths: dict[str, int] = {}
    for node in graph.nodes:
        if not node.inputs or not isinstance(node.inputs[0], gs.Variable):
            continue
        if is_ort_attention(node):
            weight, k_axis = constant_values(node.inputs[1]), 0
        elif planned is not None:
            site = planned.get(node.name)
            weight = constant_values(node.inputs[site.weight]) if site is not None else None
            k_axis = 1 if site is not None and site.weight_axis == 0 else 0
        elif node.op in ("MatMul", "Gemm") and len(node.inputs) > 1:
            weight = constant_values(node.inputs[1])
            k_axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
        else:
            continue
        if weight is not None and weight.ndim == 2:
            widths[node.inputs[0].name] = int(weight.shape[k_axis])
    return widths


def layer_samples(graph: gs.Graph, plan: QdqPlan, options: InsertOptions, source: Iterable | None,
                  cache: dict[str, np.ndarray], progress: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Token samples of the linear layers' inputs on the calibration data (``analysis.layer_inputs``), taken on
    the graph before any rewrite: the inputs of the planned linear sites and of every fused attention (its QKV
    projection is a QAttention or, expanded, a linear site on the same input). Kept in ``cache``."""
    if not options.needs_samples or source is None:
        return {}
    planned = {site.id: site for site in plan.sites if site.kind == LINEAR and site.weight is not None}
    widths = linear_input_widths(graph, planned)
    missing = {name: width for name, width in widths.items() if name not in cache}
    if missing:
        from tqc.compiler.analysis.layer_inputs import sample_inputs

        cache.update(sample_inputs(graph.copy(), source, missing, progress=progress))
    return {name: cache[name] for name in widths if name in cache}


def equalize_concat_scales(graph: gs.Graph) -> int:
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
