"""Accuracy protection for ``qdq{budget=...}``: keep the most harmful quantized MatMuls in float.

    1. quantize every site; measure the mean output cosine to the float graph on calibration batches
    2. if below the budget: quantize one site at a time and rank the sites by the cosine each one costs
    3. return sites to float, most harmful first, until the budget is met

Every measurement runs through the shared comparison engine (``tqc.compiler.compare``).
"""

from __future__ import annotations

import numpy as np

from tqc.compiler import compare
from tqc.compiler.graph_io import to_graph, to_model

MAX_BATCHES = 4


def mean_output_cosine(reference, candidate, feeds) -> float:
    """Per-sample cosine of every output, averaged over samples and outputs.

    Padding positions carry no meaning: the comparison engine's padding masks leave them out.
    """
    ref_iters = list(reference.items())[0][1]
    cand_iters = list(candidate.items())[0][1]
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
    feeds = (ctx.analyses.get("calibration_feeds") or ctx.verification_feeds or [])[:MAX_BATCHES]
    if not feeds:
        from tqc.compiler.feeds import synthesize_feeds

        feeds = synthesize_feeds(to_model(graph))
    float_model = to_model(graph)
    reference = compare.run_model(float_model, feeds, name="float")
    names = [site.node.name for site in sites]

    def cosine(skip: set[str]) -> float:
        candidate_graph = to_graph(float_model)
        qpass.apply(candidate_graph, ctx, [], skip)
        return mean_output_cosine(reference, compare.run_model(to_model(candidate_graph), feeds, name="int8"), feeds)

    full = cosine(set())
    ctx.analyses["qdq_full_cosine"] = full
    if full >= budget:
        ctx.note(f"qdq: output cosine {full:.5f} with every MatMul quantized meets the budget {budget}")
        ctx.analyses["qdq_skip"] = []
        return []
    sensitivity = {}
    for name in names:
        sensitivity[name] = 1.0 - cosine(set(names) - {name})
    ctx.analyses["qdq_sensitivity"] = dict(sorted(sensitivity.items(), key=lambda kv: -kv[1]))
    kept: list[str] = []
    achieved = full
    for name in sorted(names, key=lambda n: -sensitivity[n]):
        kept.append(name)
        achieved = cosine(set(kept))
        if achieved >= budget:
            break
    ctx.note(f"qdq: output cosine {full:.5f} with every MatMul quantized; {achieved:.5f} with {len(kept)} kept "
             f"in float (budget {budget})")
    ctx.analyses["qdq_skip"] = kept
    return kept
