"""Calibration: streamed activation statistics into a table the ``qdq`` pass reads.

Calibration is analysis, not a pass. Two passes over the data, batch by batch:
  1. min and max of every observed tensor;
  2. a signed histogram of every observed tensor over [-amax, amax] (``BINS`` bins).
Memory is bounded by the histograms (tensors x bins), not by the number of samples. From the histograms the
table derives, per tensor, the clipping range of every method:

  max         the observed range
  percentile  the p-th percentile of |x| (p in ``PERCENTILES``), and of each tail for asymmetric ranges
  entropy     the amax minimising KL(P || Q) over 128 levels (TensorRT's entropy calibration)
  mse         the amax minimising the expected squared error of INT8 quantization

The table (JSON) is keyed by tensor name and carries the hash of the model it was computed on, so that
``qdq`` can refuse a table made for another graph, and so the same table can be reused across compiles.

Per-channel ranges come twice: ``channel_min`` / ``channel_max`` over every position (SmoothQuant's scales, the
shift and the range cap read them), and ``real_channel_min`` / ``real_channel_max`` over the real tokens only, where
the feeds carry an attention mask (the outlier split reads them: padding positions carry no meaning, and their
values hide the channels that own a layer's range over real text). The table's ``coverage`` says which positions
each covers; tables made before have no real-token ranges (the split then reads the others).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.layer_inputs import feed_mask, token_rows
from tqc.compiler.runtime.activations import stream_intermediates
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.model import structure_hash, write_text_atomic

BINS = 4096  # signed: 2048 bins for |x|, as TensorRT's entropy calibrator uses
PERCENTILES = (99.9, 99.99, 99.999)
METHODS = ("max", "percentile", "entropy", "mse")
FORMAT = "tqc-calibration/1"
COVERAGE = {"min/max, amax, lo, hi, channel_min/max": "every position",
            "real_channel_min/max": "the tokens the attention mask keeps"}


@dataclass
class TensorRange:
    min: float
    max: float
    amax: dict[str, float] = field(default_factory=dict)     # symmetric clip per method ("percentile:99.99")
    lo: dict[str, float] = field(default_factory=dict)       # asymmetric lower clip per method
    hi: dict[str, float] = field(default_factory=dict)
    channel_min: list[float] | None = None                   # per channel of the last axis (for smoothing)
    channel_max: list[float] | None = None
    real_channel_min: list[float] | None = None              # the same over real (unpadded) tokens only
    real_channel_max: list[float] | None = None

    def symmetric(self, method: str, percentile: float | None = None) -> float:
        key = _key(method, percentile)
        if key not in self.amax:
            raise TqcError(f"the calibration table has no '{key}' range (has: {', '.join(sorted(self.amax))})")
        return self.amax[key]

    def asymmetric(self, method: str, percentile: float | None = None) -> tuple[float, float]:
        key = _key(method, percentile)
        if key not in self.lo:
            raise TqcError(f"the calibration table has no '{key}' range (has: {', '.join(sorted(self.lo))})")
        return self.lo[key], self.hi[key]


def _key(method: str, percentile: float | None) -> str:
    return f"percentile:{percentile:g}" if method == "percentile" else method


@dataclass
class CalibrationTable:
    model_hash: str
    samples: int
    tensors: dict[str, TensorRange]
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "model_hash": self.model_hash, "samples": self.samples,
                           "seconds": round(self.seconds, 3), "coverage": COVERAGE,
                           "tensors": {name: {"min": r.min, "max": r.max, "amax": r.amax, "lo": r.lo, "hi": r.hi,
                                              "channel_min": r.channel_min, "channel_max": r.channel_max,
                                              **({"real_channel_min": r.real_channel_min,
                                                  "real_channel_max": r.real_channel_max}
                                                 if r.real_channel_min is not None else {})}
                                       for name, r in sorted(self.tensors.items())}}, sort_keys=True)

    def save(self, path: str | Path) -> None:
        write_text_atomic(self.to_json() + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        p = Path(path)
        if not p.is_file():
            raise TqcError(f"calibration table '{p}' does not exist")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TqcError(f"calibration table '{p}' is not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TqcError(f"'{p}' is not a tqc calibration table (format {FORMAT})")
        from tqc.compiler.analysis.table_check import validate_table_data

        validate_table_data(data, p)  # keys present, values finite and ordered: one line on the first problem
        tensors = {name: TensorRange(v["min"], v["max"], v["amax"], v["lo"], v["hi"], v.get("channel_min"),
                                     v.get("channel_max"), v.get("real_channel_min"), v.get("real_channel_max"))
                   for name, v in data["tensors"].items()}
        return cls(data["model_hash"], data["samples"], tensors, data.get("seconds", 0.0))


def entropy_amax(hist: np.ndarray, edges_max: float, levels: int = 128) -> float:
    """TensorRT-style KL-divergence calibration on a histogram of |x| over [0, edges_max]."""
    nbins = hist.size
    if hist.sum() == 0 or edges_max == 0:
        return edges_max
    hist = hist.astype(np.float64)
    best_kl, best_i = math.inf, nbins
    for i in range(levels, nbins + 1, max(1, nbins // 256)):
        reference = hist[:i].copy()
        reference[i - 1] += hist[i:].sum()
        nonzero = (reference != 0).astype(np.float64)  # after folding the outliers into the last bin
        # Merge the i bins into `levels` quantized bins, then spread each back over its non-empty bins.
        edges = (np.arange(levels + 1) * i) // levels
        mass = np.add.reduceat(hist[:i], edges[:-1])  # the candidate: hist[:i] without the outliers
        count = np.add.reduceat(nonzero, edges[:-1])
        per_bin = np.divide(mass, count, out=np.zeros_like(mass), where=count > 0)
        expanded = np.repeat(per_bin, np.diff(edges)) * nonzero
        p = reference / reference.sum()
        q_sum = expanded.sum()
        if q_sum == 0:
            continue
        q = expanded / q_sum
        mask = p > 0
        if np.any(q[mask] == 0):
            continue
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return edges_max * best_i / nbins


def mse_amax(hist: np.ndarray, edges_max: float, levels: int = 127) -> float:
    """The clip value minimising expected squared INT8 error over a histogram of |x|."""
    nbins = hist.size
    if hist.sum() == 0 or edges_max == 0:
        return edges_max
    centers = (np.arange(nbins) + 0.5) * edges_max / nbins
    weights = hist.astype(np.float64)
    best, best_amax = math.inf, edges_max
    for i in range(max(1, nbins // 64), nbins + 1, max(1, nbins // 512)):
        amax = edges_max * i / nbins
        step = amax / levels
        clipped = np.maximum(centers - amax, 0.0)
        error = np.sum(weights * (clipped ** 2 + np.where(centers <= amax, step * step / 12.0, 0.0)))
        if error < best:
            best, best_amax = error, amax
    return best_amax


def _percentile_from_hist(hist: np.ndarray, upper: float, q: float) -> float:
    cdf = np.cumsum(hist)
    if cdf[-1] == 0:
        return upper
    index = int(np.searchsorted(cdf, q / 100.0 * cdf[-1]))
    return upper * min(index + 1, hist.size) / hist.size


def fake_quantize(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """x through QuantizeLinear then DequantizeLinear (round half to even, saturating), in float32."""
    q = np.clip(np.rint(x / np.float32(scale)) + zero_point, qmin, qmax)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def range_output_errors(model: onnx.ModelProto | gs.Graph, feeds: Iterable,
                        requests: dict[str, tuple[np.ndarray, list[tuple[float, int, int, int]]]]) -> dict[str, list[float]]:
    """The error each candidate range of an activation causes at the output of the layer it feeds.

    ``requests``: tensor name -> (weight [K, N] of the layer the tensor feeds on its last axis, candidates as
    (scale, zero point, qmin, qmax)). Returns, per tensor, the summed squared error of (Q/DQ(x) - x) @ W over
    ``feeds`` for each candidate, streamed batch by batch (memory: one batch of one tensor at a time).
    """
    errors = {name: [0.0] * len(candidates) for name, (_, candidates) in requests.items()}

    def observe(name: str, value: np.ndarray) -> None:
        if name not in requests:
            return
        weight, candidates = requests[name]
        x = np.asarray(value, np.float32).reshape(-1, weight.shape[0])
        for i, candidate in enumerate(candidates):
            diff = (fake_quantize(x, *candidate) - x) @ weight
            errors[name][i] += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))

    stream_intermediates(model, feeds, observe, names=list(requests))
    return errors


def calibration_targets(model: onnx.ModelProto) -> list[str]:
    """Tensors a quantizer may need ranges for: non-constant inputs of MatMul/Gemm/Attention and residual Adds."""
    constants = {t.name for t in model.graph.initializer}
    float_inputs = {v.name for v in model.graph.input if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    produced = {out for node in model.graph.node for out in node.output} | float_inputs
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Add") or (node.op_type == "Attention" and node.domain == "com.microsoft"):
            inputs = node.input[:1] if node.op_type == "Attention" else node.input[:2]
            if node.op_type == "Add" and not all(name in produced for name in inputs):
                continue  # bias Adds need no range; residual Adds (two activations) may
            for name in inputs:
                if name and name in produced and name not in constants and name not in names:
                    names.append(name)
    return names


def calibrate(model: onnx.ModelProto | gs.Graph, feeds: Iterable, tensors: list[str], progress=lambda message: None,
              model_hash: str | None = None, histograms: bool = True,
              percentiles: Iterable[float] = (), sampler=None) -> CalibrationTable:
    """Observe ``tensors`` of ``model`` over ``feeds`` and build the table.

    ``percentiles`` are measured besides ``PERCENTILES`` (``qdq{percentile=99}`` with calibration data).

    ``model`` may be a gs graph: it then runs without being exported (see ``tqc.compiler.runtime.graph_session``).

    ``sampler`` (``tqc.compiler.analysis.layer_inputs.Sampler``) rides along the first pass: it keeps token
    samples of the tensors it asks for, at no pass of its own.

    Per-channel ranges are taken twice where every feed has an attention mask: over every position, and over
    the real tokens only (``token_rows``: ``real_channel_min`` / ``real_channel_max``).

    With ``histograms`` (every method) the data is read twice; without, once, and only the ``max`` ranges
    (and per-channel ranges) are in the table.
    """
    start = time.perf_counter()
    if not tensors:
        raise TqcError("nothing to calibrate: the graph has no MatMul/Gemm activation inputs")
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    channel_lows: dict[str, np.ndarray] = {}
    channel_highs: dict[str, np.ndarray] = {}
    real_lows: dict[str, np.ndarray] = {}  # the same over the real tokens
    real_highs: dict[str, np.ndarray] = {}
    samples = 0
    mask: dict[str, np.ndarray | None] = {"now": None}  # the current feed's attention mask
    unmasked = []  # feeds without one

    def observe_range(name: str, value: np.ndarray) -> None:
        if sampler is not None:
            sampler.observe(name, value)
        if value.size and np.issubdtype(value.dtype, np.floating):
            finite = np.isfinite(value)
            whole = bool(finite.all())
            if not whole:  # additive masks: finfo.min plus a score overflows to -inf; ranges are of finite values
                value = value[finite]
                if not value.size:
                    return
            lows[name] = min(lows.get(name, math.inf), float(value.min()))
            highs[name] = max(highs.get(name, -math.inf), float(value.max()))
            if whole and value.ndim >= 2:
                flat = value.reshape(-1, value.shape[-1])
                merge_channels(channel_lows, channel_highs, name, flat.min(axis=0), flat.max(axis=0))
                rows = token_rows(value, mask["now"])
                if rows is not None and rows.size:
                    merge_channels(real_lows, real_highs, name, rows.min(axis=0), rows.max(axis=0))

    progress(f"calibration pass 1/{2 if histograms else 1}: ranges of {len(tensors)} tensors")
    feed_list_sizes = []

    def counted(source):
        for feed in source:
            feed_list_sizes.append(next(iter(feed.values())).shape[0])
            mask["now"] = feed_mask(feed)
            if mask["now"] is None:
                unmasked.append(len(feed_list_sizes))
            yield feed

    if sampler is not None:
        progress(sampler.describe())
    stream_intermediates(model, counted(sampler.track(feeds) if sampler is not None else feeds), observe_range,
                         names=tensors)
    samples = sum(feed_list_sizes)
    if samples == 0:
        raise TqcError("the calibration data holds no samples")
    bounds = {n: max(abs(lows[n]), abs(highs[n]), 1e-12) for n in lows}
    masked = not unmasked

    def _set_channels(r: TensorRange, name: str) -> None:
        if name in channel_lows:  # 6 significant digits keep the JSON table small
            r.channel_min = [float(f"{v:.6g}") for v in channel_lows[name]]
            r.channel_max = [float(f"{v:.6g}") for v in channel_highs[name]]
            if masked and name in real_lows and real_lows[name].shape == channel_lows[name].shape:
                r.real_channel_min = [float(f"{v:.6g}") for v in real_lows[name]]
                r.real_channel_max = [float(f"{v:.6g}") for v in real_highs[name]]
    if not histograms:
        table = {}
        for name, bound in bounds.items():
            r = TensorRange(lows[name], highs[name], {"max": bound}, {"max": lows[name]}, {"max": highs[name]})
            _set_channels(r, name)
            table[name] = r
        return CalibrationTable(model_hash or _structure_hash(model), samples, table, time.perf_counter() - start)
    hists = {n: np.zeros(BINS, np.int64) for n in bounds}

    def observe_hist(name: str, value: np.ndarray) -> None:
        if name in hists:
            bound = bounds[name]
            # float32 edges overflow for ranges near finfo.max (mask tensors): those go through float64
            flat = value.astype(np.float64 if bound > 1e37 else np.float32).ravel()
            if not np.isfinite(flat).all():
                flat = flat[np.isfinite(flat)]
            counts, _ = np.histogram(flat, bins=BINS, range=(-bound, bound))
            hists[name] += counts

    progress(f"calibration pass 2/2: histograms ({BINS} bins) over {samples} samples")
    stream_intermediates(model, feeds, observe_hist, names=tensors)
    table: dict[str, TensorRange] = {}
    half = BINS // 2
    for name, hist in hists.items():
        bound = bounds[name]
        absolute = hist[half:] + hist[:half][::-1]  # |x| histogram over [0, bound]
        positive, negative = hist[half:], hist[:half][::-1]
        r = TensorRange(lows[name], highs[name])
        _set_channels(r, name)
        r.amax["max"] = bound
        r.lo["max"], r.hi["max"] = lows[name], highs[name]
        for q in sorted(set(PERCENTILES) | set(percentiles)):
            key = _key("percentile", q)
            r.amax[key] = min(_percentile_from_hist(absolute, bound, q), bound)
            total = hist.sum()
            tail = (100.0 - q) / 100.0 * total
            # Asymmetric: clip each tail at the same share of all samples.
            hi_index = int(np.searchsorted(np.cumsum(positive[::-1]), tail))
            lo_index = int(np.searchsorted(np.cumsum(negative[::-1]), tail))
            r.hi[key] = min(highs[name], bound * (half - hi_index) / half) if highs[name] > 0 else highs[name]
            r.lo[key] = max(lows[name], -bound * (half - lo_index) / half) if lows[name] < 0 else lows[name]
        for method, fn in (("entropy", entropy_amax), ("mse", mse_amax)):
            amax = min(fn(absolute, bound), bound)
            r.amax[method] = amax
            r.lo[method] = max(lows[name], -amax)
            r.hi[method] = min(highs[name], amax)
        table[name] = r
    return CalibrationTable(model_hash or _structure_hash(model), samples, table, time.perf_counter() - start)


def merge_channels(lows: dict[str, np.ndarray], highs: dict[str, np.ndarray], name: str, cmin: np.ndarray,
                   cmax: np.ndarray) -> None:
    """Widen ``name``'s running per-channel range by one batch's (a batch of another width is left out)."""
    if name in lows and lows[name].shape == cmin.shape:
        np.minimum(lows[name], cmin, out=lows[name])
        np.maximum(highs[name], cmax, out=highs[name])
    elif name not in lows:
        lows[name], highs[name] = cmin.astype(np.float64), cmax.astype(np.float64)


def _structure_hash(model: onnx.ModelProto | gs.Graph) -> str:
    if isinstance(model, gs.Graph):
        from tqc.compiler.io.graph import skeleton_of_graph

        model = skeleton_of_graph(model)
    return structure_hash(model)
