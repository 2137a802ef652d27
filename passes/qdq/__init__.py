"""``qdq``: insert QuantizeLinear/DequantizeLinear from a calibration table, with placement per target.

    x ─► MatMul(W) ─► y      ->      x ─► Q ─► DQ ─► MatMul ─► y
                                     W_int8 ─► DQ (per output channel) ─┘

Every form per target (attention batched MatMuls, QAttention, SmoothQuant, shared weights) is pictured in
``insert.py``, which performs the rewrite; the choice of sites is ``plan.py``'s.

``trt``: symmetric INT8, zero-point 0, activations per tensor, weights per output channel, Q/DQ on MatMul/Gemm
inputs (never outputs), optional residual Adds, attention batched MatMuls where TensorRT's INT8 MHA applies,
mask Add, LayerNorm, GELU and Softmax math left in float, equal scales across Concat, GEMV-shaped MatMuls
skipped. ``ort-*``: asymmetric UINT8 activations (a GELU output's [-0.17, 10] range keeps all 8 bits), INT8
weights per channel. The pass is deterministic given the table, and running it twice changes nothing.

Shared weights (ALBERT's layers): one smoothing vector from the union of the consumers' ranges, one INT8 copy.
FP16 graphs (``fp16,qdq``): scales take the float type of the tensor they quantize (float16, opset 19).
``method`` applies to smoothed activations too (x/s measured on the calibration data), and only where its range
lowers the layer's output error ||(Q/DQ(x) - x) W||^2 on the calibration data below max's (else max). INT8 attention needs the
sequences the model will see within TensorRT's limit (``tqc.compiler.core.target``).

With the calibration data itself (not a table alone), every linear layer's bias is corrected by its mean output
error on the data (``bias_correct``) and, on trt, openvino and ort-cpu, every smoothed linear input is centred per
channel before it is quantized (``shift``: (x - z) / s, z W into the bias; on ort-cpu its Adds after a LayerNorm and
after QAttention fold away, ``shift_fold.py``, where alone they cost 1-9% of the speed): on by default
(``auto``), constants and one Add per layer, every INT8 MatMul kept (MiniLM, 2,400 held-out sentences: NN
agreement 91.0 -> 92.0% on ort-cpu (93.7% with shift=true), 87.7 -> 91.6% on trt, 90.5 -> 92.8% on openvino;
``bench/bench_accuracy.py``). ``smooth_cap`` (0.99 by default, with the data) then caps the smoothed channel
ranges at their 99th percentile per layer where that lowers the layer's output error (constants only): 92.8 /
92.1 / 94.4% (``bench/results/accuracy_cap_cpu.*``). ``split`` (on for trt by default, on openvino and ort-cpu for the
FFN output layers, recomputed from the layer before: ``split_producer.py``) moves the few
input channels that own a layer's range ([CLS]'s massive activations) into a float part beside the INT8 MatMul
(``split.py``): 93.7% (ort-cpu; 94.8% with split=true) / 93.9% (trt) / 96.2% (openvino)
(``bench/results/accuracy_real_tokens_cpu.*``, ``accuracy_split_recomputed_cpu.*``); ort-cpu with the shift (folded):
95.7% (``bench/results/accuracy_shift_folded_ort_cpu.*``). ``value_equalize`` (on for trt, with the data) centres
and evens V's channels before probs x V's per-tensor INT8, the attention output projection taking the factors back
(``value_equalize.py``; constants only): trt 93.9 -> 94.5% (``bench/results/accuracy_trt_value_cpu.*``).

``budget=0.995`` adds the accuracy protection: the output cosine of the quantized graph to the float graph (as
it was before this pass) is measured on the calibration data; while it is below the budget, the site whose
quantization costs most (each measured alone in float) goes back to float.

The pass is analysis, then rewrite::

    calibration table ─► [budget: rank sites on copies] ─► plan_sites (plan.py, pure) ─► insert (insert.py)
                                                                                     (QAttention, lower.py, Q/DQ)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.calibration import CalibrationTable, TensorRange
from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import Target
from tqc.passes.base import (NO_CONTRIB_OPS, Condition, Option, Pass, PassContext, PassResult, Tolerance,
                             parse_auto_bool, parse_bool, parse_list)
from tqc.passes.qdq.budget import budget_feeds, enforce_budget
from tqc.passes.qdq.deferred_probs import defer_normalization
from tqc.passes.qdq.insert import InsertOptions, insert, linear_input_widths
from tqc.passes.qdq.openvino import fold_smoothing, fold_zero_points, unpack_qkv
from tqc.passes.qdq.plan import PlanOptions, QdqPlan, graph_sequence_bound, plan_sites
from tqc.passes.qdq.shared_qkv import share_qkv_scales
from tqc.passes.qdq.shift_fold import fold_into_attention, fold_shift
from tqc.passes.qdq.split import (RATIO, Split, add_float_parts, choose_splits, split_table, zero_split_columns,
                                  zero_split_rows)
from tqc.passes.qdq.value_equalize import equalize_values
from tqc.passes.rewrite import cleanup


@dataclass
class QdqState:
    """qdq's working state for one run (the budget step plans and inserts several times)."""

    skip: list[str] = field(default_factory=list)                # site ids the budget keeps in float
    # (site, s) -> (the method's range of x/s, kept: it lowers the layer's output error below max's)
    smoothed_ranges: dict[tuple[str, bytes], tuple[TensorRange, bool]] = field(default_factory=dict)
    full_cosine: float | None = None                             # budget: output cosine with every site quantized
    sensitivity: dict[str, float] = field(default_factory=dict)  # budget: output error (1 - cosine) each site
                                                                 # removes alone in float, largest first
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # layer-input token samples (the refinements)
    splits: dict[str, Split] = field(default_factory=dict)       # split: node name -> its outlier channels
    table: CalibrationTable | None = None                         # split: the ranges without those channels
    refined: dict = field(default_factory=dict)                  # the refinements' choices, across the candidates


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
        "method": Option(str, "max", "activation range: max, percentile, entropy, mse; a method's range is kept "
                         "per linear-layer input only where it lowers that layer's output error on the calibration "
                         "data below max's (clipping a LayerNorm output feeding attention lost 0.016 of MiniLM's "
                         "cosine), else max", choices=("max", "percentile", "entropy", "mse")),
        "percentile": Option(float, 99.99, "percentile for method=percentile (any with --calib; a table from "
                                           "tqc calibrate holds 99.9, 99.99 and 99.999)",
                             min=90, max=100),  # below 90 clipping saturates a tenth of the values: no range
        "exclude": Option(parse_list, [], "node-name patterns to keep in float ('|'-separated, fnmatch)"),
        "op_types": Option(parse_list, ["MatMul", "Gemm"], "op types to quantize"),
        "residual": Option(parse_bool, False, "trt: also quantize both inputs of residual Adds"),
        "attention": Option(parse_auto_bool, "auto", "quantize the attention batched MatMuls (INT8 MHA): 'auto' "
                            "on trt, not on openvino (OpenVINO's INT8 attention runs no faster than its bf16 one on "
                            "AMX CPUs, and float attention is more accurate)", choices=("auto", "true", "false")),
        "probs": Option(str, "normalized", "with INT8 attention, what probs x V quantizes: 'normalized' (Softmax's "
                        "output, the form TensorRT fuses into its INT8 MHA) or 'deferred' (exp(s - max s), full range "
                        "in every row; the MatMul's output divided by the quantized row sums: exact in float, MiniLM "
                        "on trt NN 94.5 -> 95.0%; no Softmax left for TensorRT's MHA fusion, speed there not "
                        "measured; deferred_probs.py)", choices=("normalized", "deferred")),
        "budget": Option(float, 0.0, "minimum mean output cosine on the calibration data (0: off)",
                         min=0, max=1),
        "target_cos": Option(float, 0.0, "accuracy target: the mean output cosine to the float model on the "
                             "calibration data the result must reach (0: off). The refinements that keep every "
                             "INT8 MatMul (rounding=gptq, bias_correct and the shift) are switched on first; only "
                             "while they fall short do MatMuls go back to float, the most useful first, and the "
                             "notes say what share of the INT8 MACs each one costs. Not with budget",
                             min=0, max=1),
        "budget_runtime": Option(str, "ort", "engine the budget step measures on: ort (ORT CPU, optimizations off) "
                                 "or openvino (OpenVINO CPU: its own INT8 kernels)", choices=("ort", "openvino")),
        "qattention": Option(str, "auto", "ORT targets: quantize fused Attention ops as com.microsoft "
                             "QAttention (INT8 QKV projection inside ORT's fused attention kernel) instead of "
                             "expanding them into a quantizable MatMul; 'auto': on ort-cpu (1.1x faster there) "
                             "unless a budget or target_cos is set (the budget step can return any QKV projection to "
                             "float only in the expanded form)",
                             choices=("auto", "true", "false")),
        "smooth": Option(float, 0.75, "SmoothQuant strength alpha in [0, 1] (0: off): per-channel factors move "
                         "activation outliers into the weights; the activation range then comes from the "
                         "table's per-channel ranges", min=0, max=1),
        "shared_weights": Option(str, "share", "a weight several MatMuls use (ALBERT's layers): 'share' smooths it "
                                 "once for all of them (one vector from the union of their activation ranges) and "
                                 "keeps one INT8 copy; 'copy' gives every consumer its own smoothed INT8 copy",
                                 choices=("share", "copy")),
        "smooth_search": Option(parse_bool, False, "choose SmoothQuant's alpha per linear layer (with smooth > 0): "
                                "the point of the grid 0, 0.1 .. 1 whose smoothing gives the lowest error at that "
                                "layer's output on the calibration data (Intel Neural Compressor's auto-alpha); "
                                "constants only, the graph is the same"),
        "smooth_cap": Option(float, 0.99, "SmoothQuant range cap, a quantile in [0.5, 1] (1: off): a channel whose "
                             "smoothed range x / s passes this quantile of its layer's smoothed ranges takes a larger "
                             "s (the rest of its range moves into its weight row), kept per linear layer only where it "
                             "lowers the layer's output error on the calibration data (needs --calib DATA: with a "
                             "table alone no layer is capped); constants only, the graph is the same",
                             min=0.5, max=1),
        "rounding": Option(str, "nearest", "INT8 weight codes: nearest, or gptq (GPTQ: each layer's weight rows "
                           "rounded one by one with the rounding error fed back through the inverse Hessian of the "
                           "layer's input on the calibration data; same scales, same graph)",
                           choices=("nearest", "gptq")),
        "shift": Option(parse_auto_bool, "auto", "centre every smoothed linear-layer input channel before "
                        "quantizing (Outlier Suppression+'s channel-wise shift z = (max + min) / 2): x / s becomes "
                        "(x - z) / s, an Add after SmoothQuant's Mul, and z W moves into the layer's bias, exact in "
                        "float (layers with a bias, smooth > 0). 'auto': on where bias correction is (it leaves a mean "
                        "error that bias correction takes out) on trt, openvino and ort-cpu (there the Adds after a "
                        "LayerNorm fold into its beta, the attention output's into QAttention: no more nodes than "
                        "unshifted); off on ort-cuda (not measured)",
                        choices=("auto", "true", "false")),
        "split": Option(parse_auto_bool, "auto", "outlier channel split: where a linear layer's top input channels "
                        "(at most 4) each have a calibrated range at least twice every other channel's (the massive "
                        "activations encoders put at [CLS]), they leave the INT8 MatMul (their weight rows zeroed, "
                        "the range of the rest) for a float MatMul beside it, added to its output; exact in float, "
                        "every other INT8 MAC stays. On openvino and ort-cpu the float part recomputes channels an "
                        "FFN input layer produces from its float columns (OpenVINO's fused INT8 chain stays). "
                        "'auto': on for trt (TensorRT fuses the Mul and Add; not measured), and for openvino and "
                        "ort-cpu on those recomputed layers only (the FFN output layers: 1-5% slower on MiniLM; "
                        "split=true adds the FFN input layers, 6-10% on ort-cpu); off for ort-cuda (not measured)",
                        choices=("auto", "true", "false")),
        "value_equalize": Option(parse_auto_bool, "auto", "with INT8 attention: centre V's channels and even their "
                                 "ranges before probs x V's per-tensor INT8 (V's projection takes 1 / e_j and -z_j, "
                                 "the attention output projection takes e_j back in its rows and z W_o in its bias; "
                                 "exact in float, constants only; value_equalize.py). Needs --calib DATA (it runs "
                                 "before the calibration). 'auto': on where the target's activations are symmetric "
                                 "INT8 (trt: MiniLM NN 93.9 -> 94.5%, cosine 0.99899 -> 0.99913)",
                                 choices=("auto", "true", "false")),
        "bias_correct": Option(parse_auto_bool, "auto", "shift each quantized linear layer's bias by its mean output "
                               "error on the calibration data (NNCF's fast bias correction; layers with a bias). "
                               "'auto': on where the calibration data itself is given (--calib DATA), off with a "
                               "calibration table alone", choices=("auto", "true", "false")),
    }
    # Quantization is judged statistically, not elementwise: outputs must keep this cosine to the float graph.
    tolerance = Tolerance(atol=math.inf, rtol=math.inf, min_cosine=0.98)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # Histograms only when the range method needs them: 'max' reads the data once.
        method = self.values["method"]
        if self.values["probs"] == "deferred" and not (ctx.target.int8_attention_matmuls and
                                                       self.int8_attention(ctx.target)):
            raise TqcError(f"qdq{{probs=deferred}} changes the INT8 probs x V of attention, which {ctx.target.name} "
                           "keeps in float here (trt quantizes it; openvino with attention=true)")
        self.state = QdqState()
        equalized = self.equalize_values(graph, ctx)
        sampler = None
        if InsertOptions(smooth=self.values["smooth"], **self.refinements(ctx)).needs_samples and \
                ctx.calibration is None and ctx.calibration_source is not None:
            from tqc.compiler.analysis.layer_inputs import Sampler

            sampler = Sampler(linear_input_widths(graph))  # token samples taken in the calibration's own pass
        table = ctx.calibration_table(graph, histograms=method != "max",
                                      percentiles=(self.values["percentile"],) if method == "percentile" else (),
                                      sampler=sampler)
        if sampler is not None:
            self.state.samples.update(sampler.samples())
        split = self.values["split"]
        if split == "true" or (split == "auto" and ctx.target.split_by_default):
            self.state.splits = choose_splits(graph, table, RATIO, self.values["residual"] and
                                              ctx.target.residual_add_qdq,
                                              ("where" if split == "true" else "only")
                                              if ctx.target.split_recomputed else "")
            if self.state.splits:
                table = self.state.table = split_table(table, self.state.splits)
                if sampler is None and ctx.calibration_source is not None and InsertOptions(
                        smooth=self.values["smooth"], **self.refinements(ctx)).needs_samples:
                    from tqc.compiler.analysis.layer_inputs import sample_inputs  # the table came before this pass

                    self.state.samples.update(sample_inputs(graph.copy(), ctx.calibration_source,
                                                            linear_input_widths(graph), progress=ctx.progress))
                zero_split_columns(self.state.samples, self.state.splits)
        options = self.plan_options(graph, ctx)
        stats_extra: dict[str, object] = {}
        skip: list[str] = []
        if self.values["target_cos"] > 0:
            if self.values["budget"] > 0:
                raise TqcError("qdq: give target_cos or budget, not both (target_cos is budget with the "
                               "refinements switched on first)")
        if self.accuracy_goal() > 0:
            plan = plan_sites(graph, ctx.target, options, table)
            if plan.site_ids:
                float_graph = graph.copy()  # before any rewrite; shares the weight arrays, never written into

                def quantized(ids: frozenset[str]) -> gs.Graph:
                    candidate = float_graph.copy()
                    self.insert(candidate, plan_sites(float_graph, ctx.target, options, table, skip=ids), ctx)
                    return candidate

                feeds = budget_feeds(graph, ctx.calibration_batches() or list(ctx.verification_feeds or []))
                budget = self.accuracy_goal()
                result = enforce_budget(float_graph, plan.site_ids, quantized, feeds, budget,
                                        self.values["budget_runtime"])
                self.state.full_cosine = result.full_cosine
                self.state.sensitivity = result.sensitivity
                self.state.skip = skip = result.kept
                if not skip:
                    ctx.note(f"qdq: output cosine {result.full_cosine:.5f} with every MatMul quantized meets the "
                             f"budget {budget}")
                else:
                    ctx.note(f"qdq: output cosine {result.full_cosine:.5f} with every MatMul quantized; "
                             f"{result.achieved:.5f} with {len(skip)} kept in float (budget {budget})")
                stats_extra = {"kept_float_by_budget": len(skip),
                               "budget_full_cosine": round(result.full_cosine, 6)}
                if skip:
                    costs = mac_shares(plan, skip)
                    ctx.note("qdq: kept in float by the accuracy budget (share of the MatMul MACs each moves back "
                             "to float; ORT CPU runs INT8 MatMuls about 2x faster than float): " +
                             ", ".join(f"{site} ({share:.1%})" for site, share in costs.items()))
                    stats_extra["float_mac_share"] = round(sum(costs.values()), 4)
        plan = plan_sites(graph, ctx.target, options, table, skip=skip)
        stats, notes = self.insert(graph, plan, ctx)
        stats.update(stats_extra)
        if equalized:
            stats["values_equalized"] = equalized
        for note in [*plan.notes, *notes]:
            ctx.note(note)
        return PassResult(stats["quantized_matmuls"] > 0 or stats.get("attention_expanded", 0) > 0, stats)

    def equalize_values(self, graph: gs.Graph, ctx: PassContext) -> int:
        """``value_equalize``: V centred and equalized in every attention core (``value_equalize.py``), before the
        calibration measures the graph; the number of cores. 'auto': with INT8 attention on a target with
        symmetric INT8 activations, where the calibration data is at hand and no table was measured yet."""
        choice = self.values["value_equalize"]
        if choice == "false" or not (ctx.target.int8_attention_matmuls and self.int8_attention(ctx.target)) or \
                (choice == "auto" and not ctx.target.symmetric_int8_activations):
            return 0
        if ctx.calibration is not None or ctx.calibration_source is None:
            if choice == "true":
                raise TqcError("qdq{value_equalize=true} needs the calibration data itself (--calib DATA) and no "
                               "calibration table: it changes V's ranges before they are measured")
            return 0
        ctx.progress("qdq: measuring V's channel ranges (value_equalize)")
        return equalize_values(graph, ctx.calibration_source)

    def int8_attention(self, target: Target) -> bool:
        """``attention``: 'true'/'false' as given; 'auto': the target's default."""
        choice = self.values["attention"]
        return choice == "true" or (choice == "auto" and target.int8_attention_by_default)

    def plan_options(self, graph: gs.Graph, ctx: PassContext) -> PlanOptions:
        attention = self.int8_attention(ctx.target)
        limited = ctx.target.int8_mha is not None and attention  # INT8 attention within limits
        bound = graph_sequence_bound(graph, ctx) if limited else (None, "")
        return PlanOptions(op_types=tuple(self.values["op_types"]), exclude=tuple(self.values["exclude"]),
                           attention=attention, residual=self.values["residual"],
                           qattention=self.uses_qattention(ctx.target), max_sequence=bound)

    def insert(self, graph: gs.Graph, plan: QdqPlan, ctx: PassContext) -> tuple[dict[str, object], list[str]]:
        options = InsertOptions(method=self.values["method"], percentile=self.values["percentile"],
                                smooth=self.values["smooth"], shared_weights=self.values["shared_weights"],
                                **self.refinements(ctx))
        split = zero_split_rows(graph, self.state.splits)  # the float part is added after insert (split.py)
        stats, notes = insert(graph, plan, self.state.table or ctx.calibration, options, source=ctx.calibration_source,
                              range_cache=self.state.smoothed_ranges, sample_cache=self.state.samples,
                              refine_cache=self.state.refined, progress=ctx.progress)
        if ctx.target.zero_points_in_bias:
            stats["zero_points_folded"] = fold_zero_points(graph)
        if ctx.target.smoothing_folded:
            stats["smoothing_folded"] = fold_smoothing(graph)
        if ctx.target.shared_qkv_scale and self.int8_attention(ctx.target):
            stats["qkv_scales_shared"] = share_qkv_scales(graph)
        if self.values["probs"] == "deferred":
            stats["probs_deferred"] = deferred = defer_normalization(graph)
            if not deferred:
                notes.append("qdq{probs=deferred}: no Softmax -> INT8 probs x V in this graph (attention fused into "
                             "one op, or kept in float): nothing deferred")
        if split:
            add_float_parts(graph, self.state.splits, split)
            cleanup(graph)
            stats["split_channels"] = sum(len(self.state.splits[name].channels) for name in split)
            notes.append(f"qdq: {stats['split_channels']} outlier input channels of {len(split)} linear layers run in "
                         "float beside their INT8 MatMul (split): " + ", ".join(
                             f"{name} {list(self.state.splits[name].channels)}" for name in split))
        if ctx.target.shift_folded:  # after the split: its float part reads the LayerNorms too
            stats["attention_smoothing_folded"] = fold_into_attention(graph)
            if options.shift:
                stats["shift_folded"] = fold_shift(graph)
        if ctx.target.qkv_unpacked:
            stats["qkv_unpacked"] = unpack_qkv(graph)
        return stats, notes

    def uses_qattention(self, target: Target) -> bool:
        choice = str(self.values["qattention"]).lower()
        if not target.contrib_ops or choice == "false":
            return False
        return choice == "true" or (target.qattention_by_default and not self.accuracy_goal() > 0)

    def refinements(self, ctx: PassContext) -> dict[str, object]:
        """smooth_search, rounding, bias_correct and shift as given; ``target_cos`` adds GPTQ and bias correction
        (they come before any float fallback); 'auto': bias correction where the calibration data is at hand (not
        a table alone), the shift where bias correction is on and the target runs its Add for free."""
        chosen = {key: self.values[key] for key in ("smooth_search", "rounding", "smooth_cap")}
        bias_correct = self.values["bias_correct"]
        chosen["bias_correct"] = bias_correct == "true" or (bias_correct == "auto" and
                                                            ctx.calibration_source is not None)
        if self.values["target_cos"] > 0:  # smooth_search only as given: on top of the shift it lowered MiniLM's
            chosen.update(rounding="gptq", bias_correct=True)  # min cosine (0.993 -> 0.985) and its cosine here
        shift = self.values["shift"]
        chosen["shift"] = shift == "true" or (shift == "auto" and chosen["bias_correct"] and
                                              ctx.target.shift_by_default)
        return chosen

    def accuracy_goal(self) -> float:
        """The output cosine the budget step must reach: ``budget`` or ``target_cos`` (0: none)."""
        return max(self.values["budget"], self.values["target_cos"])


def mac_shares(plan: QdqPlan, site_ids: list[str]) -> dict[str, float]:
    """Each site's share of the plan's MatMul MACs per token: the INT8 work its float fallback gives up."""
    flops = {site.id: site.flops_per_token for site in plan.sites}
    return {site: flops.get(site, 0.0) / plan.total_flops if plan.total_flops else 0.0 for site in site_ids}
