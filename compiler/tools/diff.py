"""``tqc diff``: where do two models (FP32 vs fused / FP16 / INT8) part ways?

    REF.onnx ─┐ same inputs (calibration-data formats, or drawn from the signature)
              ├─► ORT CPU, optimizations off, through polygraphy (Comparator, exact-name matching)
    CAND.onnx ┘    per output, and with --layerwise per tensor both graphs share by name
                   (fused and quantized graphs keep boundary names, so blocks line up)
          ─► max/mean |diff|, relative L2, cosine, SQNR (dB), in the reference graph's topological order
          ─► the first tensor where the error jumps past --threshold, and the node that produced it
          ─► polygraphy JSON inputs/outputs + the `polygraphy run` / `polygraphy debug reduce` commands

``--sensitivity`` un-quantizes one quantized site (MatMul or QAttention; ids as ``qdq``'s plan names them,
``tqc.passes.qdq.plan.quantized_sites``) and then one op class of the candidate at a time, and ranks them by
how much of the output error each one removes, with the ranker the ``qdq`` budget uses
(``tqc.compiler.analysis.sensitivity``); the ranking is written as a ``qdq{exclude=...}`` option ready to paste.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.compiler.runtime import compare
from tqc.compiler.runtime.activations import FLOAT_TYPES, exposed_model_bytes, float_tensor_types
from tqc.compiler.core.errors import TqcError
from tqc.compiler.analysis.sensitivity import Measured, group_by, op_class, rank, rank_groups
from tqc.compiler.io.structure import infer_shapes
from tqc.passes.fuse.match import producer
from tqc.passes.qdq.plan import quantized_sites
from tqc.passes.rewrite import cleanup, detach_outputs, produce


@dataclass
class TensorRow:
    name: str
    index: int            # position in the reference graph's topological order
    producer: str         # node that produces it in the candidate
    producer_op: str
    metrics: compare.TensorMetrics


@dataclass
class DiffResult:
    candidate: str
    outputs: list[TensorRow]
    layers: list[TensorRow] = field(default_factory=list)
    first_divergence: TensorRow | None = None
    threshold: float = 0.0

    def as_dict(self) -> dict:
        def row(r: TensorRow) -> dict:
            return {"name": r.name, "index": r.index, "producer": r.producer, "producer_op": r.producer_op,
                    **r.metrics.as_dict()}
        return {"candidate": self.candidate, "threshold_rel_l2": self.threshold,
                "outputs": [row(r) for r in self.outputs], "layers": [row(r) for r in self.layers],
                "first_divergence": row(self.first_divergence) if self.first_divergence else None}


def topological_float_tensors(model: onnx.ModelProto) -> list[str]:
    if not model.graph.value_info:
        infer_shapes(model, strict=False)
    types = float_tensor_types(model)
    names = [i.name for i in model.graph.input if types.get(i.name) in FLOAT_TYPES]
    for node in model.graph.node:
        names.extend(o for o in node.output if o and types.get(o) in FLOAT_TYPES)
    return list(dict.fromkeys(names))


def shared_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Float tensors present in both graphs, in the reference's topological order."""
    cand = set(topological_float_tensors(candidate))
    return [n for n in topological_float_tensors(reference) if n in cand]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def run_exposed(model: onnx.ModelProto, feeds, names: list[str] | None, runner_name: str, runtime: str = "ort"):
    """polygraphy RunResults of ``model`` with ``names`` exposed as outputs, on ``runtime`` (ort|openvino)."""
    data, _ = exposed_model_bytes(model, names) if names else (model.SerializeToString(), None)
    return compare.run_model(data, feeds, name=runner_name, runtime=runtime)


def diff(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds, layerwise: bool = False,
         threshold: float = 0.05, candidate_name: str = "candidate", reference_results=None,
         mask_padding: bool = True, runtime: str = "ort") -> tuple[DiffResult, object, object]:
    """The reference runs on ORT CPU (optimizations off); the candidate on ``runtime`` (ort or openvino)."""
    infer_shapes(reference, strict=False)
    infer_shapes(candidate, strict=False)
    from tqc.compiler.runtime.feeds import input_specs

    ref_inputs = {spec.name: spec.dtype for spec in input_specs(reference)}
    for spec in input_specs(candidate):  # the same feeds run both: the candidate must take what they hold
        if spec.name not in ref_inputs:
            raise TqcError(f"{candidate_name} takes input '{spec.name}', which the reference does not: the models "
                           "do not match")
        if spec.dtype != ref_inputs[spec.name]:
            raise TqcError(f"{candidate_name} takes input '{spec.name}' as {spec.dtype}, the reference as "
                           f"{ref_inputs[spec.name]}: the models do not match")
    outputs = [o.name for o in reference.graph.output]
    missing = [n for n in outputs if n not in {o.name for o in candidate.graph.output}]
    if missing:
        raise TqcError(f"{candidate_name} lacks output '{missing[0]}' of the reference: the models do not match")
    names = shared_tensors(reference, candidate) if layerwise else outputs
    order = {n: i for i, n in enumerate(topological_float_tensors(reference))}
    ref_results = reference_results or run_exposed(reference, feeds, names if layerwise else None, "reference")
    cand_results = run_exposed(candidate, feeds, names if layerwise else None, candidate_name, runtime)
    comparison = compare.compare_results(list(ref_results.items())[0], list(cand_results.items())[0],
                                         atol=math.inf, rtol=math.inf, names=names, min_cosine=-1.0,
                                         masks=compare.padding_masks(feeds) if mask_padding else None)
    producers = _producers(candidate)

    def row(name: str) -> TensorRow:
        node = producers.get(name)
        return TensorRow(name, order.get(name, -1), node.name if node is not None else "(graph input)",
                         node.op_type if node is not None else "-", comparison.outputs[name])

    result = DiffResult(candidate_name, [row(n) for n in outputs if n in comparison.outputs], threshold=threshold)
    if layerwise:
        result.layers = sorted((row(n) for n in names if n in comparison.outputs), key=lambda r: r.index)
        result.first_divergence = next((r for r in result.layers if r.metrics.rel_l2 > threshold), None)
    return result, ref_results, cand_results


def save_polygraphy_files(folder: Path, feeds, ref_results) -> tuple[Path, Path]:
    from polygraphy.json import save_json

    folder.mkdir(parents=True, exist_ok=True)
    inputs, outputs = folder / "inputs.json", folder / "reference_outputs.json"
    from tqc.compiler.io.output_guard import write_with

    with compare.quiet_polygraphy():  # each file atomic (output guard): no half-written JSON on a signal
        write_with(inputs, lambda tmp: save_json(feeds, tmp))
        write_with(outputs, lambda tmp: ref_results.save(tmp))
    return inputs, outputs


def polygraphy_commands(reference: str, candidate: str, inputs: Path, ref_outputs: Path, atol: float,
                        rtol: float, tensors: list[str] | None = None) -> list[str]:
    marks = f" --onnx-outputs {' '.join(tensors)}" if tensors else ""
    level = compare.ORT_LEVEL_FLAG
    return [
        f"polygraphy run {reference} --onnxrt {level} --load-inputs {inputs} --save-outputs {ref_outputs}{marks}",
        f"polygraphy run {candidate} --onnxrt {level} --load-inputs {inputs} --load-outputs {ref_outputs} "
        f"--atol {atol:g} --rtol {rtol:g}{marks}",
        f"polygraphy debug reduce {candidate} -o reduced.onnx --mode=bisect --load-inputs {inputs} "
        f"--check polygraphy run polygraphy_debug.onnx --onnxrt {level} --load-inputs {inputs} "
        f"--load-outputs {ref_outputs} --atol {atol:g} --rtol {rtol:g}",
    ]


def format_table(results: list[DiffResult], layerwise: bool, limit: int = 40) -> str:
    lines = []
    for result in results:
        lines.append(f"{result.candidate}:")
        header = f"  {'tensor':<58} {'max|d|':>9} {'mean|d|':>9} {'rel L2':>9} {'cosine':>9} {'SQNR dB':>8}"
        lines.append(header)
        rows = result.layers if layerwise else result.outputs
        shown = rows if len(rows) <= limit else rows[: limit // 2] + [None] + rows[-limit // 2:]
        for r in shown:
            if r is None:
                lines.append(f"  {'...':<58}")
                continue
            m = r.metrics
            sqnr = "inf" if math.isinf(m.sqnr_db) else f"{m.sqnr_db:.1f}"
            mark = "  <- first divergence" if result.first_divergence is not None and r is result.first_divergence else ""
            lines.append(f"  {r.name[-58:]:<58} {m.max_abs:>9.3g} {m.mean_abs:>9.3g} {m.rel_l2:>9.3g} "
                         f"{m.cosine:>9.6f} {sqnr:>8}{mark}")
        if layerwise:
            d = result.first_divergence
            lines.append(f"  first divergence (rel L2 > {result.threshold:g}): " +
                         (f"'{d.name}' from {d.producer_op} '{d.producer}'" if d else "none"))
            worst = sorted(result.layers, key=lambda r: r.metrics.sqnr_db)[:5]
            lines.append("  lowest SQNR: " + ", ".join(f"{r.name} ({r.metrics.sqnr_db:.1f} dB)" for r in worst))
    return "\n".join(lines)


def plot(results: list[DiffResult], path: str | Path, metric: str = "sqnr_db") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TqcError("--plot needs matplotlib: pip install 'tqc[plot]'") from None
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for result in results:
        rows = [r for r in result.layers if not math.isinf(getattr(r.metrics, metric))]
        ax.plot([r.index for r in rows], [getattr(r.metrics, metric) for r in rows], marker=".", linewidth=1,
                label=result.candidate)
        d = result.first_divergence
        if d is not None and not math.isinf(getattr(d.metrics, metric)):
            ax.annotate("first divergence", (d.index, getattr(d.metrics, metric)), fontsize=8,
                        xytext=(5, 10), textcoords="offset points", arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("tensor position in the reference graph (topological order)")
    ax.set_ylabel({"sqnr_db": "SQNR (dB), higher is better", "cosine": "cosine to reference"}[metric])
    ax.set_title("Per-tensor fidelity along the network")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- sensitivity

def unquantize(graph: gs.Graph, ids: set[str] | frozenset[str]) -> int:
    """Return the sites ``ids`` (``tqc.passes.qdq.plan`` site ids) of a quantized graph to float, in place:

        x ─► Q ─► DQ ─► MatMul ◄─ DQ ◄─ W_int8      x ─► MatMul ◄─ DQ ◄─ W_int8   (weights keep their INT8 values)
        x ─► Q ─► QAttention(W_int8, s_w, ...)      x ─► Attention(s_w · (W_int8 - zp_w), b, mask)
    """
    count = 0
    for sid, node in quantized_sites(graph):
        if sid not in ids:
            continue
        if node.op == "QAttention":
            _float_attention(graph, node)
            count += 1
            continue
        for i, t in enumerate(node.inputs[:2]):
            dq = producer(t)
            q = producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
            if q is not None and q.op == "QuantizeLinear":
                node.inputs[i] = q.inputs[0]
                count += 1
    cleanup(graph)
    return count


def _float_attention(graph: gs.Graph, node: gs.Node) -> None:
    """QAttention(Q(x), W_int8, b, s_x, s_w, mask, zp_x, zp_w) -> Attention(x, s_w * (W_int8 - zp_w), b, mask)."""
    quantize = producer(node.inputs[0])
    if quantize is None or quantize.op != "QuantizeLinear":
        raise TqcError(f"QAttention '{node.name}' is not fed by a QuantizeLinear: cannot un-quantize it")
    weight = node.inputs[1].values.astype(np.float32)
    zero_point = node.inputs[7].values.astype(np.float32) if len(node.inputs) > 7 and isinstance(
        node.inputs[7], gs.Constant) else np.float32(0)
    dequantized = (weight - zero_point) * node.inputs[4].values.astype(np.float32)
    mask = node.inputs[5] if len(node.inputs) > 5 else gs.Variable.empty()
    inputs = [quantize.inputs[0], gs.Constant(f"{node.name}_float_weight", dequantized.astype(np.float32)),
              node.inputs[2], mask]
    produce(graph, "Attention", f"{node.name}_float", inputs, detach_outputs(node), attrs=dict(node.attrs),
            domain="com.microsoft")


def sensitivity(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds, progress=lambda m: None) -> dict:
    """Rank the candidate's quantized sites by the output error (mean relative L2 against the reference) each
    one removes alone in float, then each op class; the ranker is the accuracy budget's
    (``tqc.compiler.analysis.sensitivity``), over the same site ids."""
    from tqc.compiler.io.graph import to_graph, to_model

    outputs = [o.name for o in reference.graph.output]
    ref = compare.run_model(reference, feeds, name="reference")

    def error_of(model: onnx.ModelProto) -> float:
        res = compare.run_model(model, feeds, name="variant")
        c = compare.compare_results(list(ref.items())[0], list(res.items())[0], math.inf, math.inf, outputs,
                                    min_cosine=-1.0, masks=compare.padding_masks(feeds))
        return float(np.mean([m.rel_l2 for m in c.outputs.values()]))

    def error_with_float(ids: frozenset[str]) -> float:
        if not ids:
            return error_of(candidate)
        graph = to_graph(candidate)
        unquantize(graph, ids)
        return error_of(to_model(graph))

    ids = list(dict.fromkeys(sid for sid, _ in quantized_sites(to_graph(candidate))))
    if not ids:
        raise TqcError("the candidate has no quantized MatMul/Gemm (Q -> DQ -> MatMul) or QAttention to rank")
    measure = Measured(error_with_float)
    ranking = rank(ids, measure, progress=progress)
    base = ranking.baseline
    nodes = [{"node": sid, "error_removed": gain, "share": ranking.share(gain)} for sid, gain in ranking.removed.items()]
    classes = [{"class": pattern, "nodes": len(members), "error_removed": gain, "share": ranking.share(gain)}
               for pattern, members, gain in rank_groups(group_by(ids, op_class), measure, base)]
    top = [r["node"] for r in nodes[:3]]
    return {"baseline_rel_l2": base, "nodes": nodes, "classes": classes,
            "exclude": [r["node"] for r in nodes], "qdq_option": "qdq{exclude=" + "|".join(top) + "}"}
