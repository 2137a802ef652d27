"""fuse and qdq on ModernBERT, DeBERTa-v2 and MPNet (tiny exports by tqc, both exporters; every attention fuses,
``test_fuse_bias.py`` and ``test_fuse_rotary.py`` have the rules): nothing is fused wrongly (the outputs stay within 1e-4 of the export on ORT CPU, on seeded
token ids at two shapes, ModernBERT's local window cut at both), every Softmax left unfused gets an
``--explain fuse`` line naming the closest rule and why, and INT8 keeps cosine >= 0.99."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.passes.base import PassContext

from ..models.test_heads import token_feed

MODERN = ("modernbert", "deberta-v2", "mpnet")
LAYERS = {"modernbert": 3, "deberta-v2": 2, "mpnet": 2}
SHAPES = ((3, 11), (2, 40))
EXPLAINED = re.compile(r"^fuse: attention-shaped subgraph at Softmax '(?P<softmax>[^']+)' not fused; closest rule "
                       r"'(?P<rule>[\w-]+)': (?P<reason>\S.{10,})$")


def outputs_on(model: onnx.ModelProto, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def seeded_feeds(model, seed=7):
    names = [i.name for i in model.graph.input]
    return [token_feed(names, batch, seq, seed=seed + index) for index, (batch, seq) in enumerate(SHAPES)]


@pytest.mark.parametrize("family", MODERN)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_fuse_is_exact_and_explains_every_unfused_attention(family, exporter, target, exports):
    model = load_model(exports.get(family, exporter=exporter, size="tiny"))
    ctx = PassContext(target=target, explain={"fuse"})
    manager = PassManager(parse_pipeline("fold,fuse"), ctx, verify="numeric")
    fused = manager.run(model)
    stats = manager.records[1].stats
    assert stats["attention_blocks"] == LAYERS[family]
    assert stats["attention"] == LAYERS[family], ctx.messages  # tqc's own exports fuse N/N, both exporters
    feeds = seeded_feeds(model)
    for before, after in zip(outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert np.abs(before - after).max() <= 1e-4
    explained = [m for m in (EXPLAINED.match(line) for line in ctx.messages) if m]
    softmaxes = {n.name for n in model.graph.node if n.op_type == "Softmax"}
    assert len(explained) + stats["attention"] == stats["attention_blocks"], ctx.messages
    assert {m["softmax"] for m in explained} <= softmaxes  # each names a Softmax of the graph, once
    assert len({m["softmax"] for m in explained}) == len(explained)
    if target == "trt":
        assert all(n.domain in ("", "ai.onnx") for n in fused.graph.node)


@pytest.mark.parametrize("family", MODERN)
@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_int8_keeps_the_answer(family, target, exports):
    model = load_model(exports.get(family, size="tiny"))
    calibration = synthesize_feeds(model, count=4, seed=3)  # token ids within the vocabulary, 16 tokens
    ctx = PassContext(target=target, calibration_source=calibration)
    manager = PassManager(parse_pipeline("fold,fuse,qdq"), ctx, verify="numeric")
    quantized = manager.run(model)
    assert manager.records[-1].stats["quantized_matmuls"] > 0
    feeds = seeded_feeds(model, seed=11)
    for before, after in zip(outputs_on(model, feeds), outputs_on(quantized, feeds)):
        a, b = before.reshape(-1), after.reshape(-1)
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99
