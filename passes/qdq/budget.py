"""Accuracy protection for ``qdq{budget=...}``: keep the most harmful quantized sites in float.

    float reference = the graph before any Q/DQ rewrite (no QAttention, no expansion): its outputs on the
                      calibration batches
    candidate(S)    = copy of the float graph -> plan with S in float -> insert
    error(S)        = 1 - mean output cosine of candidate(S) to the reference

    1. error(∅) within 1 - budget: done
    2. else rank the plan's sites by the error each removes alone in float (``tqc.compiler.analysis.sensitivity``,
       the ranker ``tqc diff --sensitivity`` uses), and return them to float, most useful first, until met

Every graph runs as it is (``tqc.compiler.runtime.graph_session``): candidates are shallow copies of the float graph
that share its weight arrays, and ONNX Runtime borrows those arrays instead of loading an exported copy, so a
bert-base measurement costs its activations, not 440 MB of weights. Padding positions are left out of the
cosine with the comparison engine's masks (``tqc.compiler.runtime.compare``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.sensitivity import Measured, rank, return_to_float
from tqc.compiler.io.graph import skeleton_of_graph
from tqc.compiler.runtime import compare
from tqc.compiler.runtime.feeds import Feed

MAX_BATCHES = 4


def run_graph(graph: gs.Graph, feeds: Sequence[Feed], runtime: str = "ort") -> list[dict[str, np.ndarray]]:
    """The graph's outputs for every feed, on ORT CPU with optimizations off, without exporting it; or, with
    ``runtime="openvino"``, exported and run on OpenVINO CPU (FP32 precision: its INT8 kernels where Q/DQ is)."""
    if runtime == "openvino":
        from tqc.compiler.io.graph import to_model
        from tqc.compiler.io.openvino_ir import run_onnx

        return run_onnx(to_model(graph), feeds)
    from tqc.compiler.runtime.graph_session import GraphSession

    session = GraphSession(graph)
    return [dict(zip(session.output_names, session.run(session.output_names, feed))) for feed in feeds]


def mean_output_cosine(ref_iters: list[dict], cand_iters: list[dict], feeds: Sequence[Feed],
                       unmasked: set[str] = frozenset()) -> float:
    """Per-sample cosine of every output, averaged over samples and outputs.

    Padding positions carry no meaning: the comparison engine's padding masks leave them out (not in the
    ``unmasked`` outputs, whose axis 1 is fixed: ``compare.fixed_width_outputs``).
    """
    masks = compare.padding_masks(feeds) or [None] * len(ref_iters)
    values = []
    for mask, ref, cand in zip(masks, ref_iters, cand_iters):
        for name in ref.keys():
            name_mask = None if name in unmasked else mask
            a = compare.mask_padding(np.asarray(ref[name], np.float64), name_mask)
            b = compare.mask_padding(np.asarray(cand[name], np.float64), name_mask)
            a = a.reshape(a.shape[0], -1)
            b = b.reshape(b.shape[0], -1)
            num = (a * b).sum(axis=1)
            den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            values.extend(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).tolist())
    return float(np.mean(values)) if values else 1.0


def budget_feeds(graph: gs.Graph, batches: list[Feed]) -> list[Feed]:
    """The first calibration (else verification) batches, else inputs drawn from the graph's signature."""
    feeds = batches[:MAX_BATCHES]
    if not feeds:
        from tqc.compiler.runtime.feeds import synthesize_feeds

        feeds = synthesize_feeds(skeleton_of_graph(graph))
    return feeds


@dataclass
class BudgetResult:
    full_cosine: float                                           # every site quantized
    achieved: float                                              # with ``kept`` in float
    kept: list[str] = field(default_factory=list)                # site ids returned to float, most useful first
    sensitivity: dict[str, float] = field(default_factory=dict)  # site id -> output error (1 - cosine) it removes
                                                                 # alone in float, largest first (when ranked)


def enforce_budget(float_graph: gs.Graph, site_ids: Sequence[str], quantized: Callable[[frozenset[str]], gs.Graph],
                   feeds: Sequence[Feed], budget: float, runtime: str = "ort") -> BudgetResult:
    """``quantized(S)``: a new quantized graph with the sites ``S`` in float (``float_graph`` is not touched)."""
    reference = run_graph(float_graph, feeds, runtime)
    unmasked = compare.fixed_width_outputs(float_graph.outputs)
    cosines: dict[frozenset[str], float] = {}

    def error_with_float(ids: frozenset[str]) -> float:
        cosines[ids] = mean_output_cosine(reference, run_graph(quantized(ids), feeds, runtime), feeds, unmasked)
        return 1.0 - cosines[ids]

    measure = Measured(error_with_float)
    measure(())
    full = cosines[frozenset()]
    if full >= budget:
        return BudgetResult(full, full)
    ranking = rank(list(site_ids), measure, 1.0 - full)
    kept, _ = return_to_float(ranking, measure, 1.0 - budget)
    return BudgetResult(full, cosines[frozenset(kept)], kept, ranking.removed)
