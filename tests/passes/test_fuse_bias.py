"""Attention with an additive bias computed elsewhere in the graph: MPNet's relative position bias (rule
``eager-bias``, Softmax(Q K^T * scale + bias + mask) V) and DeBERTa-v3's c2p + p2c scores (rule
``disentangled``: heads flattened for bmm, the mask as masked_fill). ``-p fuse`` alone, both exporters, every
target: N/N attention fused, the bias subgraph kept as it is and feeding the fused op, outputs within 1e-4 of
the export on ORT CPU (two shapes, right padding on one row; padded positions compared too), and each product
computed once: the MatMul work after ``fuse`` is the work before it, less the Q K^T and P V products where a
contrib op takes them (DeBERTa's bias reads Q and K: they are projected once, not for the bias and again for
the fused core)."""

from __future__ import annotations

import numpy as np
import pytest

from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.runtime.activations import outputs_per_feed
from tqc.passes.base import PassContext

from .test_fuse_new_families import LAYERS, outputs_on, seeded_feeds


# family: (its rule, a node of its bias subgraph: MPNet's bucket Gather, computed once for all layers; DeBERTa's
# c2p and p2c GatherElements, two per layer)
FAMILIES = {"mpnet": ("eager-bias", lambda n: n.op_type == "Gather" and
                      "model.encoder.relative_attention_bias.weight" in n.input, 1),
            "deberta-v2": ("disentangled", lambda n: n.op_type == "GatherElements", 4)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda", "trt", "openvino"])
def test_attention_with_a_bias_fuses_exactly(family, exporter, target, exports):
    rule, in_bias, count = FAMILIES[family]
    model = load_model(exports.get(family, exporter=exporter, size="tiny"))
    ctx = PassContext(target=target, explain={"fuse"})
    manager = PassManager(parse_pipeline("fuse"), ctx, verify="numeric")
    fused = manager.run(model)
    stats = manager.records[0].stats
    assert stats["attention_summary"] == "2/2 attention fused", ctx.messages
    assert stats["attention_rules"] == rule
    feeds = seeded_feeds(model)
    for before, after in zip(outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert np.abs(before - after).max() <= 1e-4
    produced = {o: n for n in fused.graph.node for o in n.output}
    sources = [n for n in fused.graph.node if in_bias(n)]
    assert len(sources) == count  # the bias subgraph stays as it is
    if target.startswith("ort"):
        mha = [n for n in fused.graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha) == 2 and all(n.domain == "com.microsoft" for n in mha)
        assert not any(n.op_type == "Softmax" for n in fused.graph.node)
        for node in mha:
            assert len(node.input) == 6  # query, key, value, -, key_padding_mask, attention_bias
            assert (node.input[4] != "") == (family == "mpnet")  # DeBERTa's mask rides in the bias, as a fill
            assert _reaches(produced, node.input[5], sources)  # the bias is the graph's own
    else:
        assert all(n.domain in ("", "ai.onnx") for n in fused.graph.node)
        adds = [n for n in fused.graph.node if n.name.endswith("_bias_add")]
        assert len(adds) == 2 and all(_reaches(produced, n.input[1], sources) for n in adds)


def matmul_work(model, feed) -> tuple[int, int]:
    """(MatMul and FusedMatMul nodes, their multiply-accumulates) in a run of ``model`` on ``feed``: every
    operand's shape read from the run itself (constant operands from the graph), FusedMatMul's transposes
    applied."""
    constants = {t.name: tuple(t.dims) for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "FusedMatMul")]
    values = next(outputs_per_feed(model, [feed], [t for n in matmuls for t in n.input if t not in constants]))
    macs = 0
    for node in matmuls:
        a, b = (tuple(constants[t] if t in constants else values[t].shape) for t in node.input)
        flags = {attr.name: attr.i for attr in node.attribute}
        a = a[:-2] + a[-2:][::-1] if flags.get("transA") else a
        b = b[:-2] + b[-2:][::-1] if flags.get("transB") else b
        macs += int(np.prod(np.broadcast_shapes(a[:-2], b[:-2]))) * a[-2] * a[-1] * b[-1]
    return len(matmuls), macs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda", "trt", "openvino"])
def test_fused_attention_computes_each_product_once(family, exporter, target, exports):
    """Against ``fold`` (what fuse canonicalizes with: DeBERTa's constant position projections folded):
    standard targets keep every product (Q, K, V packed into one MatMul: two nodes fewer a layer, the same
    MACs); on ORT, Q, K and V are packed too and MultiHeadAttention takes Q K^T and P V, B·S·S·hidden MACs each
    a layer, and nothing else changes (the legacy DeBERTa export reshapes the biased scores by
    Shape(Q K^T + bias): a rewrite reading that shape would keep the old Q K^T computed)."""
    model = load_model(exports.get(family, exporter=exporter, size="tiny"))
    folded = PassManager(parse_pipeline("fold"), PassContext(target=target)).run(model)
    fused = PassManager(parse_pipeline("fuse"), PassContext(target=target), verify="numeric").run(model)
    feed = seeded_feeds(model)[0]
    before, after = matmul_work(folded, feed), matmul_work(fused, feed)
    out_before, out_after = outputs_on(folded, [feed])[0], outputs_on(fused, [feed])[0]
    assert np.abs(out_before - out_after).max() <= 1e-4
    batch, seq, hidden = out_before.shape
    layers = LAYERS[family]
    if target.startswith("ort"):
        assert after == (before[0] - 4 * layers, before[1] - 2 * layers * batch * seq * seq * hidden)
    else:
        assert after == (before[0] - 2 * layers, before[1])


def _reaches(produced: dict, tensor: str, nodes: list) -> bool:
    """Whether one of ``nodes`` is an ancestor of ``tensor``."""
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in produced:
            continue
        seen.add(name)
        if any(produced[name] is node for node in nodes):
            return True
        stack.extend(produced[name].input)
    return False


def test_a_term_derived_from_the_mask_is_no_bias(exports):
    """MPNet with its bias replaced by a second copy of the mask: the rule would move that term out of the
    mask's reach, so nothing is fused; --explain fuse says why, and the outputs stay exact."""
    model = load_model(exports.get("mpnet", size="tiny"))
    produced = {o: n for n in model.graph.node for o in n.output}
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        masked = produced[softmax.input[0]]                     # Add(Add(scores, bias), mask)
        inner = next(produced[t] for t in masked.input if produced.get(t) is not None and
                     produced[t].op_type == "Add")
        mask = next(t for t in masked.input if produced.get(t) is not inner)
        bias_slot = next(i for i, t in enumerate(inner.input) if produced[t].op_type != "Div")
        inner.input[bias_slot] = mask
    ctx = PassContext(target="ort-cpu", explain={"fuse"})
    manager = PassManager(parse_pipeline("fuse"), ctx, verify="numeric")
    fused = manager.run(model)
    assert manager.records[0].stats["attention_summary"] == "0/2 attention fused"
    lines = [m for m in ctx.messages if m.startswith("fuse: attention-shaped subgraph")]
    assert len(lines) == 2 and all("both operands derived from the attention mask input" in m for m in lines), lines
    feeds = seeded_feeds(model)
    for before, after in zip(outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert np.abs(before - after).max() <= 1e-4


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_deberta_masked_fill_survives_fp16_on_ort(exporter, exports):
    """DeBERTa's fill (-3.4e38) has no float16 value: the fused op takes the mask as -10000 in its bias and the
    rows masked whole as the mean of V, so fuse,fp16 verifies (fp16's own tolerance) and stays finite."""
    model = load_model(exports.get("deberta-v2", exporter=exporter, size="tiny"))
    manager = PassManager(parse_pipeline("fuse,fp16"), PassContext(target="ort-cpu"), verify="numeric")
    half = manager.run(model)
    assert manager.records[0].stats["attention_summary"] == "2/2 attention fused"
    feeds = seeded_feeds(model)
    for before, after in zip(outputs_on(model, feeds), outputs_on(half, feeds)):
        assert np.isfinite(after).all()
        a, b = before.reshape(-1), after.reshape(-1)
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.999
