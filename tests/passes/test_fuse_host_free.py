"""fuse for ort-cuda leaves DeBERTa-v3 no node that ONNX Runtime CUDA would place on the CPU (``host_free``,
checked by ``compiler/analysis/cuda_placement``), on both transformers' exports (5.17's fixture, this
project's), exactly: outputs within 1e-4 of the export at several sequence lengths and batches, padded rows
included, one compiled graph for all of them (dynamic in batch and sequence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tqc.compiler.analysis.cuda_placement import host_placed_nodes
from tqc.compiler.io.model import load_model
from tqc.compiler.io.structure import float_tensor_types, infer_shapes
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

from ..models.test_heads import token_feed
from .test_fuse_new_families import outputs_on

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "transformers_5_17"


def _placed(model) -> list[str]:
    copy = type(model)()
    copy.CopyFrom(model)
    return [str(n) for n in host_placed_nodes(model, float_tensor_types(infer_shapes(copy, strict=False)))]


def _feeds(model) -> list[dict]:
    names = [i.name for i in model.graph.input]
    feeds = []
    for index, (batch, seq) in enumerate(((1, 1), (1, 7), (3, 16), (2, 41), (4, 130))):
        feed = token_feed(names, batch, seq, seed=11 + index)
        if batch > 1:
            feed["attention_mask"][1, max(1, seq * 2 // 3):] = 0   # right padding
        if batch > 2:
            feed["attention_mask"][2, :seq // 3] = 0               # left padding
        feeds.append(feed)
    return feeds


@pytest.mark.parametrize("source", ["transformers-5.17", "this-project"])
def test_deberta_for_ort_cuda_places_nothing_on_the_cpu_and_keeps_the_answer(source, exports):
    path = FIXTURES / "deberta-v3-tiny.onnx" if source == "transformers-5.17" else \
        exports.get("deberta-v2", exporter="legacy", size="tiny")
    model = load_model(path)
    plain = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cpu"), verify="structure").run(model)
    assert len(_placed(plain)) > 30  # the relative-position path's Shape arithmetic, as the export has it
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="numeric")
    fused = manager.run(model)
    stats = manager.records[1].stats
    assert stats["attention"] == stats["attention_blocks"] == 2
    assert stats["host_shapes_rewritten"] > 0
    assert _placed(fused) == []
    feeds = _feeds(model)
    for feed, before, after in zip(feeds, outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert before.shape == after.shape == feed["input_ids"].shape + (before.shape[-1],)
        assert np.abs(before - after).max() <= 1e-4


def test_modernbert_is_left_as_it_was():
    model = load_model(FIXTURES / "modernbert-tiny.onnx")
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="numeric")
    fused = manager.run(model)
    assert manager.records[1].stats.get("host_shapes_rewritten", 0) == 0
    assert _placed(fused) == []
