"""``tqc diff``: where do two models (FP32 vs fused / FP16 / INT8) part ways?

    REF.onnx ─┐ same inputs (calibration-data formats, or drawn from the signature: random token ids, and a
              │ note on stderr says so)
              ├─► ORT CPU, optimizations off, per output, and with --layerwise per tensor both graphs share
    CAND.onnx ┘    by name (fused and quantized graphs keep boundary names, so blocks line up)
          ─► max/mean |diff|, relative L2, cosine, SQNR (dB), in the reference graph's topological order
          ─► the first tensor where the error jumps past --threshold, and the node that produced it
          ─► polygraphy JSON inputs/outputs + the `polygraphy run` / `polygraphy debug reduce` commands

One model's weights at a time, whatever their size (over protobuf's 2 GB too): every model is read as a
skeleton first (``Side``); the reference then runs with its weights lent to ORT (``GraphSession.from_lean``),
its compared tensors go to .npy files (``StoredOutputs``) and its weights are released; each candidate then
runs the same way, feed by feed, compared as it goes. Peak memory: the largest model's weights plus one
feed's activations (XLM-R large, 2.08 GiB of weights: 2.5 GiB; ``bench/bench_diff_large.py``).

``--plot`` (``tqc.compiler.tools.diff_plot``, called by the CLI) names the x-axis after the tensors (or the layers, for a real
model's hundreds of them) and scales the y-axis to the bulk of the values; the few outside sit on the edge.

``--sensitivity`` un-quantizes one quantized site (MatMul or QAttention; ids as ``qdq``'s plan names them,
``tqc.passes.qdq.plan.quantized_sites``) and then one op class of the candidate at a time, and ranks them by
how much of the output error each one removes, with the ranker the ``qdq`` budget uses
(``tqc.compiler.analysis.sensitivity``); the ranking is written as a ``qdq{exclude=...}`` option ready to paste.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.compiler.runtime import compare
from tqc.compiler.runtime.activations import FLOAT_TYPES, exposed_model_bytes, float_tensor_types, outputs_per_feed
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.lean import LeanModel
from tqc.compiler.io.model import load_model, load_model_lean
from tqc.compiler.io.output_guard import make_temp_dir, release_temp, remove_if_present
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


ModelLike = Union[onnx.ModelProto, LeanModel, str, os.PathLike]


@dataclass
class Side:
    """One model of a comparison: its structure at hand, its weights loaded only while it runs.

    A path is read as a skeleton now and with its weights (``tqc.compiler.io.lean``) only for its own run,
    which is how ``tqc diff`` holds one model's weights at a time, whatever their size."""

    name: str
    skeleton: onnx.ModelProto
    source: onnx.ModelProto | LeanModel | Path

    @classmethod
    def of(cls, model: "ModelLike | Side", name: str) -> "Side":
        if isinstance(model, Side):
            return model
        if isinstance(model, (str, os.PathLike)):
            side = cls(name, load_model_lean(model, weights=False).skeleton, Path(model))
        else:
            side = cls(name, model.skeleton if isinstance(model, LeanModel) else model, model)
        infer_shapes(side.skeleton, strict=False)
        return side

    def outputs_per_feed(self, feeds, names: list[str] | None, runtime: str = "ort") -> Iterator[dict]:
        """{tensor: value} for each feed, ``names`` exposed besides the graph outputs."""
        if runtime == "openvino":
            model = load_model(self.source) if isinstance(self.source, Path) else self.source
            if isinstance(model, LeanModel):
                raise TqcError("--runtime openvino runs a model file or a ModelProto, not a lean load")
            data = exposed_model_bytes(model, names)[0] if names else model.SerializeToString()
            del model
            results = compare.run_model(data, feeds, name=self.name, runtime=runtime)
            for iteration in list(results.values())[0]:
                yield dict(iteration.items())
            return
        if isinstance(self.source, Path):  # its weights, under the skeleton that knows the tensors' types
            model = LeanModel(self.skeleton, load_model_lean(self.source).weights)
        else:
            model = self.source
        yield from outputs_per_feed(model, feeds, names)


class StoredOutputs:
    """The reference's values per feed: its graph outputs in memory, every other tensor in a ``.npy`` file
    of a temporary folder (read back memory-mapped, one at a time), so that the reference's weights can go
    before the candidate's come and a long layerwise run costs disk, not memory."""

    def __init__(self, outputs: list[str]):
        self.outputs = outputs
        self.in_memory: list[dict[str, np.ndarray]] = []
        self.on_disk: list[dict[str, Path]] = []
        self.folder: Path | None = None

    def add(self, values: dict[str, np.ndarray]) -> None:
        index = len(self.in_memory)
        self.in_memory.append({k: v for k, v in values.items() if k in self.outputs})
        files: dict[str, Path] = {}
        for position, (name, value) in enumerate(values.items()):
            if name in self.outputs:
                continue
            if self.folder is None:
                self.folder = make_temp_dir("tqc-diff-reference-")
            files[name] = self.folder / f"{index}-{position}.npy"
            np.save(files[name], value, allow_pickle=False)
        self.on_disk.append(files)

    def value(self, index: int, name: str) -> np.ndarray | None:
        if name in self.in_memory[index]:
            return self.in_memory[index][name]
        path = self.on_disk[index].get(name)
        return np.load(path, mmap_mode="r", allow_pickle=False) if path is not None else None

    def run_results(self, runner_name: str = "reference"):
        """The graph outputs as polygraphy RunResults (its JSON format, for ``polygraphy run --load-outputs``)."""
        from polygraphy.comparator.struct import IterationResult, RunResults

        return RunResults([(runner_name, [IterationResult(dict(it), runner_name=runner_name)
                                          for it in self.in_memory])])

    def close(self) -> None:
        if self.folder is not None:
            remove_if_present(str(self.folder))
            release_temp(self.folder)
            self.folder = None


def _check_pair(reference: Side, candidate: Side) -> None:
    from tqc.compiler.runtime.feeds import input_specs

    ref_inputs = {spec.name: spec.dtype for spec in input_specs(reference.skeleton)}
    for spec in input_specs(candidate.skeleton):  # the same feeds run both: the candidate must take what they hold
        if spec.name not in ref_inputs:
            raise TqcError(f"{candidate.name} takes input '{spec.name}', which the reference does not: the models "
                           "do not match")
        if spec.dtype != ref_inputs[spec.name]:
            raise TqcError(f"{candidate.name} takes input '{spec.name}' as {spec.dtype}, the reference as "
                           f"{ref_inputs[spec.name]}: the models do not match")
    outputs = {o.name for o in candidate.skeleton.graph.output}
    missing = [o.name for o in reference.skeleton.graph.output if o.name not in outputs]
    if missing:
        raise TqcError(f"{candidate.name} lacks output '{missing[0]}' of the reference: the models do not match")


def check_runtime(runtime: str, sensitivity: bool = False) -> None:
    """The engine the candidates run on (``ort`` or ``openvino``, installed), checked before anything is read;
    ``--sensitivity`` runs on ONNX Runtime only. One line each (the CLI and ``tqc.diff``)."""
    if runtime not in ("ort", "openvino"):
        raise TqcError(f"--runtime must be ort or openvino, got '{runtime}'")
    if runtime == "openvino":
        from tqc.compiler.io.openvino_ir import require_openvino

        require_openvino()
        if sensitivity:
            raise TqcError("--sensitivity runs on ONNX Runtime only; drop --runtime openvino for it")


def prepare(reference: ModelLike | Side, candidates: list[tuple[ModelLike, str] | Side]) -> tuple[Side, list[Side]]:
    """The sides of a comparison, each model read as a skeleton and checked, and the candidates checked
    against the reference (same inputs and outputs): every refusal comes before anything runs."""
    ref = Side.of(reference, "reference")
    sides = [c if isinstance(c, Side) else Side.of(*c) for c in candidates]
    for side in sides:
        _check_pair(ref, side)
    return ref, sides


def compare_models(reference: ModelLike | Side, candidates: list[tuple[ModelLike, str] | Side], feeds,
                   layerwise: bool = False,
                   threshold: float = 0.05, mask_padding: bool = True, runtime: str = "ort",
                   progress=lambda message: None) -> tuple[list[DiffResult], object, list]:
    """Compare each candidate with ``reference`` on the same feeds; returns the results, the reference's
    graph outputs and each candidate's (polygraphy RunResults).

    One model's weights are loaded at a time: the reference runs first (on ORT CPU, optimizations off) with
    every tensor some candidate shares exposed, its values are kept (``StoredOutputs``) and its weights
    released; then each candidate runs (on ``runtime``), feed by feed, compared as it goes.
    """
    ref, sides = prepare(reference, candidates)
    outputs = [o.name for o in ref.skeleton.graph.output]
    order = {n: i for i, n in enumerate(topological_float_tensors(ref.skeleton))}
    compared = [shared_tensors(ref.skeleton, side.skeleton) if layerwise else outputs for side in sides]
    exposed = list(dict.fromkeys(n for names in compared for n in names)) if layerwise else None
    masks = compare.padding_masks(feeds) if mask_padding else None
    # the reference's declared shapes (Side.of inferred them): a fixed axis 1 is no sequence axis
    unmasked = compare.fixed_width_outputs([*ref.skeleton.graph.output, *ref.skeleton.graph.value_info])
    stored = StoredOutputs(outputs)
    try:
        progress("running the reference" + (f" with {len(exposed)} tensors exposed" if exposed else ""))
        for values in ref.outputs_per_feed(feeds, exposed):
            stored.add(values)
            del values  # not the last feed's values alive during the candidates' runs
        results, cand_results = [], []
        for side, names in zip(sides, compared):
            progress(f"running {side.name}")
            cand_outputs = StoredOutputs(outputs)

            def recorded(per_feed: Iterator[dict]) -> Iterator[dict]:
                for values in per_feed:
                    cand_outputs.in_memory.append({n: values[n] for n in outputs if n in values})
                    yield values

            metrics = merged_metrics(recorded(side.outputs_per_feed(feeds, names if layerwise else None, runtime)),
                                     stored.value, names, masks, unmasked)
            results.append(_result(side, metrics, outputs, names, order, layerwise, threshold))
            cand_results.append(cand_outputs.run_results(side.name))
        return results, stored.run_results(), cand_results
    finally:
        stored.close()


def merged_metrics(per_feed: Iterable[dict], expected: Callable[[int, str], np.ndarray | None], names: list[str],
                   masks: list[np.ndarray] | None, unmasked: set[str] = frozenset()) -> dict[str, compare.TensorMetrics]:
    """Each named tensor's metrics against ``expected(feed index, name)``, feed by feed, merged (worst case);
    padded positions left out where ``masks`` are given, except in ``unmasked`` tensors (a fixed axis 1:
    ``compare.fixed_width_outputs``)."""
    per_tensor: dict[str, list[compare.TensorMetrics]] = {}
    for index, values in enumerate(per_feed):
        mask = masks[index] if masks is not None and index < len(masks) else None
        for name in names:
            reference = expected(index, name)
            if reference is None or name not in values:
                continue
            name_mask = None if name in unmasked else mask
            per_tensor.setdefault(name, []).append(compare.tensor_metrics(
                name, compare.mask_padding(np.asarray(reference), name_mask),
                compare.mask_padding(values[name], name_mask)))
        del values
    return {n: compare.merge_metrics(m) for n, m in per_tensor.items()}


def _result(side: Side, metrics: dict, outputs: list[str], names: list[str], order: dict[str, int],
            layerwise: bool, threshold: float) -> DiffResult:
    producers = _producers(side.skeleton)

    def row(name: str) -> TensorRow:
        node = producers.get(name)
        return TensorRow(name, order.get(name, -1), node.name if node is not None else "(graph input)",
                         node.op_type if node is not None else "-", metrics[name])

    result = DiffResult(side.name, [row(n) for n in outputs if n in metrics], threshold=threshold)
    if layerwise:
        result.layers = sorted((row(n) for n in names if n in metrics), key=lambda r: r.index)
        result.first_divergence = next((r for r in result.layers if r.metrics.rel_l2 > threshold), None)
    return result


def diff(reference: ModelLike, candidate: ModelLike, feeds, layerwise: bool = False, threshold: float = 0.05,
         candidate_name: str = "candidate", mask_padding: bool = True,
         runtime: str = "ort") -> tuple[DiffResult, object, object]:
    """One candidate against ``reference`` (see ``compare_models``): the result and both models' graph
    outputs (polygraphy RunResults). Models are ModelProtos, lean loads or paths (a path's weights are read
    for its run only)."""
    results, ref_results, cand_results = compare_models(
        reference, [(candidate, candidate_name)], feeds, layerwise=layerwise, threshold=threshold,
        mask_padding=mask_padding, runtime=runtime)
    return results[0], ref_results, cand_results[0]


def drawn_inputs_note(model: onnx.ModelProto, feeds) -> str:
    """What ``tqc diff`` compares on when no ``--data`` is given, and how to give real inputs (a stderr note).

    Random inputs stay the default: they need nothing beside the model, and text the candidate was
    calibrated on (the packaged calibration sentences) would flatter an INT8 candidate. But they are not
    text: attention patterns, and so the errors, differ from a real sentence's."""
    first = feeds[0] if feeds else {}
    kinds = ", ".join(f"{name} {'x'.join(map(str, np.shape(value)))}" for name, value in first.items())
    drawn = "random token ids" if any(np.issubdtype(np.asarray(v).dtype, np.integer) for v in first.values()) \
        else "random values"
    recorded = {p.key: p.value for p in model.metadata_props}.get("tqc.tokenizer")
    how = "--data sentences.txt (one text per line; the model records its tokenizer)" if recorded else \
        "--data sentences.txt --tokenizer FOLDER (or .npz / polygraphy .json arrays)"
    return (f"no --data: compared on {len(feeds)} batches of {drawn}, not text ({kinds}; seed 0); "
            f"errors on real inputs can differ: give them with {how}")


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


def sensitivity(reference: ModelLike, candidate: ModelLike, feeds, progress=lambda m: None) -> dict:
    """Rank the candidate's quantized sites by the output error (mean relative L2 against the reference) each
    one removes alone in float, then each op class; the ranker is the accuracy budget's
    (``tqc.compiler.analysis.sensitivity``), over the same site ids.

    The reference runs once (its weights then released); each variant of the candidate is a graph over the
    candidate's own arrays, run without an export (``GraphSession``)."""
    from tqc.compiler.io.graph import to_graph

    ref = Side.of(reference, "reference")
    outputs = [o.name for o in ref.skeleton.graph.output]
    expected = StoredOutputs(outputs)
    for values in ref.outputs_per_feed(feeds, None):
        expected.add(values)
        del values
    if isinstance(candidate, (str, os.PathLike)):
        candidate = load_model_lean(candidate)
    lean = candidate if isinstance(candidate, LeanModel) else LeanModel(candidate)
    masks = compare.padding_masks(feeds)

    def error_with_float(ids: frozenset[str]) -> float:
        graph = to_graph(lean.skeleton, lean.weights)  # the arrays are shared, never written: unquantize rewires
        if ids:
            unquantize(graph, ids)
        metrics = merged_metrics(outputs_per_feed(graph, feeds, outputs), expected.value, outputs, masks,
                                 compare.fixed_width_outputs(lean.skeleton.graph.output))
        return float(np.mean([m.rel_l2 for m in metrics.values()]))

    ids = list(dict.fromkeys(sid for sid, _ in quantized_sites(to_graph(lean.skeleton, lean.weights))))
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
