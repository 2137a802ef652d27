"""Q/DQ placement rules per target on synthetic layers and real exports, and INT8 fidelity on real text."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
from tqc.compiler.core.errors import TqcError
from tqc.compiler.analysis.calibration import calibrate, calibration_targets
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

from ..conftest import CALIB_SENTENCES, HELDOUT_SENTENCES


def two_consumers_model():
    """x -> LayerNorm -> h; h feeds two MatMuls (like Q and K projections)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), n) for n in ("g", "bt")]
    inits += [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), n) for n in ("w1", "w2")]
    inits.append(numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "wg"))
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "bt"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("Gemm", ["c2", "wg"], ["y"], name="gemm", transB=1),
             helper.make_node("Reshape", ["c", "shape"], ["c2"])]
    inits.append(numpy_helper.from_array(np.array([-1, 6], np.int64), "shape"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantize(model, target, pipeline="qdq", feeds=None):
    model = onnx.shape_inference.infer_shapes(model)
    feeds = feeds or synthesize_feeds(model, count=4)
    table = calibrate(model, feeds, calibration_targets(model))
    ctx = PassContext(target=target, calibration=table)
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric")
    return manager.run(model), manager.records[-1].stats, ctx


def nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_trt_symmetric_int8_per_channel_weights_inputs_only():
    q, stats, _ = quantize(two_consumers_model(), "trt")
    assert stats["quantized_matmuls"] == 3 and stats["linear"] == 3
    for node in nodes(q, "QuantizeLinear") + nodes(q, "DequantizeLinear"):
        zp = init(q, node.input[2])
        assert zp.dtype == np.int8 and not zp.any()  # symmetric: zero-point 0
    initializers = {t.name for t in q.graph.initializer}
    weight_dqs = [n for n in nodes(q, "DequantizeLinear") if n.input[0] in initializers]
    axes = sorted(next(a.i for a in n.attribute if a.name == "axis") for n in weight_dqs)
    assert axes == [0, 1, 1]  # Gemm with transB -> axis 0; MatMul [K, N] -> axis 1
    for n in weight_dqs:
        assert init(q, n.input[0]).dtype == np.int8
        assert init(q, n.input[1]).size == init(q, n.input[0]).shape[next(a.i for a in n.attribute if a.name == "axis")]
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    for n in nodes(q, "QuantizeLinear"):
        assert producers.get(n.input[0]) != "MatMul"  # never on MatMul outputs
    # trt shares one Q/DQ per activation tensor; smoothing gives each linear its own scaled input
    assert stats["smoothed"] == 3


def test_ort_uint8_and_a_dedicated_pair_per_consumer():
    q, stats, _ = quantize(two_consumers_model(), "ort-cpu", "qdq{smooth=0}")
    act_q = [n for n in nodes(q, "QuantizeLinear")]
    assert all(init(q, n.input[2]).dtype == np.uint8 for n in act_q)
    h_consumers = [n for n in act_q if n.input[0] == "h"]
    assert len(h_consumers) == 2  # h feeds two MatMuls: two Q/DQ pairs, never a shared DQ


def test_ort_fuses_dq_matmul_into_integer_kernels(tmp_path):
    q, _, _ = quantize(two_consumers_model(), "ort-cpu")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") >= 2


def test_rerunning_qdq_changes_nothing():
    q, _, ctx = quantize(two_consumers_model(), "trt")
    manager = PassManager(parse_pipeline("qdq"), PassContext(target="trt", calibration=ctx.calibration))
    again = manager.run(q)
    assert len(again.graph.node) == len(q.graph.node)
    assert manager.records[0].stats["quantized_matmuls"] == 0 and not manager.records[0].modified


def test_exclude_and_op_types():
    _, stats, ctx = quantize(two_consumers_model(), "trt", "qdq{exclude=mm2|gem*}")
    assert stats["quantized_matmuls"] == 1
    assert any("'mm2' excluded by pattern" in m for m in ctx.messages)
    _, stats, _ = quantize(two_consumers_model(), "trt", "qdq{op_types=Gemm}")
    assert stats["quantized_matmuls"] == 1


@pytest.mark.parametrize("target, spec", [("trt", "qdq"), ("ort-cpu", "qdq{qattention=false}"), ("ort-cuda", "qdq")])
def test_real_export_placement_counts(target, spec, exports):
    path = exports.get("bert", size="tiny")  # 2 layers, 4 heads of size 16
    model = load_model(path)
    feeds = synthesize_feeds(model, count=2)
    ctx = PassContext(target=target, calibration=None, verification_feeds=feeds)
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline("fold,fuse," + spec), ctx, verify="numeric")
    q = manager.run(model)
    stats = manager.records[-1].stats
    assert stats["linear"] == 2 * 4  # packed QKV, attention output, FFN up, FFN down per layer
    assert manager.records[-1].verify["numeric"]["passed"]
    softmax_inputs = {n.input[0] for n in nodes(q, "Softmax")}
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert all(producers[t] != "DequantizeLinear" for t in softmax_inputs)  # the mask Add stays float
    assert nodes(q, "LayerNormalization") or target != "trt"
    if target == "trt":
        assert stats["attention_bmm"] == 2 * 2 and stats["int8_matmul_flops"] == 1.0
        assert all(init(q, n.input[2]).dtype == np.int8 for n in nodes(q, "QuantizeLinear"))
    else:
        assert stats["attention_bmm"] == 0 and stats["attention_expanded"] == 2
        # per token and layer: linear 2*(H*3H + H*H + 2*H*I), attention batched MatMuls 2 * 2*S*H (S=128)
        hidden, inner, seq = 64, 128, 128
        linear = 2 * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * inner)
        assert stats["int8_matmul_flops"] == pytest.approx(linear / (linear + 4 * seq * hidden), abs=1e-3)


def test_attention_with_unsupported_head_size_stays_float(tmp_path):
    from tqc.models.export import ExportSpec, export

    from tqc.models.recipes import find_recipe

    config = find_recipe("bert").config("tiny")
    config.num_attention_heads = 8  # head size 64 / 8 = 8: not an INT8 MHA size
    config.save_pretrained(tmp_path / "cfg")
    export(ExportSpec(str(tmp_path / "cfg" / "config.json")), tmp_path / "h8.onnx")
    model = load_model(tmp_path / "h8.onnx")
    feeds = synthesize_feeds(model, count=1)
    ctx = PassContext(target="trt", verification_feeds=feeds)
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline("fold,fuse,qdq"), ctx)
    manager.run(model)
    assert manager.records[-1].stats["attention_bmm"] == 0
    assert any("head size 8" in m for m in ctx.messages)


def test_budget_keeps_harmful_matmuls_in_float(exports):
    model = load_model(exports.get("bert", size="tiny"))
    feeds = synthesize_feeds(model, count=2)
    ctx = PassContext(target="ort-cpu", verification_feeds=feeds)
    ctx.calibration_source = feeds
    # A budget no INT8 graph can meet: the greedy step returns every MatMul to float, most harmful first.
    manager = PassManager(parse_pipeline("fold,fuse,qdq{budget=1,smooth=0}"), ctx)
    manager.run(model)
    stats = manager.records[-1].stats
    assert stats["kept_float_by_budget"] == 8 and stats["quantized_matmuls"] == 0
    sensitivity = manager.passes[-1].state.sensitivity
    assert len(sensitivity) == 8 and list(sensitivity.values()) == sorted(sensitivity.values(), reverse=True)
    assert any("kept in float by the accuracy budget" in m for m in ctx.messages)
    # A budget the full INT8 graph meets keeps nothing in float.
    ctx = PassContext(target="ort-cpu", verification_feeds=feeds)
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline("fold,fuse,qdq{budget=0.5}"), ctx)
    manager.run(model)
    assert manager.records[-1].stats["kept_float_by_budget"] == 0


def _sentence_embeddings(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for feed in feeds:
        hidden = session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


@pytest.mark.slow
@pytest.mark.parametrize("target, floor", [("ort-cpu", 0.995), ("trt", 0.993)])
def test_minilm_int8_fidelity_on_held_out_sentences(target, floor, exports, tmp_path):
    from tqc.compiler.cli.main import main

    path = exports.get("minilm")
    with pytest.raises(SystemExit) as info:  # calibrated on the first 32 packaged sentences
        main(["-q", "compile", str(path), "-p", "fold,fuse,qdq", "-o", str(tmp_path / "q.onnx"), "--target", target,
              "--calib", str(CALIB_SENTENCES), "--calib-samples", "32"])
    assert info.value.code == 0
    source = FeedSource(DataSpec(str(HELDOUT_SENTENCES), samples=256, batch_size=32), load_model(path))
    feeds = list(source)
    cosine = (_sentence_embeddings(path, feeds) * _sentence_embeddings(tmp_path / "q.onnx", feeds)).sum(1)
    assert cosine.mean() >= floor


@pytest.mark.parametrize("target, spec", [("ort-cpu", "qdq"), ("ort-cuda", "qdq{qattention=true}")])
def test_qattention_keeps_ort_attention_fused_with_int8_qkv(target, spec, exports, tmp_path):
    """ort-cpu's default (auto) form; opt-in elsewhere."""
    model = load_model(exports.get("bert", size="tiny"))
    feeds = synthesize_feeds(model, count=2)
    ctx = PassContext(target=target, verification_feeds=feeds)
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline("fold,fuse," + spec), ctx, verify="numeric")
    q = manager.run(model)
    stats = manager.records[-1].stats
    assert stats["qattention"] == 2 and stats["attention_expanded"] == 0 and stats["linear"] == 2 * 3
    assert manager.records[-1].verify["numeric"]["passed"]
    hidden, inner, seq = 64, 128, 128
    linear = 2 * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * inner)
    assert stats["int8_matmul_flops"] == pytest.approx(linear / (linear + 4 * seq * hidden), abs=1e-3)
    qatt = nodes(q, "QAttention")[0]
    assert init(q, qatt.input[1]).dtype == np.int8 and init(q, qatt.input[4]).size == 3 * hidden  # per column


def test_excluding_an_attention_keeps_it_expanded(exports):
    model = load_model(exports.get("bert", size="tiny"))
    feeds = synthesize_feeds(model, count=2)
    ctx = PassContext(target="ort-cpu", verification_feeds=feeds)
    ctx.calibration_source = feeds
    fused = PassManager(parse_pipeline("fold,fuse"), PassContext(target="ort-cpu")).run(model)
    first = next(n.name for n in fused.graph.node if n.op_type == "Attention")
    manager = PassManager(parse_pipeline("fold,fuse,qdq{exclude=" + first + "}"), ctx, verify="numeric")
    manager.run(model)
    stats = manager.records[-1].stats
    assert stats["qattention"] == 1 and stats["attention_expanded"] == 1
    assert stats["linear"] == 2 * 3  # the excluded attention's QKV projection stays float
    assert any(f"'{first}' excluded by pattern" in m for m in ctx.messages)


def shared_weight_model(hidden=8):
    """One weight W used by two MatMuls (ALBERT's layers share theirs): x -> MatMul(W) -> Mul(d) -> MatMul(W) -> y.

    The two consumers see activations with outliers in different channels (x in channel 0; the Mul puts the
    second MatMul's in channel 5), so each consumer's own SmoothQuant vector differs from the other's.
    """
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    d = np.ones(hidden, np.float32)
    d[5] = 10.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="layer0"),
             helper.make_node("Mul", ["h", "d"], ["h2"], name="outlier"),
             helper.make_node("MatMul", ["h2", "w"], ["y"], name="layer1")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, hidden])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(d, "d")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _shared_weight_feeds(count, seed):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.uniform(-1.0, 1.0, (4, 3, 8)).astype(np.float32)  # bounded: held-out data stays in range
        x[..., 0] *= 10.0
        feeds.append({"x": x})
    return feeds


def _output_cosine(reference, candidate, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for m in (reference, candidate)]
    a = np.concatenate([runs[0].run(None, f)[0] for f in feeds]).reshape(-1)
    b = np.concatenate([runs[1].run(None, f)[0] for f in feeds]).reshape(-1)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("target", ["trt", "ort-cpu", "ort-cuda"])
@pytest.mark.parametrize("spec, copies", [("qdq", 1), ("qdq{shared_weights=copy}", 2), ("qdq{smooth=0}", 1)])
def test_shared_weight_smoothed_as_shared(target, spec, copies):
    """Regression: a weight shared by two MatMuls was smoothed for its first consumer only, and that one INT8
    weight served both (ALBERT: cosine 0.83) while each consumer divided its input by its own vector."""
    model = shared_weight_model()
    q, stats, _ = quantize(model, target, spec, feeds=_shared_weight_feeds(4, 0))
    onnx.checker.check_model(q)
    assert stats["quantized_matmuls"] == 2
    names = [o for n in q.graph.node for o in n.output] + [t.name for t in q.graph.initializer]
    assert len(names) == len(set(names))  # no two distinct tensors share a name
    int8_weights = [t for t in q.graph.initializer if numpy_helper.to_array(t).dtype == np.int8 and t.dims == [8, 8]]
    assert len(int8_weights) == copies
    # Numbers: held-out data, the quantized graph against the float one (before the fix: 0.79 with smoothing).
    assert _output_cosine(model, q, _shared_weight_feeds(4, 1)) >= 0.998


def _effective_weights(model):
    """The float weight every quantized MatMul computes with: its INT8 weight dequantized, with the smoothing
    factor its input is multiplied by (1/s) moved back into the rows."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] in consts:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in consts:
            continue
        weight = consts[dq.input[0]].astype(np.float64) * consts[dq.input[1]].astype(np.float64)[None, :]
        q = producers.get(producers[node.input[0]].input[0])  # activation DQ <- Q <- ([Add(-z/s)] Mul(1/s) | x)
        mul = producers.get(q.input[0]) if q is not None else None
        if mul is not None and mul.op_type == "Add" and mul.input[1] in consts:  # the shift: its z is in the bias
            mul = producers.get(mul.input[0])
        if mul is not None and mul.op_type == "Mul" and mul.input[1] in consts:
            weight = weight * consts[mul.input[1]].astype(np.float64)[:, None]
        found[node.name] = weight
    return found


def test_albert_every_layer_computes_with_its_own_weight(exports, tmp_path, capsys):
    """ALBERT's layers share their weights. Each quantized MatMul's effective float weight (its INT8 weight,
    dequantized, with its input's smoothing factor moved back) must equal the original weight within INT8
    rounding; before the fix the second layer computed with diag(s0 / s1) W (relative error up to 4.5)."""
    from tqc.compiler.cli.main import main

    path = exports.get("albert", size="tiny")
    model = load_model(path)
    float_weights = {}
    fused = PassManager(parse_pipeline("fold,fuse"), PassContext(target="trt")).run(model)
    consts = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    for node in fused.graph.node:
        if node.op_type == "MatMul" and node.input[1] in consts:
            float_weights[node.name] = consts[node.input[1]].astype(np.float64)
    feeds = synthesize_feeds(model, count=4)
    data = tmp_path / "calib.npz"
    np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    for target in ("trt", "ort-cuda"):
        out = tmp_path / f"q-{target}.onnx"
        with pytest.raises(SystemExit) as info:
            main(["-q", "compile", str(path), "-p", "fold,fuse,qdq", "--target", target, "--calib", str(data),
                  "-o", str(out)])
        assert info.value.code == 0
        assert "[W]" not in capsys.readouterr().err  # no graphsurgeon warnings about tensors sharing a name
        effective = _effective_weights(onnx.load(str(out)))
        shared = [n for n in effective if n in float_weights]
        assert len(shared) >= 7  # embedding projection + 3 per layer (QKV is packed by fuse per layer)
        for name in shared:
            reference = float_weights[name]
            error = np.abs(effective[name] - reference).max() / np.abs(reference).max()
            assert error < 0.02, (target, name, error)


def _heavy_tailed_feeds(count=4, seed=0):
    """Inputs with rare large values: percentile clips them, max keeps them."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_t(2, (64, 3, 8)).astype(np.float32)} for _ in range(count)]


def _activation_scales(model):
    """Scale of every QuantizeLinear that quantizes a smoothed input (its Mul output), by the consumer MatMul."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    scales = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            dq = producers.get(node.input[0])
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            mul = producers.get(q.input[0]) if q is not None else None
            if mul is not None and mul.op_type == "Mul":
                scales[node.name] = (float(consts[q.input[1]]), model, mul)
    return scales


@pytest.mark.parametrize("target", ["trt", "ort-cuda"])
def test_method_applies_to_smoothed_activations(target):
    """Regression: under SmoothQuant (the default) the smoothed input's range came from the per-channel maxima
    whatever the method. The method's range is measured on x / s itself; it is then kept only where it lowers
    the layer's output error below max's, which a 0.1% clip of 6,144 values never does (each clipped value
    costs more than the finer step saves), so the model keeps max's scales here."""
    model = onnx.shape_inference.infer_shapes(shared_weight_model())
    feeds = _heavy_tailed_feeds()
    table = calibrate(model, feeds, calibration_targets(model))
    results = {}
    for spec in ("qdq{method=max}", "qdq{method=percentile,percentile=99.9}"):
        ctx = PassContext(target=target, calibration=table)
        ctx.calibration_source = feeds
        manager = PassManager(parse_pipeline(spec), ctx)
        q = manager.run(model)
        assert manager.records[-1].stats["smoothed"] == 2
        results[spec] = _activation_scales(q), manager.passes[-1].state
    (maxed, _), (clipped, state) = results.values()
    assert set(maxed) == set(clipped) == {"layer0", "layer1"}
    measured = {key[0]: value for key, value in state.smoothed_ranges.items()}
    assert set(measured) == {"layer0", "layer1"}
    for name in maxed:
        max_scale, _, _ = maxed[name]
        pct_scale, q, mul = clipped[name]
        entry, kept = measured[name]
        assert not kept and pct_scale == max_scale  # max wins at the layer output
        # The percentile is of the smoothed activation x / s itself: recompute it in numpy on the same data.
        factor = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == mul.input[1]))
        session = ort.InferenceSession(onnx.shape_inference.infer_shapes(_expose(model, mul.input[0])).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        x = np.concatenate([(f[mul.input[0]] if mul.input[0] in f else session.run([mul.input[0]], f)[0])
                            .reshape(-1, factor.size) for f in feeds]) * factor
        if target == "trt":
            assert entry.symmetric("percentile", 99.9) == pytest.approx(np.percentile(np.abs(x), 99.9), rel=0.05)
            assert entry.symmetric("percentile", 99.9) < 0.8 * np.abs(x).max()  # the heavy tail would be clipped
        else:
            lo, hi = entry.asymmetric("percentile", 99.9)  # each tail clipped at 0.1% of the samples
            assert (lo, hi) == pytest.approx((np.percentile(x, 0.1), np.percentile(x, 99.9)), rel=0.05)


def _expose(model, name):
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    if name not in {o.name for o in exposed.graph.output} | {i.name for i in exposed.graph.input}:
        exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return exposed


def test_method_under_smoothing_needs_the_data_not_only_a_table():
    model = onnx.shape_inference.infer_shapes(two_consumers_model())
    table = calibrate(model, _heavy_tailed_feeds(), calibration_targets(model))
    ctx = PassContext(target="trt", calibration=table)  # a table from `tqc calibrate`, no data
    with pytest.raises(TqcError, match="method=percentile with SmoothQuant measures the smoothed activations"):
        PassManager(parse_pipeline("qdq{method=percentile}"), ctx).run(model)
    PassManager(parse_pipeline("qdq{method=percentile,smooth=0}"), PassContext(target="trt", calibration=table)).run(model)
