"""fuse for ort-cuda leaves DeBERTa-v3 (and MPNet) no node that ONNX Runtime CUDA would place on the CPU (``host_free``,
checked by ``compiler/analysis/cuda_placement``), on both transformers' exports (5.17's fixture, this
project's), exactly: outputs within 1e-4 of the export at several sequence lengths and batches, padded rows
included, one compiled graph for all of them (dynamic in batch and sequence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tqc.compiler.analysis.cuda_placement import host_placed_by_inference
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

from ..models.test_heads import token_feed
from .test_fuse_new_families import outputs_on

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "transformers_5_17"


def _placed(model) -> list[str]:
    return [str(n) for n in host_placed_by_inference(model)]


def _feeds(model, left_padding: bool) -> list[dict]:
    names = [i.name for i in model.graph.input]
    feeds = []
    for index, (batch, seq) in enumerate(((1, 1), (1, 7), (3, 16), (2, 41), (4, 100))):
        feed = token_feed(names, batch, seq, seed=11 + index)
        if batch > 1:
            feed["attention_mask"][1, max(1, seq * 2 // 3):] = 0   # right padding
        if batch > 2 and left_padding:
            feed["attention_mask"][2, :seq // 3] = 0               # left padding
        feeds.append(feed)
    return feeds


@pytest.mark.parametrize("family", ["deberta-v3", "mpnet"])
@pytest.mark.parametrize("source", ["transformers-5.17", "this-project"])
def test_for_ort_cuda_nothing_is_placed_on_the_cpu_and_the_answer_stays(family, source, exports):
    """DeBERTa's masked_fill mask stays exact under any padding; MPNet's attention takes token counts on
    ort-cuda (right padding: fuse's note), so its rows are padded on the right only."""
    path = FIXTURES / f"{family}-tiny.onnx" if source == "transformers-5.17" else \
        exports.get({"deberta-v3": "deberta-v2"}.get(family, family), exporter="legacy", size="tiny")
    model = load_model(path)
    plain = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cpu"), verify="structure").run(model)
    assert len(_placed(plain)) >= {"deberta-v3": 30, "mpnet": 6}[family]  # the export's Shape arithmetic
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="numeric")
    fused = manager.run(model)
    stats = manager.records[1].stats
    assert stats["attention"] == stats["attention_blocks"] == 2
    assert stats["host_shapes_rewritten"] > 0
    assert _placed(fused) == []
    feeds = _feeds(model, left_padding=family == "deberta-v3")
    for feed, before, after in zip(feeds, outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert before.shape == after.shape == feed["input_ids"].shape + (before.shape[-1],)
        assert np.abs(before - after).max() <= 1e-4


def test_modernbert_is_left_as_it_was():
    model = load_model(FIXTURES / "modernbert-tiny.onnx")
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="numeric")
    fused = manager.run(model)
    assert manager.records[1].stats.get("host_shapes_rewritten", 0) == 0
    assert _placed(fused) == []


def test_an_expand_is_rewritten_only_where_the_symbols_prove_its_shape():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tqc.compiler.io.graph import to_graph, to_model
    from tqc.passes.fuse.host_free import remove_host_shapes

    def read(tensor, index, tag):  # Unsqueeze(Gather(Shape(tensor), index))
        return [helper.make_node("Shape", [tensor], [f"{tag}_s"], name=f"{tag}_shape"),
                helper.make_node("Gather", [f"{tag}_s", f"i{index}"], [f"{tag}_d"], name=f"{tag}_read", axis=0),
                helper.make_node("Unsqueeze", [f"{tag}_d", "axes0"], [f"{tag}_u"], name=f"{tag}_lift")]

    nodes = [helper.make_node("Gather", ["ids", "i0"], ["row"], name="row", axis=0),
             helper.make_node("Unsqueeze", ["row", "axes0"], ["x"], name="x"),        # [1, sequence]
             *read("ids", 0, "b"), *read("ids", 1, "s"), *read("extra", 0, "k"),
             helper.make_node("Concat", ["b_u", "s_u"], ["proven"], name="proven", axis=0),
             helper.make_node("Concat", ["b_u", "k_u"], ["unproven"], name="unproven", axis=0),
             helper.make_node("Expand", ["x", "proven"], ["y"], name="expand_proven"),
             helper.make_node("Expand", ["x", "unproven"], ["z"], name="expand_unproven"),
             helper.make_node("Neg", ["y"], ["y_out"], name="y_out"),   # graph outputs keep their producers
             helper.make_node("Neg", ["z"], ["z_out"], name="z_out")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
                     helper.make_tensor_value_info("extra", TensorProto.INT64, ["k"])],
        [helper.make_tensor_value_info(f"{n}_out", TensorProto.INT64, [None, None]) for n in "yz"],
        [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("i0", 0), ("i1", 1), ("axes0", [0]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    gs_graph = to_graph(model)
    stats = remove_host_shapes(gs_graph)
    rewritten = to_model(gs_graph, like=model)
    assert stats["expands"] == 1
    assert {n.name for n in rewritten.graph.node} >= {"expand_unproven"} and \
        "expand_proven" not in {n.name for n in rewritten.graph.node}
    assert sorted(_placed(rewritten)) == sorted(["Gather 'b_read'", "Unsqueeze 'b_lift'", "Gather 'k_read'",
                                                 "Unsqueeze 'k_lift'", "Concat 'unproven'"])  # the unproven's own
    feed = {"ids": np.arange(12, dtype=np.int64).reshape(3, 4), "extra": np.zeros(4, np.int64)}
    for a, b in zip(*(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
                      for m in (model, rewritten))):
        assert a.shape == b.shape == (3, 4) and np.array_equal(a, b)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta",
                                    "camembert"])
def test_the_classic_families_can_capture_cuda_graphs_after_fuse(family, exports):
    """Nothing of the classic families' fused graphs is placed on the CPU for ort-cuda (DistilBERT's position
    ids, a buffer sliced to the length the word embeddings' Shape reads, are proven 0..S-1 and dropped: the
    op's default), with the same answer."""
    model = load_model(exports.get(family, size="tiny"))
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="numeric")
    fused = manager.run(model)
    assert manager.records[1].stats["attention"] == manager.records[1].stats["attention_blocks"] > 0
    assert _placed(fused) == []
    feeds = _feeds(model, left_padding=False)
    for feed, before, after in zip(feeds, outputs_on(model, feeds), outputs_on(fused, feeds)):
        real = feed["attention_mask"].astype(bool)  # token counts on ort-cuda: padded positions are not answers
        if real.any():  # token_feed masks a row of one token whole
            assert np.abs(before - after)[real].max() <= 1e-4
