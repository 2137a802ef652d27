"""Accuracy protection for ``qdq{budget=...}``: keep the most harmful quantized MatMuls in float.

    1. quantize every site; measure the mean output cosine to the float graph on calibration batches
    2. if below the budget: quantize one site at a time and rank the sites by the cosine each one costs
    3. return sites to float, most harmful first, until the budget is met

Every graph runs as it is (``tqc.compiler.runtime.graph_session``): candidates are shallow copies of the float graph
that share its weight arrays, and ONNX Runtime borrows those arrays instead of loading an exported copy, so a
bert-base measurement costs its activations, not 440 MB of weights. Padding positions are left out of the
cosine with the comparison engine's masks (``tqc.compiler.runtime.compare``).
"""

from __future__ import annotations

import numpy as np

from tqc.compiler.runtime import compare
from tqc.compiler.io.graph import skeleton_of_graph

MAX_BATCHES = 4


def run_graph(graph, feeds, runtime: str = "ort") -> list[dict[str, np.ndarray]]:
    """The graph's outputs for every feed, on ORT CPU with optimizations off, without exporting it; or, with
    ``runtime="openvino"``, exported and run on OpenVINO CPU (FP32 precision: its INT8 kernels where Q/DQ is)."""
    if runtime == "openvino":
        from tqc.compiler.io.graph import to_model
        from tqc.compiler.io.openvino_ir import run_onnx

        return run_onnx(to_model(graph), feeds)
    from tqc.compiler.runtime.graph_session import GraphSession

    session = GraphSession(graph)
    return [dict(zip(session.output_names, session.run(session.output_names, feed))) for feed in feeds]


def mean_output_cosine(ref_iters: list[dict], cand_iters: list[dict], feeds) -> float:
    """Per-sample cosine of every output, averaged over samples and outputs.

    Padding positions carry no meaning: the comparison engine's padding masks leave them out.
    """
    masks = compare.padding_masks(feeds) or [None] * len(ref_iters)
    values = []
    for mask, ref, cand in zip(masks, ref_iters, cand_iters):
        for name in ref.keys():
            a = compare.mask_padding(np.asarray(ref[name], np.float64), mask)
            b = compare.mask_padding(np.asarray(cand[name], np.float64), mask)
            a = a.reshape(a.shape[0], -1)
            b = b.reshape(b.shape[0], -1)
            num = (a * b).sum(axis=1)
            den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            values.extend(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0).tolist())
    return float(np.mean(values)) if values else 1.0


def enforce_budget(qpass, graph, ctx, sites) -> list[str]:
    budget = qpass.values["budget"]
    feeds = (ctx.calibration_batches() or ctx.verification_feeds or [])[:MAX_BATCHES]
    if not feeds:
        from tqc.compiler.runtime.feeds import synthesize_feeds

        feeds = synthesize_feeds(skeleton_of_graph(graph))
    float_graph = graph.copy()  # shares the weight arrays; qdq never writes into them
    runtime = qpass.values.get("budget_runtime", "ort")
    reference = run_graph(float_graph, feeds, runtime)
    names = [site.node.name for site in sites]

    def cosine(skip: set[str]) -> float:
        candidate_graph = float_graph.copy()
        qpass.apply(candidate_graph, ctx, [], skip)
        return mean_output_cosine(reference, run_graph(candidate_graph, feeds, runtime), feeds)

    full = cosine(set())
    qpass.state.full_cosine = full
    if full >= budget:
        ctx.note(f"qdq: output cosine {full:.5f} with every MatMul quantized meets the budget {budget}")
        qpass.state.skip = []
        return []
    sensitivity = {}
    for name in names:
        sensitivity[name] = 1.0 - cosine(set(names) - {name})
    qpass.state.sensitivity = dict(sorted(sensitivity.items(), key=lambda kv: -kv[1]))
    kept: list[str] = []
    achieved = full
    for name in sorted(names, key=lambda n: -sensitivity[n]):
        kept.append(name)
        achieved = cosine(set(kept))
        if achieved >= budget:
            break
    ctx.note(f"qdq: output cosine {full:.5f} with every MatMul quantized; {achieved:.5f} with {len(kept)} kept "
             f"in float (budget {budget})")
    qpass.state.skip = kept
    return kept
