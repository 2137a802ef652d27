"""DeBERTa-v3 for ort-cuda in fewer kernels a layer, each rewrite exact: Q, K and V projected by one packed
MatMul, Add and Split that MultiHeadAttention and the c2p / p2c scores both read (``attention_rewrite``); the
relative-position index broadcast to [B*H, S, S] once for every layer (``host_free``'s zeros made once per size,
``fold_dims.dimension_factors``); the scores' scale folded into the position projections
(``scale_into_weights``); the p2c scores computed in [key, position] order, gathered with no Transpose after
(``transposed_scores``). Outputs within 1e-4 of the export on padded batches (right and left padding, padded
rows compared too) on both transformers' exports; fuse,fp16 stays finite and close."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext
from tqc.passes.fuse.scale_into_weights import scale_into_weights

from .test_fuse_host_free import FIXTURES, _feeds
from .test_fuse_new_families import outputs_on


def _deberta(source: str, exports):
    return load_model(FIXTURES / "deberta-v3-tiny.onnx" if source == "transformers-5.17" else
                      exports.get("deberta-v2", exporter="legacy", size="tiny"))


@pytest.mark.parametrize("source", ["transformers-5.17", "this-project"])
def test_deberta_for_ort_cuda_packs_shares_and_folds_with_the_same_answer(source, exports):
    model = _deberta(source, exports)
    manager = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cuda"), verify="numeric")
    fused = manager.run(model)
    stats = manager.records[1].stats
    assert stats["attention"] == stats["attention_blocks"] == 2
    assert stats["position_scales_folded"] == 4  # c2p and p2c of 2 layers
    nodes = list(fused.graph.node)
    produced = {o: n for n in nodes for o in n.output}
    for mha in (n for n in nodes if n.op_type == "MultiHeadAttention"):
        split = produced[mha.input[0]]
        assert split.op_type == "Split" and list(split.output) == list(mha.input[:3])
    # a layer: the packed projection, c2p, p2c (FusedMatMul, B transposed), attention output, intermediate, output
    assert sum(n.op_type == "MatMul" for n in nodes) == 5 * 2
    assert sum(n.op_type == "FusedMatMul" and n.domain == "com.microsoft" for n in nodes) == 2
    gathers = [n for n in nodes if n.op_type == "GatherElements"]
    assert len(gathers) == 4 and len({n.input[1] for n in gathers}) == 2  # one c2p and one p2c index for both layers
    assert stats["p2c_transposes_removed"] == 2
    assert not any(n.op_type == "Transpose" and produced.get(n.input[0]) in gathers for n in nodes)
    assert not any(n.op_type == "Div" and produced.get(n.input[0]) is not None and
                   produced[n.input[0]].op_type in ("GatherElements", "Transpose") for n in nodes)
    feeds = _feeds(model, left_padding=True)
    for feed, before, after in zip(feeds, outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert before.shape == after.shape == feed["input_ids"].shape + (before.shape[-1],)
        assert np.abs(before - after).max() <= 1e-4


def test_deberta_fp16_for_ort_cuda_stays_close(exports):
    model = _deberta("this-project", exports)
    half = PassManager(parse_pipeline("fold,fuse,fp16"), PassContext(target="ort-cuda"), verify="numeric").run(model)
    feeds = _feeds(model, left_padding=True)
    for before, after in zip(outputs_on(model, feeds), outputs_on(half, feeds)):
        assert np.isfinite(after).all()
        assert np.abs(before - after).max() <= 1e-2  # float16 rounding of values up to ~4 (measured 4e-3)


def _scaled_scores_model(second_reader: bool):
    """x [2, 3, 4] @ P [4, 5] -> GatherElements(., index) -> Transpose -> Div(., 3) -> Relu; with ``second_reader``, the
    MatMul's output is also a graph output (another reader of the unscaled values)."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "P")
    index = numpy_helper.from_array(rng.integers(0, 5, (2, 3, 3)).astype(np.int64), "index")
    scale = numpy_helper.from_array(np.array(3.0, np.float32), "s")
    nodes = [helper.make_node("MatMul", ["x", "P"], ["scores"], name="mm"),
             helper.make_node("GatherElements", ["scores", "index"], ["picked"], axis=-1, name="gather"),
             helper.make_node("Transpose", ["picked"], ["moved"], perm=[0, 2, 1], name="move"),
             helper.make_node("Div", ["moved", "s"], ["scaled"], name="div"),
             helper.make_node("Relu", ["scaled"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              outputs, [weight, index, scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("second_reader", [False, True])
def test_a_scale_goes_into_the_weight_only_where_nothing_else_reads_the_scores(second_reader):
    model = _scaled_scores_model(second_reader)
    graph = to_graph(model)
    folded = scale_into_weights(graph)
    graph.cleanup()
    rewritten = to_model(graph)
    assert folded == (0 if second_reader else 1)
    assert any(n.op_type == "Div" for n in rewritten.graph.node) == second_reader
    x = {"x": np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float32)}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
           for m in (model, rewritten)]
    for old, new in zip(*run):
        assert np.abs(old - new).max() <= 1e-6
