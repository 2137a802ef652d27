"""The one comparison engine behind ``--verify numeric``, ``tqc diff`` and ``qdq``'s sensitivity step.

Models run on ONNX Runtime CPU with graph optimizations off, through polygraphy's runners and Comparator,
so that the saved inputs and outputs are polygraphy's own JSON formats and the printed ``polygraphy run``
command reproduces the comparison. Outputs are paired by exact name only: polygraphy's default matcher falls
back to substring and position matches, which pair the wrong tensors after a fusion.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import input_role_by_name
from tqc.compiler.runtime.feeds import Feed

ORT_LEVEL_FLAG = "--graph-optimization-level ORT_DISABLE_ALL"


@contextlib.contextmanager
def quiet_polygraphy():
    from polygraphy.logger import G_LOGGER
    from polygraphy.logger import logger as polygraphy_logger

    if polygraphy_logger.COLORED_MODULE_PRESENT is None:  # avoid its "install colored" banner
        polygraphy_logger.COLORED_MODULE_PRESENT = False
    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.module_severity = old


def exact_name_matcher(output_name: str, index: int, iter_result) -> list[str]:
    """polygraphy ``find_output_func`` that pairs outputs only when their names are equal."""
    return [output_name] if output_name in iter_result else []


@dataclass
class TensorMetrics:
    """Error statistics of a candidate tensor against a reference tensor."""

    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    sqnr_db: float

    def as_dict(self) -> dict:
        """JSON-safe: infinite values become the strings "inf" / "-inf"."""
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else ("inf" if v > 0 else "-inf"))
                for k, v in asdict(self).items()}


def tensor_metrics(name: str, reference: np.ndarray, candidate: np.ndarray) -> TensorMetrics:
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cand = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != cand.shape:
        raise ValueError(f"tensor '{name}': shapes differ {np.shape(reference)} vs {np.shape(candidate)}")
    finite = np.isfinite(ref) & np.isfinite(cand)
    if not finite.all():
        # Equal infinities (additive masks) agree; any other non-finite value is an infinite error.
        if np.any(~finite & (ref != cand)):
            return TensorMetrics(name, list(np.shape(reference)), math.inf, math.inf, math.inf, 0.0, -math.inf)
        ref, cand = ref[finite], cand[finite]
    diff = cand - ref
    signal = float(np.dot(ref, ref))
    noise = float(np.dot(diff, diff))
    if ref.size == 0:
        return TensorMetrics(name, list(np.shape(reference)), 0.0, 0.0, 0.0, 1.0, math.inf)
    norm_ref = math.sqrt(signal)
    norm_cand = math.sqrt(float(np.dot(cand, cand)))
    if norm_ref == 0.0 and norm_cand == 0.0:
        cosine = 1.0
    elif norm_ref == 0.0 or norm_cand == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(ref, cand) / (norm_ref * norm_cand))
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    return TensorMetrics(
        name=name,
        shape=list(np.shape(reference)),
        max_abs=float(np.max(np.abs(diff))),
        mean_abs=float(np.mean(np.abs(diff))),
        rel_l2=math.sqrt(noise) / norm_ref if norm_ref else (0.0 if noise == 0 else math.inf),
        cosine=cosine,
        sqnr_db=sqnr,
    )


def merge_metrics(per_iteration: Sequence[TensorMetrics]) -> TensorMetrics:
    """Worst case over iterations (max errors, min cosine and SQNR)."""
    first = per_iteration[0]
    return TensorMetrics(
        name=first.name, shape=first.shape,
        max_abs=max(m.max_abs for m in per_iteration),
        mean_abs=float(np.mean([m.mean_abs for m in per_iteration])),
        rel_l2=max(m.rel_l2 for m in per_iteration),
        cosine=min(m.cosine for m in per_iteration),
        sqnr_db=min(m.sqnr_db for m in per_iteration),
    )


def ort_cpu_runner(model: onnx.ModelProto | str | bytes, name: str):
    """A polygraphy runner on ORT CPU with graph optimizations off."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    loader = SessionFromOnnx(source, providers=["cpu"],
                             graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return OnnxrtRunner(loader, name=name)


def run_model(model: onnx.ModelProto | str, feeds: list[Feed], name: str, runtime: str = "ort"):
    """Run one model over ``feeds``; returns polygraphy RunResults with one entry. ``runtime``: ``ort`` (ORT
    CPU, optimizations off) or ``openvino`` (OpenVINO CPU, FP32 precision; see ``compiler/io/openvino_ir.py``)."""
    from polygraphy.comparator import Comparator

    if runtime == "openvino":
        from tqc.compiler.io.openvino_ir import polygraphy_runner

        runner = polygraphy_runner(model, name)
    elif runtime == "ort":
        runner = ort_cpu_runner(model, name)
    else:
        raise TqcError(f"runtime must be ort or openvino, got '{runtime}'")
    with quiet_polygraphy():
        return Comparator.run([runner], data_loader=feeds)


@dataclass
class Comparison:
    passed: bool
    atol: float
    rtol: float
    outputs: dict[str, TensorMetrics]
    missing: list[str]
    min_cosine: float | None = None

    def as_dict(self) -> dict:
        bounds = ({"min_cosine": self.min_cosine} if self.min_cosine is not None else
                  {"atol": self.atol, "rtol": self.rtol})
        return {"passed": self.passed, **bounds, "missing": self.missing,
                "outputs": {k: v.as_dict() for k, v in self.outputs.items()}}

    def worst(self) -> TensorMetrics | None:
        if not self.outputs:
            return None
        return max(self.outputs.values(), key=lambda m: m.max_abs)


def padding_masks(feeds) -> list[np.ndarray] | None:
    """The attention mask of each feed, when the model takes one (padding positions carry no meaning)."""
    masks = []
    for feed in feeds:
        mask = next((np.asarray(v) for k, v in feed.items() if input_role_by_name(k) == "attention_mask"
                     and np.ndim(v) == 2), None)
        if mask is None:
            return None
        masks.append(mask)
    return masks


def fixed_width_outputs(outputs) -> set[str]:
    """Names of the graph outputs (ONNX ValueInfoProtos or gs Variables) whose axis 1 is declared a fixed size.

    The sequence axis of a token-level output is dynamic; a fixed axis 1 is a feature axis (a pooled
    [batch, hidden] embedding, logits of a classifier), never padding, even when its size happens to equal a
    batch's sequence length: such outputs are compared whole (``mask_padding`` does not apply to them)."""
    fixed = set()
    for out in outputs:
        if isinstance(out, onnx.ValueInfoProto):
            dims = out.type.tensor_type.shape.dim
            second = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
        else:  # gs.Variable
            shape = out.shape or []
            second = shape[1] if len(shape) > 1 and isinstance(shape[1], int) and shape[1] >= 0 else None
        if second:
            fixed.add(out.name)
    return fixed


def mask_padding(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Zero the padded [batch, sequence] rows of a tensor laid out [batch, sequence, ...]."""
    if mask is None or value.ndim < 2 or tuple(value.shape[:2]) != tuple(mask.shape):
        return value
    keep = mask.reshape(mask.shape + (1,) * (value.ndim - 2)).astype(bool)
    return np.where(keep, value, 0)


def compare_results(reference, candidate, atol: float, rtol: float,
                    names: Iterable[str] | None = None, min_cosine: float | None = None,
                    masks: list[np.ndarray] | None = None, unmasked: Iterable[str] = ()) -> Comparison:
    """Compare two polygraphy (runner_name, [IterationResult]) pairs by exact output names.

    The verdict comes from polygraphy's ``CompareFunc.simple`` (elementwise |a-b| <= atol + rtol*|b|), or
    from the cosine when ``min_cosine`` is set; the metrics are tqc's. With ``masks`` (one per iteration),
    padded positions of [batch, sequence, ...] tensors are left out of the metrics, except in the outputs named
    in ``unmasked`` (``fixed_width_outputs``: a fixed axis 1 is no sequence).
    """
    from polygraphy.comparator import CompareFunc

    ref_name, ref_iters = reference
    cand_name, cand_iters = candidate
    finite = min_cosine is None
    compare = CompareFunc.simple(atol=atol if finite else 0.0, rtol=rtol if finite else 0.0,
                                 find_output_func=exact_name_matcher, check_shapes=True)
    wanted = list(names) if names is not None else list(ref_iters[0].keys())
    unmasked = set(unmasked)
    passed = True
    per_output: dict[str, list[TensorMetrics]] = {}
    missing: list[str] = []
    with quiet_polygraphy():
        for iteration, (ref_iter, cand_iter) in enumerate(zip(ref_iters, cand_iters)):
            mask = masks[iteration] if masks is not None and iteration < len(masks) else None
            ref_sub = _subset(ref_iter, wanted)
            cand_sub = _subset(cand_iter, wanted)
            missing = [n for n in wanted if n not in cand_sub]
            result = compare(ref_sub, cand_sub)
            passed = passed and bool(result) and all(bool(v) for v in result.values()) and not missing
            for name in wanted:
                if name in cand_sub and name in ref_sub:
                    name_mask = None if name in unmasked else mask
                    per_output.setdefault(name, []).append(
                        tensor_metrics(name, mask_padding(np.asarray(ref_sub[name]), name_mask),
                                       mask_padding(np.asarray(cand_sub[name]), name_mask)))
    merged = {k: merge_metrics(v) for k, v in per_output.items()}
    if min_cosine is not None:  # statistical verdict (quantization): every output keeps this cosine
        passed = not missing and all(m.cosine >= min_cosine for m in merged.values())
    return Comparison(passed=passed and len(ref_iters) == len(cand_iters), atol=atol, rtol=rtol,
                      outputs=merged, missing=missing, min_cosine=min_cosine)


def _subset(iter_result, names: list[str]):
    from polygraphy.comparator.struct import IterationResult

    return IterationResult({n: iter_result[n] for n in names if n in iter_result},
                           runner_name=iter_result.runner_name)


def polygraphy_command(model_path: str, inputs_json: str, reference_outputs_json: str,
                       atol: float, rtol: float) -> str:
    """The ``polygraphy run`` command that reruns a model and compares it to saved reference outputs."""
    return (f"polygraphy run {model_path} --onnxrt {ORT_LEVEL_FLAG} --load-inputs {inputs_json} "
            f"--load-outputs {reference_outputs_json} --atol {atol:g} --rtol {rtol:g}")
