"""The shift folded into a LayerNorm (``passes/qdq/shift_fold.py``): LN(beta) ─► Mul(1/s) ─► Add(-z/s) ─► Q becomes
LN(beta - z) ─► Mul(1/s) ─► Q, the residual Sum and a split's float MatMul taking z back through their constants.
Checked in float on a hand-built graph (every output the same, the INT8 codes the same up to a code at a rounding
edge), refused where a reader cannot take z back, and on ort-cpu's default (``shift=auto``: the LayerNorm-fed
inputs' Adds folded) against the placement without the shift on held-out data; the attention output's Mul and
Add folded into QAttention's value columns (bert-tiny, against the unfolded placement)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.analysis.calibration import calibrate, calibration_targets
from tqc.compiler.io.graph import to_graph, to_model
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext
from tqc.passes.qdq.shift_fold import fold_shift

K, N = 16, 8
BETA = np.array([0, 1.5, -1, 0, 0.8, 0, 0, -2, 0, 0.5, 0, 0, 1.2, 0, -0.3, 0], np.float32)  # channels off zero


def _model(nodes, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, K])],
                              [helper.make_tensor_value_info(name, dtype, None) for name, dtype in outputs],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def shifted_layernorm(extra_reader: str = "") -> onnx.ModelProto:
    """x ─► LN ─► y ─► Mul(f) ─► Add(c) ─► Q ─► DQ ─► MatMul(W) ─► Add(b) ─► Sum(·, y, r) (the residual) and
    y ─► MatMul(Wc) ─► Add(bc) (a split's float part); with ``extra_reader`` 'Relu', y also feeds a Relu."""
    rng = np.random.default_rng(3)
    f = (1 / rng.uniform(0.5, 2, K)).astype(np.float32)
    inits = {"gamma": rng.uniform(0.5, 1.5, K).astype(np.float32), "beta": BETA, "f": f,
             "c": (-rng.uniform(-1, 1, K) * f).astype(np.float32), "scale": np.array(0.02, np.float32),
             "zp": np.array(128, np.uint8), "w": (rng.standard_normal((K, K)) / 4).astype(np.float32),
             "b": rng.standard_normal(K).astype(np.float32), "r": rng.standard_normal(K).astype(np.float32),
             "wc": rng.standard_normal((K, 2)).astype(np.float32), "bc": rng.standard_normal(2).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, name="ln"),
             helper.make_node("Mul", ["y", "f"], ["ys"], name="smooth"),
             helper.make_node("Add", ["ys", "c"], ["yc"], name="shift"),
             helper.make_node("QuantizeLinear", ["yc", "scale", "zp"], ["codes"], name="q"),
             helper.make_node("DequantizeLinear", ["codes", "scale", "zp"], ["yd"], name="dq"),
             helper.make_node("MatMul", ["yd", "w"], ["h"], name="layer"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="layer_bias"),
             helper.make_node("Sum", ["hb", "y", "r"], ["out"], name="residual"),
             helper.make_node("MatMul", ["y", "wc"], ["p"], name="split_part"),
             helper.make_node("Add", ["p", "bc"], ["part"], name="split_bias")]
    outputs = [("out", TensorProto.FLOAT), ("part", TensorProto.FLOAT), ("codes", TensorProto.UINT8)]
    if extra_reader:
        nodes.append(helper.make_node(extra_reader, ["y"], ["other"], name="other"))
        outputs.append(("other", TensorProto.FLOAT))
    return _model(nodes, outputs, inits)


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = to_graph(model)
    count = fold_shift(graph)
    return to_model(graph, like=model), count


def test_the_shift_folds_into_the_layernorm_exactly_in_float():
    model = shifted_layernorm()
    after, count = folded(model)
    assert count == 1
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("Add") == 2 and "LayerNormalization" in ops  # the shift's Add is gone, the biases stay
    beta = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}[after.graph.node[0].input[2]]
    assert np.abs(beta - BETA).max() > 0.1  # the LayerNorm now writes x - z
    # ...under a name the float graph does not have: tqc diff --layerwise pairs tensors by name
    assert after.graph.node[0].output[0] == "y_tqc_shifted" and not any("y" in n.input for n in after.graph.node)
    feed = {"x": np.random.default_rng(0).standard_normal((4, 3, K)).astype(np.float32) * 3}
    out, part, codes = run(model, feed)
    out_f, part_f, codes_f = run(after, feed)
    np.testing.assert_allclose(out_f, out, atol=2e-5)     # the residual took z back: the same sum
    np.testing.assert_allclose(part_f, part, atol=2e-5)   # the split's float part too (bias - z Wc)
    differ = np.abs(codes_f.astype(int) - codes.astype(int))
    assert np.ptp(codes.astype(int)) > 50 and differ.max() <= 1 and (differ > 0).mean() < 0.01


def test_a_reader_that_cannot_take_the_shift_back_keeps_the_add():
    model = shifted_layernorm(extra_reader="Relu")
    after, count = folded(model)
    assert count == 0
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in model.graph.node]
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)}
    for before, now in zip(run(model, feed), run(after, feed)):
        np.testing.assert_array_equal(before, now)


def layernorm_linear() -> onnx.ModelProto:
    """x ─► LN(beta off zero) ─► y ─► MatMul(W) ─► Add(b) ─► hb ─► MatMul(W2) ─► Sum(·, y, b2) ─► out: an encoder's FFN
    layers and their residual, as ort-cpu's fusion writes them (hb, the first layer's output, is an output too)."""
    rng = np.random.default_rng(5)
    inits = {"gamma": rng.uniform(0.5, 1.5, K).astype(np.float32), "beta": BETA * 4,  # centres up to 8 off zero
             "w": (rng.standard_normal((K, N * 2)) / 4).astype(np.float32),
             "b": rng.standard_normal(N * 2).astype(np.float32), "w2": (rng.standard_normal((N * 2, K)) / 4).astype(
                 np.float32), "b2": rng.standard_normal(K).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["y", "w"], ["h"], name="layer"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="layer_bias"),
             helper.make_node("MatMul", ["hb", "w2"], ["h2"], name="layer2"),
             helper.make_node("Sum", ["h2", "y", "b2"], ["out"], name="residual")]
    return onnx.shape_inference.infer_shapes(_model(nodes, [("out", TensorProto.FLOAT), ("hb", TensorProto.FLOAT)],
                                                    inits))


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, 3, K)).astype(np.float32) * 2} for _ in range(count)]


def compile_qdq(model: onnx.ModelProto, spec: str, calib) -> tuple[onnx.ModelProto, dict]:
    ctx = PassContext(target="ort-cpu", calibration=calibrate(model, calib, calibration_targets(model)))
    ctx.calibration_source = calib
    manager = PassManager(parse_pipeline(spec), ctx)
    return manager.run(model), manager.records[-1].stats


def test_ort_cpu_default_shifts_and_folds_the_layernorm_fed_input():
    """ort-cpu, shift=auto: both layers are shifted; the LayerNorm-fed one's Add folds (the second layer's input
    comes from a bias Add: its Add stays, one node more than without the shift); the first layer's error on
    held-out data is lower than without the shift, where its channels sit well off zero (the case it is for)."""
    model = layernorm_linear()
    calib, held_out = feeds(4, 0), feeds(4, 9)
    default, stats = compile_qdq(model, "qdq", calib)
    plain, plain_stats = compile_qdq(model, "qdq{shift=false}", calib)
    assert stats["shifted"] == 2 and stats["shift_folded"] == 1 and stats["smoothed"] == 2, stats
    assert "shifted" not in plain_stats
    ops, plain_ops = [n.op_type for n in default.graph.node], [n.op_type for n in plain.graph.node]
    assert sorted(ops) == sorted(plain_ops + ["Add"])

    def error(q):
        return float(np.sqrt(np.mean([np.mean((run(q, f)[1] - run(model, f)[1]) ** 2) for f in held_out])))

    # 0.0118 against 0.0146 here; with beta / 4 (centres within 2 of zero) the shift gains nothing (0.0118 vs 0.0100)
    assert error(default) < 0.9 * error(plain)


def compile_tiny(exports, monkeypatch, folded: bool = True):
    """bert-tiny, ``fold,fuse,qdq`` on ort-cpu (its QAttention), calibrated on 4 seeded batches of token ids; with
    ``folded`` False, ort-cpu as if its target did not fold (``shift_folded``): the Muls and Adds stay."""
    import dataclasses

    import tqc.compiler.core.target as target
    from tqc.compiler.io.model import load_model
    from tqc.compiler.runtime.feeds import synthesize_feeds

    if not folded:
        monkeypatch.setitem(target.BY_NAME, "ort-cpu", dataclasses.replace(target.ORT_CPU, shift_folded=False))
    model = load_model(exports.get("bert", size="tiny"))
    calibration = synthesize_feeds(model, count=4, seed=3)
    ctx = PassContext(target="ort-cpu", calibration_source=calibration, verification_feeds=calibration[:2])
    manager = PassManager(parse_pipeline("fold,fuse,qdq"), ctx, verify="numeric")
    return model, manager.run(model), manager.records[-1].stats


def test_attention_output_smoothing_folds_into_the_value_columns(exports, monkeypatch):
    """The attention output's smoothing Mul and shift Add fold into QAttention's value columns (per-column
    scales times 1/s, bias b_v / s - z / s: softmax rows sum to 1); the answer stays the unfolded one's."""
    from tqc.compiler.runtime.feeds import synthesize_feeds

    model, q, stats = compile_tiny(exports, monkeypatch)
    _, kept, kept_stats = compile_tiny(exports, monkeypatch, folded=False)
    assert stats["attention_smoothing_folded"] == 2 and stats["shift_folded"] == 4, stats  # 2 layers: QKV, FFN1
    assert "attention_smoothing_folded" not in kept_stats
    ops, kept_ops = [n.op_type for n in q.graph.node], [n.op_type for n in kept.graph.node]
    assert kept_ops.count("Mul") - ops.count("Mul") == 2 and kept_ops.count("Add") - ops.count("Add") == 2 + 4
    feed = synthesize_feeds(model, count=1, seed=11)[0]
    out, = run(q, feed)[:1]
    out_kept, = run(kept, feed)[:1]
    out_float, = run(model, feed)[:1]
    assert np.abs(out - out_kept).max() < 0.25 * np.abs(out_kept - out_float).max()
