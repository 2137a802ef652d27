"""qdq as analysis then rewrite: the plan is pure and its site ids are stable; the accuracy budget and
``tqc diff --sensitivity`` rank the same ids with the same ranker, against the graph before any rewrite."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tqc.compiler.analysis.calibration import CalibrationTable
from tqc.compiler.analysis.sensitivity import Measured, rank, return_to_float
from tqc.compiler.core.target import Target
from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.tools.diff import sensitivity
from tqc.passes.base import PassContext
from tqc.passes.qdq import Qdq
from tqc.passes.qdq.budget import mean_output_cosine, run_graph
from tqc.passes.qdq.lower import lower
from tqc.passes.qdq.plan import (QdqPlan, attention_of_qattention, plan_sites, qattention_node_name, qattention_tag,
                                 quantized_sites)

DAMAGED = "/model/encoder/layer.0/intermediate/dense/MatMul"


@pytest.fixture(scope="module")
def bert(exports):
    path = exports.get("bert", size="tiny")
    model = load_model(path)
    return path, synthesize_feeds(model, count=2)


def run(path, pipeline: str, target: str, feeds, table: CalibrationTable | None = None):
    """(compiled model, manager, ctx)."""
    ctx = PassContext(target=target, verification_feeds=feeds, calibration=table)
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline(pipeline), ctx)
    return manager.run(load_model(path)), manager, ctx


def fused_and_table(path, target: str, feeds, qdq: str = "qdq"):
    """The float graph qdq sees (after fold,fuse) and the calibration table measured on it (with
    value_equalize, on trt by default, qdq sees V equalized and renamed: pass ``qdq{value_equalize=false}``
    where the plan is compared with this graph's)."""
    fused, _, _ = run(path, "fold,fuse", target, feeds)
    _, manager, ctx = run(path, f"fold,fuse,{qdq}", target, feeds)
    return fused, ctx.calibration, manager.passes[-1]


def plan_for(graph, target: str, qdq: Qdq, table, ctx_feeds) -> QdqPlan:
    ctx = PassContext(target=target, verification_feeds=ctx_feeds, calibration=table)
    ctx.calibration_source = ctx_feeds
    return plan_sites(graph, ctx.target, qdq.plan_options(graph, ctx), table)


def graph_bytes(graph) -> bytes:
    return to_model(graph.copy()).SerializeToString()


@pytest.mark.parametrize("target", ["trt", "ort-cpu", "ort-cuda"])
def test_plan_is_pure_and_its_ids_are_stable(target, bert):
    path, feeds = bert
    fused, table, qdq = fused_and_table(path, target, feeds, "qdq{value_equalize=false}")
    graph = to_graph(fused)
    before, nodes = graph_bytes(graph), list(graph.nodes)
    first = plan_for(graph, target, qdq, table, feeds)
    second = plan_for(graph, target, qdq, table, feeds)
    assert graph_bytes(graph) == before and list(graph.nodes) == nodes  # planning rewrote nothing
    assert first.site_ids == second.site_ids and first.sites == second.sites and len(first.site_ids) >= 8
    names = {n.name for n in graph.nodes}
    if target == "trt":  # no lowering: every id is a node of the float graph; 8 linear + 4 attention (INT8 MHA)
        assert set(first.site_ids) <= names and len(first.site_ids) == 12
    elif target == "ort-cpu":  # QAttention sites answer to their Attention node; the other 6 are MatMuls
        assert [s.id for s in first.qattention] == ["tqc_attn0", "tqc_attn1"] and set(first.site_ids) <= names
    else:  # the QKV MatMuls exist once the attentions are expanded (as insert expands them)
        lowered = graph.copy()
        lower(lowered, Target.named(target))
        assert set(first.site_ids) <= {n.name for n in lowered.nodes} and not first.qattention
        assert {"tqc_xattn0_qkv_matmul", "tqc_xattn1_qkv_matmul"} <= set(first.site_ids)


def test_qattention_names_invert():
    name = qattention_node_name(qattention_tag("tqc_attn3", 12))
    assert name == "tqc_attn3_tqc_q12_QAttention" and attention_of_qattention(name) == "tqc_attn3"
    assert attention_of_qattention("tqc_attn3_QAttention") is None
    assert attention_of_qattention("x_tqc_qa_QAttention") is None


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_diff_finds_the_plans_site_ids_in_the_quantized_graph(target, bert):
    path, feeds = bert
    spec = "qdq{value_equalize=false}"  # the plan is made on the fused graph as it is (fused_and_table)
    fused, table, qdq = fused_and_table(path, target, feeds, spec)
    plan = plan_for(to_graph(fused), target, qdq, table, feeds)
    quantized, _, _ = run(path, f"fold,fuse,{spec}", target, feeds)
    found = [sid for sid, _ in quantized_sites(to_graph(quantized))]
    assert sorted(found) == sorted(plan.site_ids)
    if target == "ort-cpu":
        assert {"tqc_attn0", "tqc_attn1"} <= set(found)


def damaged_table(table: CalibrationTable, tensor: str) -> CalibrationTable:
    """The table with one tensor's range 1000x too wide: that site's activation quantizes to almost nothing."""
    damaged = copy.deepcopy(table)
    entry = damaged.tensors[tensor]
    entry.amax = {k: v * 1000 for k, v in entry.amax.items()}
    entry.lo = {k: v * 1000 - 1000 for k, v in entry.lo.items()}
    entry.hi = {k: v * 1000 + 1000 for k, v in entry.hi.items()}
    return damaged


def test_budget_and_diff_rank_a_damaged_site_first(bert):
    path, feeds = bert
    fused, table, _ = fused_and_table(path, "ort-cpu", feeds)
    graph = to_graph(fused)
    tensor = next(n for n in graph.nodes if n.name == DAMAGED).inputs[0].name
    damaged = damaged_table(table, tensor)
    # the budget (1 - output cosine to the float graph)
    # bias correction (on by default with data) would take out part of the damage: off, to rank the damage alone
    _, manager, _ = run(path, "fold,fuse,qdq{budget=1,smooth=0,bias_correct=false}", "ort-cpu", feeds, damaged)
    state = manager.passes[-1].state
    assert next(iter(state.sensitivity)) == DAMAGED and state.skip[0] == DAMAGED
    others = [v for k, v in state.sensitivity.items() if k != DAMAGED]
    assert state.sensitivity[DAMAGED] > 100 * max(others) and state.full_cosine < 0.9999
    # tqc diff --sensitivity (relative L2 of the outputs), on the candidate compiled with the same table
    candidate, _, _ = run(path, "fold,fuse,qdq{smooth=0,bias_correct=false}", "ort-cpu", feeds, damaged)
    ranking = sensitivity(load_model(path), candidate, feeds)
    assert ranking["nodes"][0]["node"] == DAMAGED and ranking["nodes"][0]["share"] > 0.9
    assert {r["node"] for r in ranking["nodes"]} == {"tqc_attn0", "tqc_attn1"} | set(state.sensitivity) - {
        "tqc_xattn0_qkv_matmul", "tqc_xattn1_qkv_matmul"}  # the same ids: QKV as QAttention there, MatMul here


def test_budget_float_reference_is_the_graph_before_any_rewrite(bert):
    """With QAttention on, the old budget measured against a reference that already held the QAttention
    (INT8) nodes; now its full cosine is the cosine of the fully quantized graph to the untouched float graph,
    and the QAttention sites are ranked like any other."""
    path, feeds = bert
    fused, _, _ = run(path, "fold,fuse", "ort-cpu", feeds)
    quantized, _, _ = run(path, "fold,fuse,qdq{qattention=true}", "ort-cpu", feeds)
    _, manager, _ = run(path, "fold,fuse,qdq{qattention=true,budget=1}", "ort-cpu", feeds)
    state = manager.passes[-1].state
    expected = mean_output_cosine(run_graph(to_graph(fused), feeds), run_graph(to_graph(quantized), feeds), feeds)
    assert state.full_cosine == pytest.approx(expected, abs=1e-12) and expected < 1.0
    assert {"tqc_attn0", "tqc_attn1"} <= set(state.sensitivity) and len(state.sensitivity) == 8


def test_ranker_returns_sites_to_float_until_the_target():
    """error = sum of the quantized sites' costs: ranked by cost, returned greedily, each set measured once."""
    cost = {"a": 0.1, "b": 0.5, "c": 0.2, "d": 0.2}
    calls = []

    def error_with_float(ids: frozenset[str]) -> float:
        calls.append(ids)
        return sum(v for k, v in cost.items() if k not in ids)

    measure = Measured(error_with_float)
    ranking = rank(list(cost), measure)
    assert ranking.baseline == pytest.approx(1.0) and ranking.order == ["b", "c", "d", "a"]
    kept, error = return_to_float(ranking, measure, 0.35)
    assert kept == ["b", "c"] and error == pytest.approx(0.3)
    assert len(calls) == len(set(calls)) == 1 + 4 + 1  # baseline, one per site, then only {b, c} is new
    assert return_to_float(ranking, measure, 2.0) == ([], 1.0)
    assert np.isclose(ranking.share(ranking.removed["b"]), 0.5)
