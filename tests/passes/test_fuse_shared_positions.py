"""shared_positions: DeBERTa's per-layer position projections, repeated per batch row by a Tile in the export,
become one constant [H, D, 2k] that MatMul broadcasts; the same answer as with the repeat at every batch and
length (padded rows included), on both transformers' exports, and no Tile is left."""

from __future__ import annotations

import numpy as np
import pytest

from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

from .test_fuse_host_free import FIXTURES, _feeds
from .test_fuse_new_families import outputs_on


@pytest.mark.parametrize("source", ["transformers-5.17", "this-project"])
@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
def test_position_projections_are_broadcast_not_repeated_with_the_same_answer(source, target, exports):
    path = FIXTURES / "deberta-v3-tiny.onnx" if source == "transformers-5.17" else \
        exports.get("deberta-v2", exporter="legacy", size="tiny")
    model = load_model(path)
    runs = {}
    for pipeline in ("fold,fuse{shared_positions=false}", "fold,fuse"):
        manager = PassManager(parse_pipeline(pipeline), PassContext(target=target), verify="numeric")
        runs[pipeline] = (manager.run(model), manager.records[1].stats)
    (repeated, before), (shared, after) = runs.values()
    assert "positions_shared" not in before and after["positions_shared"] == 4  # c2p and p2c of 2 layers
    assert any(n.op_type == "Tile" for n in repeated.graph.node) or target == "ort-cuda"
    # on ort-cpu the repeat is gone; on ort-cuda host_free turns the one a Shape still measures into a broadcast
    assert not any(n.op_type == "Tile" for n in shared.graph.node)
    feeds = _feeds(model, left_padding=True)
    for old, new in zip(outputs_on(repeated, feeds), outputs_on(shared, feeds)):
        assert old.shape == new.shape and np.abs(old - new).max() <= 1e-5
