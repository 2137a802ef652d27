"""INT8 attention on the fused cores of the newer families (``qdq`` on trt): MPNet's and DeBERTa-v3's biased
attention (``tqc_attn<i>``) and ModernBERT's rotary cores (``tqc_core<i>``), both exporters where the family
has them. Each block's two batched MatMuls (Q K^T, probs V) are planned as attention sites and get Q/DQ on
both inputs; the bias and rotary subgraphs stay float; INT8 keeps the outputs and every block's context at
cosine >= 0.99 on seeded held-out token ids; sequences past TensorRT's INT8 MHA limit leave
them in float, and openvino quantizes them only when asked (``attention=true``); ``tqc check`` counts them as
INT8 MHA; the accuracy budget and ``tqc diff --sensitivity`` rank the new sites."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tqc.compiler.analysis.calibration import CalibrationTable
from tqc.compiler.core.target import CALIBRATION_LENGTHS, Target
from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.tools.diff import sensitivity
from tqc.compiler.tools.trt_check import check_trt
from tqc.passes.base import PassContext
from tqc.passes.qdq.plan import PlanOptions, plan_sites
from tqc.passes.qdq.value_equalize import equalize_values

from .test_fuse_new_families import LAYERS, outputs_on, seeded_feeds

# (family, exporter, attention implementation at export): ModernBERT's legacy sdpa export (-inf masks behind a
# NaN guard, fused with nan_guard.py's row factor) and its eager export, the legacy exporter's default.
CASES = [("mpnet", "legacy", None), ("mpnet", "dynamo", None), ("deberta-v2", "legacy", None),
         ("deberta-v2", "dynamo", None), ("modernbert", "dynamo", None), ("modernbert", "legacy", "eager"),
         ("modernbert", "legacy", "sdpa")]
PREFIX = {"mpnet": "tqc_attn", "deberta-v2": "tqc_attn", "modernbert": "tqc_core"}
PAIR = {"tqc_attn": ("qk", "pv"), "tqc_core": ("scores", "context_heads")}


def compile_with(path, pipeline: str, target: str = "trt"):
    """(compiled model, manager, ctx), calibrated on 4 seeded batches of token ids (16 tokens)."""
    model = load_model(path)
    calibration = synthesize_feeds(model, count=4, seed=3)
    ctx = PassContext(target=target, calibration_source=calibration, verification_feeds=calibration[:2])
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric")
    return manager.run(model), manager, ctx


def attention_pairs(model: onnx.ModelProto, family: str) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    prefix, (first, second) = PREFIX[family], PAIR[PREFIX[family]]
    nodes = {n.name: n for n in model.graph.node}
    return [(nodes[f"{prefix}{i}_{first}"], nodes[f"{prefix}{i}_{second}"]) for i in range(LAYERS[family])]


def quantized_input(produced: dict, tensor: str) -> bool:
    dq = produced.get(tensor)
    return dq is not None and dq.op_type == "DequantizeLinear" and produced[dq.input[0]].op_type == "QuantizeLinear"


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return extended


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("family, exporter, attn", CASES)
def test_trt_quantizes_every_fused_blocks_attention_matmuls(family, exporter, attn, exports):
    path = exports.get(family, exporter=exporter, attn=attn, size="tiny")
    fused, _, _ = compile_with(path, "fold,fuse")
    quantized, manager, _ = compile_with(path, "fold,fuse,qdq")
    layers = LAYERS[family]
    assert manager.records[1].stats["attention_summary"] == f"{layers}/{layers} attention fused"
    assert manager.records[-1].stats["attention_bmm"] == 2 * layers
    produced = {o: n for n in quantized.graph.node for o in n.output}
    pairs = attention_pairs(quantized, family)
    for qk, pv in pairs:  # N/N pairs: both inputs of both MatMuls through a Q/DQ pair
        assert all(quantized_input(produced, t) for t in [*qk.input, *pv.input]), (qk.name, pv.name)
    for node in quantized.graph.node:  # the bias and rotary subgraphs stay float: Q/DQ feed MatMuls only
        if node.op_type == "DequantizeLinear":
            users = [n.op_type for n in quantized.graph.node if node.output[0] in n.input]
            assert set(users) <= {"MatMul", "Gemm"}, (node.name, users)
    report = check_trt(quantized)  # tqc check reads the same blocks: head size 16, within TensorRT's limits
    assert len(report.attention) == layers and all(b["int8_mha"] and b["head_size"] == 16 for b in report.attention)
    # INT8 against float on held-out seeded token ids: the model's output and every block's context
    contexts = [pv.output[0] for _, pv in pairs]
    feeds = seeded_feeds(fused, seed=11)
    for before, after in zip(outputs_on(load_model(path), feeds), outputs_on(quantized, feeds)):
        assert cosine(before, after) >= 0.99
    # trt's value_equalize puts V, and so each context, in the basis (v - z) / e per channel (exact in float: the
    # output projection takes it back); the float reference takes the same rewrite on the same calibration data
    equalized = manager.records[-1].stats.get("values_equalized", 0)
    assert equalized in (0, layers)
    reference = fused
    if equalized:
        graph = to_graph(fused)
        assert equalize_values(graph, synthesize_feeds(load_model(path), count=4, seed=3)) == layers
        reference = to_model(graph, fused)
    sessions = [ort.InferenceSession(with_outputs(m, contexts).SerializeToString(),
                                     providers=["CPUExecutionProvider"]) for m in (reference, quantized)]
    for feed in feeds:
        expected, got = (s.run(contexts, feed) for s in sessions)
        for name, a, b in zip(contexts, expected, got):
            assert cosine(a, b) >= 0.99, name


def fused_graph_and_table(path) -> tuple:
    fused, _, _ = compile_with(path, "fold,fuse")
    # value_equalize off: with it the table's V ranges are those of the equalized graph, under its V's new names
    _, _, ctx = compile_with(path, "fold,fuse,qdq{value_equalize=false}")
    return to_graph(fused), ctx.calibration


@pytest.mark.parametrize("family", ["modernbert", "mpnet"])
def test_trt_limits_keep_the_new_cores_in_float(family, exports):
    path = exports.get(family, exporter="dynamo", size="tiny")
    graph, table = fused_graph_and_table(path)
    assert isinstance(table, CalibrationTable)
    trt = Target.named("trt")
    within = plan_sites(graph, trt, PlanOptions(max_sequence=(512, "the --shapes profile's max")), table)
    beyond = plan_sites(graph, trt, PlanOptions(max_sequence=(1024, "the --shapes profile's max")), table)
    attention = [s.id for s in within.sites if s.kind == "attention"]
    assert len(attention) == 2 * LAYERS[family]
    assert not [s for s in beyond.sites if s.kind == "attention"]
    assert any("exceed TensorRT's INT8 MHA limit of 512" in note for note in beyond.notes)
    assert {s.id for s in beyond.matmuls} >= set(attention)  # still counted in the FLOPs, in float
    # bounded by the calibration lengths alone (no position table: ModernBERT's rotary): quantized, with a note
    guessed = plan_sites(graph, trt, PlanOptions(max_sequence=(16, CALIBRATION_LENGTHS)), table)
    assert [s.id for s in guessed.sites if s.kind == "attention"] == attention
    assert sum("INT8 attention assumes sequences up to 16" in note for note in guessed.notes) == 1
    # off by default on openvino (float attention is faster there), on with attention=true as its facts say
    openvino = Target.named("openvino")
    assert not [s for s in plan_sites(graph, openvino, PlanOptions(attention=False), table).sites
                if s.kind == "attention"]
    assert [s.id for s in plan_sites(graph, openvino, PlanOptions(), table).sites
            if s.kind == "attention"] == attention


def test_budget_and_diff_sensitivity_rank_the_new_sites(exports):
    path = exports.get("modernbert", exporter="dynamo", size="tiny")
    core_sites = {f"tqc_core{i}_{m}" for i in range(LAYERS["modernbert"]) for m in PAIR["tqc_core"]}
    _, manager, ctx = compile_with(path, "fold,fuse,qdq{budget=1}")
    state = manager.passes[-1].state
    assert core_sites <= set(state.sensitivity)  # every site measured alone in float
    assert core_sites <= set(state.skip)  # budget 1 returns everything to float, the new sites too
    kept = next(m for m in ctx.messages if m.startswith("qdq: kept in float by the accuracy budget"))
    shares = dict(re.findall(r"(\S+) \(([\d.]+)%\)", kept))
    assert all(float(shares[site]) > 0 for site in core_sites)  # each named with its share of the MatMul MACs
    candidate, _, _ = compile_with(path, "fold,fuse,qdq")
    feeds = synthesize_feeds(load_model(path), count=2, seed=5)
    ranking = sensitivity(load_model(path), candidate, feeds)
    ranked = {r["node"]: r["error_removed"] for r in ranking["nodes"]}
    assert core_sites <= set(ranked)
    assert any(ranked[s] > 0 for s in core_sites)  # returning one to float changes the measured error
    assert any(c["class"] == "tqc_core*_scores" and c["nodes"] == LAYERS["modernbert"] for c in ranking["classes"])
