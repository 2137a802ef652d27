"""``--target openvino`` placement: what the graph holds, and what OpenVINO's CPU plugin runs in INT8.

The runtime graph (``compiled_model.get_runtime_model()``) is the evidence: FullyConnected nodes run u8
(asymmetric UINT8 codes; the zero point moved into the bias, so OpenVINO runs its zero-point-0 kernel); by default
attention stays in float (OpenVINO's fused attention); with ``qdq{attention=true}`` attention MatMuls run i8
(Q @ K^T) and u8 (probs @ V) on AVX2 / AVX-512 VNNI CPUs, and inside one i8 ``Subgraph`` per attention on CPUs
with AMX.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.analysis.calibration import calibrate, calibration_targets
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tqc[openvino]')")

from tqc.compiler.io.openvino_ir import (OvRunner, compile_ov, int8_matmuls, matmul_placement,  # noqa: E402
                                        runtime_hosts, runtime_precisions)


def mlp_after_layernorm() -> onnx.ModelProto:
    """x -> LayerNorm -> h; h feeds two MatMuls (Q and K projections); GELU-like skewed tensor into a third."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), n) for n in ("g", "bt")]
    inits += [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32) * 0.2, n)
              for n in ("w1", "w2", "w3")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "bt"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MatMul", ["r", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, 32])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantize(model, pipeline="qdq{smooth=0}", target="openvino", runtime="openvino"):
    model = onnx.shape_inference.infer_shapes(model)
    feeds = synthesize_feeds(model, count=4)
    ctx = PassContext(target=target, calibration=calibrate(model, feeds, calibration_targets(model)))
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric", runtime=runtime)
    return manager.run(model), manager.records[-1]


def nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_linear_inputs_asymmetric_uint8_shared_per_tensor_weights_int8_per_channel(tmp_path):
    q, record = quantize(mlp_after_layernorm())
    assert record.stats["linear"] == 3
    assert record.verify["numeric"]["passed"]  # verified on OpenVINO (runtime=openvino)
    qs = nodes(q, "QuantizeLinear")
    assert len(qs) == 2  # h (shared by mm1 and mm2: one FakeQuantize) and r
    for node in qs:
        assert init(q, node.input[2]).dtype == np.uint8
    relu_q = next(n for n in qs if n.input[0] == "r")
    assert init(q, relu_q.input[2]) == 0  # a non-negative tensor: zero point 0, all 256 codes on [0, max]
    h_q = next(n for n in qs if n.input[0] == "h")
    assert 0 < init(q, h_q.input[2]) < 255  # a signed tensor: asymmetric, zero point inside the range
    initializers = {t.name for t in q.graph.initializer}
    for dq in (n for n in nodes(q, "DequantizeLinear") if n.input[0] in initializers):
        assert init(q, dq.input[0]).dtype == np.int8 and not init(q, dq.input[2]).any()
        assert init(q, dq.input[1]).size == 32  # per output channel

    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    precisions = runtime_precisions(compile_ov(path))
    assert precisions["FullyConnected"] == {"u8": 3}  # every linear runs u8 x i8 on OpenVINO's CPU plugin
    # and the numbers: INT8 on OpenVINO close to the float graph on ONNX Runtime
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 16, 32)).astype(np.float32)
    ref = ort.InferenceSession(mlp_after_layernorm().SerializeToString()).run(None, {"x": x})[0]
    got = OvRunner(path).run({"x": x})["y"]
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99


def test_trt_placement_runs_signed_on_openvino_for_contrast(tmp_path):
    """The same graph placed for trt (symmetric INT8 activations) runs its FullyConnected nodes i8."""
    q, _ = quantize(mlp_after_layernorm(), target="trt", runtime="ort")
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    assert runtime_precisions(compile_ov(path))["FullyConnected"] == {"i8": 3}


def compile_cli(args: list[str]) -> None:
    from tqc.compiler.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", *args])
    assert info.value.code == 0


def token_npz(model_path, path, count: int = 4):
    """Synthesized token inputs (the model's own signature) as an .npz for --calib."""
    from tqc.compiler.io.model import load_model

    feeds = synthesize_feeds(load_model(model_path), count=count)
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    return path


def compile_tiny(exports, folder, qdq: str):
    """bert-tiny fused and quantized for openvino by ``tqc compile``, every pass verified on OpenVINO."""
    import json

    source = exports.get("bert", size="tiny")
    path = folder / "tiny.onnx"
    compile_cli([str(source), "-p", f"fold,fuse,{qdq}", "--target", "openvino", "--calib",
                 str(token_npz(source, folder / "calib.npz")), "-o", str(path), "--verify", "numeric",
                 "--runtime", "openvino", "--report", str(folder / "report.json")])
    report = json.loads((folder / "report.json").read_text())
    return path, onnx.load(str(path)), report["stages"][-1]


@pytest.fixture(scope="module")
def tiny_openvino(exports, tmp_path_factory):
    """bert-tiny with INT8 attention (``qdq{attention=true}``)."""
    return compile_tiny(exports, tmp_path_factory.mktemp("ov"), "qdq{attention=true}")


@pytest.fixture(scope="module")
def tiny_openvino_default(exports, tmp_path_factory):
    """bert-tiny with the default placement (float attention, zero points in the biases)."""
    return compile_tiny(exports, tmp_path_factory.mktemp("ov_default"), "qdq")


def test_default_keeps_attention_float_and_runs_linear_layers_with_zero_point_0(tiny_openvino_default):
    """On any x86-64 CPU: the 8 linear layers run on integer inputs whose DequantizeLinear has zero point 0 (the
    Q keeps the asymmetric one, the bias takes the rest); the 4 attention MatMuls run in float."""
    path, q, stage = tiny_openvino_default
    assert stage["stats"]["attention_bmm"] == 0 and stage["stats"]["linear"] == 8
    assert stage["stats"]["zero_points_folded"] >= 1 and stage["verify"]["numeric"]["passed"]
    initializers = {t.name for t in q.graph.initializer}
    activation_dqs = [n for n in nodes(q, "DequantizeLinear") if n.input[0] not in initializers]
    assert len(activation_dqs) == 8 and all(init(q, n.input[2]) == 0 for n in activation_dqs)
    assert any(init(q, n.input[2]) not in (0, 128) for n in nodes(q, "QuantizeLinear"))  # asymmetric codes
    core = ov.Core()
    model = core.read_model(str(path))
    compiled = compile_ov(model, core=core)
    placement = matmul_placement(compiled, model)
    assert int8_matmuls(placement) == (12, 16)  # the QKV projections as three MatMuls each (unpack_qkv)
    attention_names = ("(Q.K^T)", "(probs.V)", "_qk", "_pv")  # a fused float attention op, or its MatMuls
    linear = {n: p for n, p in placement.items() if not n.endswith(attention_names)}
    assert len(linear) == 12 and {p[0] for p in linear.values()} == {"FullyConnected"}
    assert {p[1] for p in linear.values()} <= {"u8", "i8"}
    attention = {p for n, p in placement.items() if n not in linear}
    assert attention and {precision for _, precision in attention} <= {"f32", "bf16"}  # float attention


def subgraph_input_types(compiled, name: str) -> list[str]:
    """Element types (u8, i8, f32, ...) of the inputs of the runtime node called ``name``."""
    op = next(op for op in compiled.get_runtime_model().get_ordered_ops() if op.get_friendly_name() == name)
    return [i.get_element_type().get_type_name() for i in op.inputs()]


def test_attention_matmuls_int8_probs_uint8_on_a_real_export(tiny_openvino):
    """On any x86-64 CPU: every MatMul of the graph runs on integer inputs, whatever runtime node holds it."""
    path, q, stage = tiny_openvino
    assert stage["stats"]["attention_bmm"] == 4 and stage["stats"]["linear"] == 8  # 2 layers
    assert stage["verify"]["numeric"]["passed"]
    producers = {o: n for n in q.graph.node for o in n.output}
    for mm in (n for n in nodes(q, "MatMul") if "tqc_attn" in n.name and n.name.endswith(("_qk", "_pv"))):
        for name in mm.input:
            dq = producers[name]
            while dq.op_type in ("Transpose", "Reshape", "Split", "Mul"):  # q, k, v: one pair before the QKV
                dq = producers[dq.input[0]]  # Split (and q's rescale Mul; passes/qdq/shared_qkv.py)
            assert dq.op_type == "DequantizeLinear"
            zp, scale = init(q, dq.input[2]), init(q, dq.input[1])
            source = producers[producers[dq.input[0]].input[0]]
            if source.op_type == "Softmax":  # probs in [0, 1]: UINT8, 1/255
                assert zp.dtype == np.uint8 and zp == 0 and np.isclose(scale, 1 / 255)
            else:  # q, k, v: symmetric INT8
                assert zp.dtype == np.int8 and zp == 0
    core = ov.Core()
    model = core.read_model(str(path))
    compiled = compile_ov(model, core=core)
    placement = matmul_placement(compiled, model)
    attention = {n: p for n, p in placement.items() if n.startswith("tqc_attn") and n.endswith(("_qk", "_pv"))}
    assert len(attention) == 4 and int8_matmuls(placement) == (12, 12)  # 8 linear + 4 attention, all integer
    assert {placement[n] for n in placement if n not in attention} == {("FullyConnected", "u8")}
    hosts = runtime_hosts(compiled)
    for layer in range(2):
        qk, pv = attention[f"tqc_attn{layer}_qk"], attention[f"tqc_attn{layer}_pv"]
        if qk[0] == "MatMul":  # AVX2 / AVX-512 VNNI: Q @ K^T i8 x i8, probs @ V u8 x i8, Softmax in float
            assert (qk, pv) == (("MatMul", "i8"), ("MatMul", "u8"))
            assert hosts[f"tqc_attn{layer}_softmax"][0] in (("Softmax", "f32"), ("Softmax", "bf16"))  # float (bf16:
            # OpenVINO's default inference precision on CPUs with BF16 units)
        else:  # AMX: one i8 Subgraph holds Q @ K^T, the mask, the Softmax, the probs' UINT8 pair and probs @ V
            assert qk == pv == ("Subgraph", "i8")
            names = {n for n, h in hosts.items() if qk in h and n.startswith(f"tqc_attn{layer}_")}
            assert {f"tqc_attn{layer}_{n}" for n in ("qk", "softmax", "pv")} <= names
            assert any(n.startswith(f"tqc_attn{layer}_probs_") for n in names)  # the probs' Q/DQ, folded in
            inputs = subgraph_input_types(compiled, f"tqc_attn{layer}_pv")
            assert inputs.count("i8") == 3  # q, k and v enter as INT8 (the mask in float)
    precisions = runtime_precisions(compiled)
    assert set(precisions.get("MVN", {})) == {"f32"}  # LayerNormalization fused into MVN, in float


def run_tensors(model: onnx.ModelProto, feed: dict, names: list[str]) -> list[np.ndarray]:
    """The tensors ``names`` of ``model`` on ORT CPU (optimizations off), for the inputs of ``feed`` it takes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})


def runtime_output_precisions(compiled, layer: str) -> set[str]:
    """Output precisions (rt_info ``outputPrecisions``) of the runtime nodes that took in ``layer`` (or a layer
    OpenVINO derived from it, ``<layer>/...``)."""
    found = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        if any(name == layer or name.startswith(layer + "/") for name in names):
            found.add(info["outputPrecisions"].astype(str))
    return found


def test_qkv_share_one_scale_fused_into_the_projection(tiny_openvino, exports, tmp_path, monkeypatch):
    """On any x86-64 CPU: with INT8 attention, q, k and v share one symmetric INT8 Q/DQ before the QKV Split
    (passes/qdq/shared_qkv.py); OpenVINO fuses it into the projection, which writes i8. The fidelity to the FP32
    model is that of three separate scales (the same INT8 codes, up to float rounding at a code's edge)."""
    import dataclasses

    import tqc.compiler.core.target as target
    from tqc.compiler.io.model import load_model

    path, q, stage = tiny_openvino
    assert stage["stats"]["qkv_scales_shared"] == 2
    producers = {o: n for n in q.graph.node for o in n.output}
    for layer in range(2):
        split = next(n for n in q.graph.node if n.name == f"tqc_attn{layer}_qkv_split")
        dq = producers[split.input[0]]
        assert dq.op_type == "DequantizeLinear" and init(q, dq.input[2]).dtype == np.int8
        assert init(q, dq.input[2]) == 0 and init(q, dq.input[1]) > 0
        assert [n for n in q.graph.node if n.name == f"tqc_attn{layer}_qk_qkv_shared_rescale"]
    compiled = compile_ov(path)
    for layer in range(2):
        assert runtime_output_precisions(compiled, f"tqc_attn{layer}_qkv_matmul") == {"i8"}
    monkeypatch.setitem(target.BY_NAME, "openvino", dataclasses.replace(target.OPENVINO, shared_qkv_scale=False))
    apart_path, apart, apart_stage = compile_tiny(exports, tmp_path, "qdq{attention=true}")
    assert "qkv_scales_shared" not in apart_stage["stats"]
    assert len(nodes(apart, "QuantizeLinear")) == len(nodes(q, "QuantizeLinear")) + 4  # 3 pairs for 1, 2 layers
    feed = synthesize_feeds(load_model(exports.get("bert", size="tiny")), count=1)[0]

    def run(model, names):
        return run_tensors(model, feed, names)

    for layer in range(2):
        prefix = f"tqc_attn{layer}_"
        q_codes, kt_codes, v_codes = run(apart, [f"{prefix}{w}_quantized" for w in ("q", "kt", "v")])
        packed, = run(q, [f"{prefix}qkv_split_qkv_quantized"])
        batch, heads, tokens, size = q_codes.shape
        parts = packed.reshape(batch, tokens, 3, heads, size)
        assert packed.dtype == np.int8 and np.abs(packed).max() > 64  # the shared scale spans all three ranges
        for codes, part, perm in ((q_codes, parts[:, :, 0], (0, 2, 1, 3)), (kt_codes, parts[:, :, 1], (0, 2, 3, 1)),
                                  (v_codes, parts[:, :, 2], (0, 2, 1, 3))):
            same = part.transpose(perm) == codes  # the INT8 codes of the three separate scales...
            assert same.mean() > 0.999 and np.abs(part.transpose(perm).astype(int) - codes).max() <= 1  # ...but
            # where float rounding puts a value on the other side of a code's edge
    out_apart, = run(apart, ["last_hidden_state"])
    out_shared, = run(q, ["last_hidden_state"])
    out_float, = run(onnx.load(str(exports.get("bert", size="tiny"))), ["last_hidden_state"])
    assert np.abs(out_shared - out_apart).max() < 0.5 * np.abs(out_apart - out_float).max()


def test_qkv_share_scales_through_a_float_projection(exports, tmp_path, monkeypatch):
    """A QKV projection kept in float (``exclude``): its q and k weight columns and biases take s_v / s_q and
    s_v / s_k (the scales q, k and v get when quantized apart), v's stay, and q is scaled back by s_q s_k / s_v^2."""
    import dataclasses

    import tqc.compiler.core.target as target

    spec = "qdq{attention=true,exclude=tqc_attn*_qkv_matmul}"
    (tmp_path / "shared").mkdir()
    _, shared, stage = compile_tiny(exports, tmp_path / "shared", spec)
    assert stage["stats"]["qkv_scales_shared"] == 2 and stage["verify"]["numeric"]["passed"]
    monkeypatch.setitem(target.BY_NAME, "openvino", dataclasses.replace(target.OPENVINO, shared_qkv_scale=False,
                                                                        qkv_unpacked=False))  # packed, as before
    (tmp_path / "apart").mkdir()
    _, apart, _ = compile_tiny(exports, tmp_path / "apart", spec)
    for layer in range(2):
        prefix = f"tqc_attn{layer}_"
        s_q, s_k, s_v = (float(init(apart, f"{prefix}{w}_scale")) for w in ("q", "kt", "v"))
        matmul = next(n for n in shared.graph.node if n.name == f"{prefix}qkv_matmul")
        before = next(n for n in apart.graph.node if n.name == f"{prefix}qkv_matmul")
        w_shared, w_apart = init(shared, matmul.input[1]), init(apart, before.input[1])
        hidden = w_apart.shape[1] // 3
        for part, factor in enumerate((s_v / s_q, s_v / s_k, 1.0)):
            columns = slice(part * hidden, (part + 1) * hidden)
            np.testing.assert_allclose(w_shared[:, columns], w_apart[:, columns] * factor, rtol=1e-5, atol=1e-7)
        rescale = float(init(shared, f"{prefix}qk_qkv_shared_rescale"))
        assert np.isclose(rescale, s_q * s_k / s_v ** 2, rtol=1e-5)


def test_fusion_is_standard_onnx(tiny_openvino):
    _, q, _ = tiny_openvino
    assert not [n for n in q.graph.node if n.domain == "com.microsoft"]  # OpenVINO cannot read contrib ops
    # 5 fused LayerNorms, and 4 more: the smoothing of the QKV and FFN1 inputs of 2 layers (their gamma, beta
    # times SmoothQuant's factors; passes/qdq/openvino.fold_smoothing)
    assert len(nodes(q, "LayerNormalization")) == 5 + 4


def test_budget_measures_on_openvino():
    """qdq{budget=...,budget_runtime=openvino}: the accuracy budget is met as OpenVINO computes the graph."""
    from tqc.passes.qdq.budget import mean_output_cosine, run_graph
    from tqc.compiler.io.graph import to_graph

    model = onnx.shape_inference.infer_shapes(mlp_after_layernorm())
    feeds = synthesize_feeds(model, count=4)
    ctx = PassContext(target="openvino", calibration=calibrate(model, feeds, calibration_targets(model)),
                      verification_feeds=feeds)
    budget = 0.99995
    manager = PassManager(parse_pipeline(f"qdq{{smooth=0,budget={budget},budget_runtime=openvino}}"), ctx,
                          verify="numeric", runtime="openvino")
    q = manager.run(model)
    state = manager.passes[-1].state
    kept = state.skip
    assert state.full_cosine < budget and 0 < len(kept) < 3  # some, not all, back to float
    reference = run_graph(to_graph(model), feeds, "openvino")
    assert mean_output_cosine(reference, run_graph(to_graph(q), feeds, "openvino"), feeds) >= budget


def test_smoothing_folds_into_a_second_layernorm_with_the_same_codes(tiny_openvino_default, exports, tmp_path,
                                                                    monkeypatch):
    """Default placement: SmoothQuant's Mul and shift Add before the QKV and FFN1 inputs become a second
    LayerNorm (gamma f, beta f + c; passes/qdq/openvino.fold_smoothing); the attention-output and FFN2 Muls stay.
    Every linear layer gets the INT8 codes it got with the Muls (up to float rounding at a code's edge). (What it
    saves at run time depends on the model: in MiniLM OpenVINO then fuses the first LayerNorm's affine into the
    residual Add, 12 fewer f32 Eltwise nodes; bert-tiny runs the same nodes either way.)"""
    import dataclasses

    import tqc.compiler.core.target as target
    from tqc.compiler.io.model import load_model

    _, q, stage = tiny_openvino_default
    assert stage["stats"]["smoothing_folded"] == 4 and stage["verify"]["numeric"]["passed"]
    muls = [n.name for n in nodes(q, "Mul") if "_tqc_smooth" in n.name]
    assert len(muls) == 4 and all("output/dense" in name for name in muls)  # attention output's and FFN2's
    monkeypatch.setitem(target.BY_NAME, "openvino", dataclasses.replace(target.OPENVINO, smoothing_folded=False))
    _, kept, kept_stage = compile_tiny(exports, tmp_path, "qdq")
    assert "smoothing_folded" not in kept_stage["stats"]
    assert len([n for n in nodes(kept, "Mul") if "_tqc_smooth" in n.name]) == 8
    assert len(nodes(kept, "LayerNormalization")) + 4 == len(nodes(q, "LayerNormalization"))
    codes = [n.output[0] for n in nodes(kept, "QuantizeLinear")]
    assert len(codes) == 8 and {n.output[0] for n in nodes(q, "QuantizeLinear")} == set(codes)
    feed = synthesize_feeds(load_model(exports.get("bert", size="tiny")), count=1)[0]

    def run(model, names):
        return run_tensors(model, feed, names)

    for name, before, after in zip(codes, run(kept, codes), run(q, codes)):
        differ = np.abs(before.astype(int) - after.astype(int))
        assert before.shape == after.shape and np.abs(before.astype(int) - before.mean()).max() > 8, name
        assert (differ > 0).mean() < 1e-3 and differ.max() <= 1, name
    out_kept, = run(kept, ["last_hidden_state"])
    out_folded, = run(q, ["last_hidden_state"])
    out_float, = run(onnx.load(str(exports.get("bert", size="tiny"))), ["last_hidden_state"])
    assert np.abs(out_folded - out_kept).max() < 0.5 * np.abs(out_kept - out_float).max()


def test_int8_attention_folds_the_layernorm_smoothing_too(tiny_openvino):
    """With ``attention=true`` (the q, k, v Q/DQ shared after the QKV projection) the LayerNorm-fed smoothing
    folds as in the default."""
    _, q, stage = tiny_openvino
    assert stage["stats"]["smoothing_folded"] == 4
    assert len([n for n in nodes(q, "Mul") if "_tqc_smooth" in n.name]) == 4


def test_qkv_projection_unpacked_same_numbers_no_split(tiny_openvino_default, exports, tmp_path, monkeypatch):
    """Default placement, float attention: each packed QKV projection becomes three MatMuls and bias Adds on the
    one quantized input (passes/qdq/openvino.unpack_qkv), so OpenVINO runs no Split (a reference kernel there);
    the answer is the packed graph's (each output column is the same dot product)."""
    import dataclasses

    import tqc.compiler.core.target as target
    from tqc.compiler.io.model import load_model

    path, q, stage = tiny_openvino_default
    assert stage["stats"]["qkv_unpacked"] == 2 and not nodes(q, "Split")
    monkeypatch.setitem(target.BY_NAME, "openvino", dataclasses.replace(target.OPENVINO, qkv_unpacked=False))
    packed_path, packed, packed_stage = compile_tiny(exports, tmp_path, "qdq")
    assert "qkv_unpacked" not in packed_stage["stats"] and len(nodes(packed, "Split")) == 2
    assert len(nodes(q, "MatMul")) == len(nodes(packed, "MatMul")) + 4
    assert len(nodes(q, "QuantizeLinear")) == len(nodes(packed, "QuantizeLinear"))  # one Q/DQ feeds all three
    feed = synthesize_feeds(load_model(exports.get("bert", size="tiny")), count=1)[0]
    (out_packed,), (out_unpacked,) = (run_tensors(m, feed, ["last_hidden_state"]) for m in (packed, q))
    assert np.abs(out_unpacked - out_packed).max() <= 1e-5 * np.abs(out_packed).max()
    assert "Split" in runtime_precisions(compile_ov(packed_path)) and "Split" not in runtime_precisions(compile_ov(path))
