"""ModernBERT's pieces on tiny exports (both exporters, eager and sdpa): rotary position embeddings ->
RotaryEmbedding on ORT targets (one pair of caches per distinct pair of tables), the attention cores ->
MultiHeadAttention with the exporter's masks (one global, one sliding-window band, each shared by its layers),
GeGLU's GELU, LayerNorms without bias in pre-LN residual streams; exact (``-p fuse`` alone, within 1e-4 on padded batches at lengths
past the local window) and standard ops on trt. Synthetic rotations the rule must refuse, with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext
from tqc.passes.fuse import Fuse

from .test_fuse_new_families import outputs_on, seeded_feeds

VARIANTS = [("legacy", "eager"), ("legacy", "sdpa"), ("dynamo", "eager"), ("dynamo", "sdpa")]
LAYERS = 3  # tiny ModernBERT: full / sliding / full


def fuse_alone(path, target, pipeline="fuse"):
    model = load_model(path)
    ctx = PassContext(target=target, explain={"fuse"})
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric")
    fused = manager.run(model)
    return model, fused, manager.records[-1].stats, ctx


@pytest.mark.parametrize("exporter, attn", VARIANTS)
@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda", "trt", "openvino"])
def test_modernbert_rotary_geglu_and_residuals_fuse_exactly(exporter, attn, target, exports):
    model, fused, stats, ctx = fuse_alone(exports.get("modernbert", exporter=exporter, attn=attn, size="tiny"),
                                          target)
    feeds = seeded_feeds(model)
    padded = dict(feeds[1])
    padded["attention_mask"] = np.ones_like(padded["attention_mask"])
    padded["attention_mask"][1, 12:] = 0  # 28 padding tokens: the sliding window's rows past 16 mask every key
    for before, after in zip(outputs_on(model, feeds + [padded]), outputs_on(fused, feeds + [padded])):
        assert not np.isnan(after).any() and np.abs(before - after).max() <= 1e-4
    guard = [n for n in fused.graph.node if n.name.startswith("tqc_guard")]
    ops = [n.op_type for n in fused.graph.node if not n.name.startswith("tqc_guard")]
    assert stats["attention"] == LAYERS, ctx.messages
    assert stats["attention_rules"] == {"eager": "rotary-eager", "legacy": "rotary-sdpa-legacy"}.get(
        attn if attn == "eager" else exporter, "rotary-sdpa-dynamo")
    if exporter == "legacy" and attn == "sdpa" and _fills_with_inf(model):
        # transformers >= 5.2x: Where(allowed, 0, -inf) masks and a NaN guard -> a finite copy of each mask and
        # the context times whether its row has a key (nan_guard.py); the padded batch above has such rows
        assert sum(n.op_type == "Mul" and n.name.endswith("_rows") for n in guard) == LAYERS
        assert sum(n.op_type == "Squeeze" or n.op_type == "Unsqueeze" for n in guard) == 2  # one per mask
    else:
        assert not guard
    if target in ("trt", "openvino"):  # the standard form: scale on the scores, one K^T Transpose, no guard
        assert stats["rotary"] == 0 and all(n.domain in ("", "ai.onnx") for n in fused.graph.node)
        assert any(m.startswith("fuse: rotary: RotaryEmbedding is an ONNX Runtime contrib op") for m in ctx.messages)
        assert ops.count("Softmax") == LAYERS and "IsNaN" not in ops and "Cast" not in ops[ops.index("Softmax"):]
        masks = [n.input[1] for n in fused.graph.node if n.name.endswith("_masked")]
        assert len(masks) == LAYERS and masks[0] == masks[2] != masks[1]   # two masks, shared
        return
    assert stats["rotary"] == 2 * LAYERS, ctx.messages          # Q and K of every layer
    assert not any(m.startswith("fuse: rotary:") for m in ctx.messages), ctx.messages
    assert ops.count("Neg") == 0 and ops.count("Cos") == 0       # the rotations and their tables are gone
    caches = sorted(i.name for i in fused.graph.initializer if "rotary_cos_cache" in i.name)
    assert caches == ["tqc_rotary_cos_cache0", "tqc_rotary_cos_cache1"]  # global and local tables, shared
    assert ops.count("Softmax") == 0
    # head_layout: MultiHeadAttention and RotaryEmbedding take [B, S, N·D]; no head Transpose is left, and
    # Q, K, V are one Split of the packed projection per layer
    assert stats["heads_flattened"] == LAYERS and "Transpose" not in ops, ops
    assert ops.count("Split") >= LAYERS and all(
        len(n.input) == 4 and any(a.name == "num_heads" for a in n.attribute)
        for n in fused.graph.node if n.op_type == "RotaryEmbedding")
    # full / sliding / full: the key padding mask, and the window bias (half-width 4), both rebuilt from
    # attention_mask without a Shape (window_mask.py): no mask arithmetic that ORT would put on the CPU
    given = [tuple(n.input[4:6]) + ("",) * (6 - len(n.input)) for n in fused.graph.node
             if n.op_type == "MultiHeadAttention"]
    # (ort-cuda: token counts, fuse{mask=auto} there, as the classic families get: ORT's fused CUDA kernels)
    keys = "tqc_mask_end_positions" if target == "ort-cuda" else "tqc_mask_index"
    assert given == [(keys, ""), ("", "tqc_window4_bias"), (keys, "")]
    producers = {o: n for n in fused.graph.node for o in n.output}
    stack, seen = [keys, "tqc_window4_bias"], set()
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            assert node.op_type != "Shape", node.name
            stack.extend(node.input)
    assert not {"Expand", "Range", "Equal"} & set(ops)
    assert stats["gelu"] == LAYERS and ops.count("Gelu") == LAYERS   # GeGLU: GELU(first half) * second half
    # pre-LN residual streams without bias: every LayerNorm after a residual Add, on the contrib form
    assert stats["skip_layernorm"] == (2 * LAYERS if target == "ort-cuda" else 0)


def _fills_with_inf(model) -> bool:
    """Whether the export's masks fill with -inf (the legacy exporter's sdpa under transformers >= 5.2x)."""
    return any(i.data_type == TensorProto.FLOAT and np.isneginf(numpy_helper.to_array(i)).any()
               for i in model.graph.initializer) or any(
        a.t.data_type == TensorProto.FLOAT and np.isneginf(numpy_helper.to_array(a.t)).any()
        for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")


class Rotation:
    """x [B, H, S, D] rotated by transformers' apply_rotary_pos_emb, tables from Range(Shape(ids)[1]) (ids:
    [B, S], as token ids are)."""

    def __init__(self, heads=2, size=8, half=None, theta=10000.0):
        self.heads, self.size, self.half = heads, size, half if half is not None else size // 2
        inv = (1.0 / theta ** (np.arange(0, size, 2) / size)).astype(np.float32)
        self.nodes, self.inits = [], [numpy_helper.from_array(inv, "inv_freq")]
        for name, value in (("seq", [1]), ("zero", 0), ("one", 1), ("axes01", [0, 1]), ("last", [-1]),
                            ("start0", [0]), ("half", [self.half]), ("big", [1 << 30]),
                            ("seq_axis", [1])):
            self.inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def model(self, table_from="shape"):
        n = self.node
        if table_from == "shape":
            length = n("Gather", [n("Shape", ["ids"], "shape"), "seq"], "length")
        else:  # depends on the values of ids: the rule must refuse it
            length = n("ReduceMax", ["ids"], "length", keepdims=0)
        length = n("Squeeze", [length], "len0") if table_from == "shape" else length
        positions = n("Cast", [n("Range", ["zero", length, "one"], "range")], "pos",
                      to=TensorProto.FLOAT)
        freqs = n("Mul", [n("Unsqueeze", [positions, "seq_axis"], "pos2"), "inv_freq"], "freqs")
        emb = n("Concat", [freqs, freqs], "emb", axis=-1)
        cos = n("Unsqueeze", [n("Cos", [emb], "cos2"), "axes01"], "cos")
        sin = n("Unsqueeze", [n("Sin", [emb], "sin2"), "axes01"], "sin")
        first = n("Slice", ["x", "start0", "half", "last"], "first")
        second = n("Slice", ["x", "half", "big", "last"], "second")
        rotated = n("Concat", [n("Neg", [second], "neg"), first], "rotated", axis=-1)
        n("Add", [n("Mul", ["x", cos], "x_cos"), n("Mul", [rotated, sin], "r_sin")], "y")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", self.heads, "s", self.size])
        ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", self.heads, "s", self.size])
        graph = helper.make_graph(self.nodes, "rotary", [x, ids], [y], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        return model


def run(model, x, ids=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ids = np.full(x.shape[:1] + x.shape[2:3], x.shape[2], np.int64) if ids is None else ids
    feed = {"x": x, "ids": ids}
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


def fuse_graph(model, **options):
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    ctx = PassContext(target="ort-cpu", explain={"fuse"})
    stats = Fuse(**options).run(graph, ctx).stats
    return to_model(graph), stats, ctx


def test_a_rotation_with_its_tables_from_the_shape_fuses_exactly():
    model = Rotation().model()
    fused, stats, ctx = fuse_graph(model, rotary_positions=64)
    assert stats["rotary"] == 1, ctx.messages
    assert [n.op_type for n in fused.graph.node] == ["RotaryEmbedding"]
    x = np.random.default_rng(0).standard_normal((3, 2, 40, 8)).astype(np.float32)
    np.testing.assert_allclose(run(fused, x), run(model, x), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="cos_cache"):  # past the cache: ORT refuses, it does not answer
        run(fused, np.zeros((1, 2, 65, 8), np.float32))


@pytest.mark.parametrize("broken, reason", [
    ("quarter", "step 3 (tables: Cos/Sin): the tables are 8 wide, the rotation 4"),
    ("values", "step 3 (tables: Cos/Sin): the tables 'cos', 'sin' depend on input values, not only on the "
               "sequence length"),
])
def test_explain_names_why_a_rotation_is_not_fused(broken, reason):
    model = Rotation(half=2).model() if broken == "quarter" else Rotation().model(table_from="values")
    fused, stats, ctx = fuse_graph(model)
    assert stats["rotary"] == 0
    assert f"fuse: rotary: Add 'y' not fused; closest rule 'rotate-half': {reason}" in ctx.messages, ctx.messages
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(run(fused, x), run(model, x), atol=1e-6, rtol=0)


def test_heads_not_from_a_packed_projection_become_reshape_views_exactly():
    """head_layout's other form: separate [B, S, N, D] heads -> Reshape views (no Transpose), same answer."""
    from tqc.passes.fuse.head_layout import flatten_heads
    from tqc.passes.rewrite import cleanup

    heads, size = 2, 4
    nodes = [helper.make_node("Transpose", [x], [f"{x}_t"], perm=[0, 2, 1, 3]) for x in ("q", "k", "v")]
    nodes += [helper.make_node("Transpose", ["q_t"], ["q_back"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["q_back", "hidden"], ["query"]),
              helper.make_node("MultiHeadAttention", ["query", "k_t", "v_t"], ["y"], domain="com.microsoft",
                               num_heads=heads)]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", "s", heads, size]) for x in "qkv"]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", heads * size])
    graph = helper.make_graph(nodes, "heads", inputs, [y], initializer=[
        numpy_helper.from_array(np.array([0, 0, heads * size], np.int64), "hidden")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    g = to_graph(model)
    assert flatten_heads(g) == 1
    flat = to_model(cleanup(g))
    ops = [n.op_type for n in flat.graph.node]
    assert "Transpose" not in ops and ops.count("Reshape") == 3, ops
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((2, 5, heads, size)).astype(np.float32) for x in "qkv"}
    before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                     .run(None, feeds)[0] for m in (model, flat))
    assert np.abs(before - after).max() <= 1e-6


@pytest.mark.parametrize("ends, splits", [((4, 10), 1), ((4, 2**63 - 1), 1), ((4, 9), 0), ((3, 10), 0)])
def test_sibling_slices_that_tile_an_axis_become_one_split_exactly(ends, splits):
    """slices.py: GeGLU's two halves of a MatMul output -> one Split, only when they tile the axis."""
    from tqc.passes.fuse.slices import split_sibling_slices
    from tqc.passes.rewrite import cleanup

    first_end, second_end = ends
    second_start = 4
    inits = [numpy_helper.from_array(np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32), "w")]
    for name, value in (("s0", 0), ("e0", first_end), ("s1", second_start), ("e1", second_end), ("ax", -1)):
        inits.append(numpy_helper.from_array(np.array([value], np.int64), name))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Slice", ["h", "s0", "e0", "ax"], ["a"]),
             helper.make_node("Slice", ["h", "s1", "e1", "ax"], ["b"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 6])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "ab"]
    model = helper.make_model(helper.make_graph(nodes, "geglu", [x], outs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    g = to_graph(model)
    assert split_sibling_slices(g) == splits
    after_model = to_model(cleanup(g))
    ops = [n.op_type for n in after_model.graph.node]
    assert ops.count("Split") == splits and ops.count("Slice") == 2 * (1 - splits)
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 6)).astype(np.float32)}
    before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                     .run(None, feeds) for m in (model, after_model))
    for b, a in zip(before, after):
        assert b.shape == a.shape and np.array_equal(b, a)


@pytest.mark.parametrize("source", ["transformers-5.17", "legacy-eager"])
@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
def test_rotary_attention_runs_on_hidden_wide_tensors_with_no_head_split_left(source, target, exports):
    """``flat_heads`` (head_layout.py): RotaryEmbedding(num_heads) and MultiHeadAttention on [B, S, hidden], the
    same answer at lengths past the local window, padded rows included (right padding only on ort-cuda: token
    counts)."""
    from pathlib import Path

    from ..models.test_heads import token_feed

    path = Path(__file__).resolve().parents[1] / "fixtures" / "transformers_5_17" / "modernbert-tiny.onnx" \
        if source == "transformers-5.17" else \
        exports.get("modernbert", exporter=source.split("-")[0], attn=source.split("-")[1], size="tiny")
    model, fused, stats, _ = fuse_alone(path, target, "fold,fuse")
    assert stats["attention"] == LAYERS and stats["rotary"] == 2 * LAYERS
    assert stats["heads_flattened"] == LAYERS
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Transpose") == ops.count("Squeeze") == ops.count("Reshape") == 0, ops
    rotaries = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "num_heads")) > 0
               for n in rotaries)
    names = [i.name for i in model.graph.input]
    feeds = []
    for index, (batch, seq) in enumerate(((1, 1), (2, 9), (3, 100))):
        feed = token_feed(names, batch, seq, seed=3 + index)
        if batch > 1:
            feed["attention_mask"][1, seq // 2:] = 0
        if batch > 2 and target == "ort-cpu":
            feed["attention_mask"][2, :seq // 4] = 0
        feeds.append(feed)
    for before, after in zip(outputs_on(model, feeds), outputs_on(fused, feeds)):
        assert np.abs(before - after).max() <= 1e-4
