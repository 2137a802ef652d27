"""The fusion matrix on real exports, each catalogue rule, the explain tracer and the target forms."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.models.recipes import CLASSIC_FAMILIES
from tqc.passes.base import PassContext
from tqc.passes.fuse.attention import RULES, find_attention
from tqc.passes.fuse.masks import mask_input_names

FAMILIES = sorted(CLASSIC_FAMILIES)  # ModernBERT, DeBERTa-v2, MPNet: test_fuse_new_families.py
VARIANTS = [("legacy", "eager"), ("legacy", "sdpa"), ("dynamo", "eager"), ("dynamo", "sdpa")]
RULE_FOR_VARIANT = {("legacy", "eager"): "eager", ("dynamo", "eager"): "eager",
                    ("legacy", "sdpa"): "sdpa-legacy", ("dynamo", "sdpa"): "sdpa-dynamo"}


def compile_with(path, pipeline, target, explain=()):
    ctx = PassContext(target=target, explain=set(explain))
    manager = PassManager(parse_pipeline(pipeline), ctx, verify="numeric")
    model = manager.run(load_model(path))
    return model, manager, ctx


def ops_of(model):
    return [(n.domain or "", n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter, attn", VARIANTS)
@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_every_attention_block_fuses_exactly(family, exporter, attn, target, exports):
    path = exports.get(family, exporter=exporter, attn=attn, size="tiny")
    model, manager, _ = compile_with(path, "fold,fuse", target)
    stats = manager.records[1].stats
    layers = 2
    assert stats["attention_blocks"] == layers
    assert stats["attention"] == layers, stats
    assert stats["attention_summary"] == f"{layers}/{layers} attention fused"
    assert stats["attention_rules"] == RULE_FOR_VARIANT[(exporter, attn)]
    numeric = manager.records[1].verify["numeric"]
    assert numeric["passed"] and numeric["outputs"]["last_hidden_state"]["max_abs"] <= 1e-4
    ops = ops_of(model)
    assert not any(op == "Softmax" for _, op in ops) or target == "trt"
    if target == "trt":
        assert all(domain in ("", "ai.onnx") for domain, _ in ops)  # standard ONNX only
        assert sum(op == "Softmax" for _, op in ops) == layers
        assert not any(op == "IsNaN" for _, op in ops)  # no NaN guards left
        assert sum(op == "Split" for _, op in ops) == layers  # packed QKV
        mask_casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] == "attention_mask"]
        assert len(mask_casts) == 1  # the mask is built once for all layers
    else:
        assert ops.count(("com.microsoft", "Attention")) == layers
        assert stats["embed_layernorm"] == 1, stats  # RoBERTa-style computed position ids included
        assert stats["skip_layernorm_form"] == "sum"  # ort-cpu: Sum + LayerNormalization (see skip_layernorm.py)
        assert ops.count(("", "Sum")) == stats["skip_layernorm"] >= 2 * layers - 1
        gelu = "FastGelu" if family == "albert" else "BiasGelu"
        assert ops.count(("com.microsoft", gelu)) == layers


def test_rule_catalogue_has_one_rule_per_variant():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert set(RULE_FOR_VARIANT.values()) <= set(names)


@pytest.mark.slow
def test_minilm_real_weights_all_targets(exports):
    path = exports.get("minilm")
    for target in ("trt", "ort-cpu"):
        _, manager, _ = compile_with(path, "fold,fuse", target)
        assert manager.records[1].stats["attention_summary"] == "6/6 attention fused"


def test_opset_20_uses_gelu_op_for_trt(exports):
    path = exports.get("bert", size="tiny", opset=20)
    model, manager, _ = compile_with(path, "fold,fuse", "trt")
    gelus = [n for n in model.graph.node if n.op_type == "Gelu"]
    assert len(gelus) == 2 and manager.records[1].stats["gelu"] == 2
    assert not any(n.op_type == "Erf" for n in model.graph.node)


def test_opset_17_trt_keeps_erf_and_says_why(exports):
    path = exports.get("bert", size="tiny")
    _, manager, ctx = compile_with(path, "fold,fuse", "trt")
    assert manager.records[1].stats["gelu"] == 0
    assert any("opset 17 has no Gelu op" in m for m in ctx.messages)


def test_opset_14_export_fuses(exports):
    """Opset 14 has no LayerNormalization: the export writes it out in primitives, and fuse matches those
    (residual ones into SkipLayerNormalization, the embedding one into EmbedLayerNormalization)."""
    path = exports.get("bert", size="tiny", opset=14)
    model, manager, ctx = compile_with(path, "fold,fuse", "ort-cpu")
    stats = manager.records[1].stats
    assert stats["attention"] == 2
    assert stats["skip_layernorm"] == 4 and stats["skip_layernorm_form"] == "contrib"
    assert stats["embed_layernorm"] == 1 and stats["layernorm_fused"] == 0
    ops = [n.op_type for n in model.graph.node]
    assert "ReduceMean" not in ops and "Sqrt" not in ops  # no decomposed LayerNorm left
    assert manager.records[1].verify["numeric"]["outputs"]["last_hidden_state"]["max_abs"] <= 1e-4
    _, manager, ctx = compile_with(path, "fold,fuse{skip_layernorm=sum}", "ort-cpu")
    assert manager.records[1].stats["skip_layernorm_form"] == "contrib"
    assert any("needs LayerNormalization (opset 17)" in m for m in ctx.messages)


def _decomposed_layernorm_model(square: str = "Pow") -> onnx.ModelProto:
    """x[2, 5, 8] -> LayerNorm written out as torch's legacy exporter does below opset 17."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        (helper.make_node("Pow", ["centered", "two"], ["squared"]) if square == "Pow" else
         helper.make_node("Mul", ["centered", "centered"], ["squared"])),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        helper.make_node("Add", ["variance", "eps"], ["variance_eps"]),
        helper.make_node("Sqrt", ["variance_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta")]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_decomposed_layernorm_becomes_the_op_at_opset_17(square, target, tmp_path):
    path = tmp_path / "ln.onnx"
    onnx.save(_decomposed_layernorm_model(square), str(path))
    model, manager, _ = compile_with(path, "fuse", target)
    assert manager.records[0].stats["layernorm_fused"] == 1
    assert [n.op_type for n in model.graph.node] == ["LayerNormalization"]
    epsilon = next(a.f for a in model.graph.node[0].attribute if a.name == "epsilon")
    assert epsilon == pytest.approx(1e-12)
    assert manager.records[0].verify["numeric"]["outputs"]["y"]["max_abs"] <= 1e-4


def _break_scale(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn the scores' scalar Mul into a Mul by a vector: no rule may match any more."""
    from tqc.passes.fold import Fold

    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    Fold().run(graph, PassContext())  # scalars become constants
    for node in graph.nodes:
        if node.op == "Softmax":
            add = node.inputs[0].inputs[0]
            scaled = next(t for t in add.inputs if t.inputs and t.inputs[0].op == "Mul")
            mul = scaled.inputs[0]
            const = next(t for t in mul.inputs if hasattr(t, "values"))
            const.values = np.full((16,), float(np.asarray(const.values).reshape(-1)[0]), np.float32)
    from tqc.compiler.io.graph import to_model

    return to_model(graph)


def test_explain_names_the_closest_rule_and_reason(exports, tmp_path):
    path = exports.get("bert", size="tiny", attn="eager")
    broken = _break_scale(load_model(path))
    graph = to_graph(onnx.shape_inference.infer_shapes(broken))
    matches, misses = find_attention(graph, mask_input_names(graph))
    assert matches == [] and len(misses) == 2
    assert misses[0].rule == "eager"
    assert "expected Mul/Div by a scalar (the softmax scale)" in misses[0].reason
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    from tqc.compiler.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(tmp_path / "broken.onnx"), "-p", "fuse", "-o", str(tmp_path / "o.onnx"),
              "--explain", "fuse"])
    assert info.value.code == 0


def test_k_transposed_late_rule_on_a_synthetic_layer():
    """transformers 4.x eager exports: K as [B,H,S,D], then Transpose(0,1,3,2) before the scores."""
    rng = np.random.default_rng(0)
    hidden, heads, size = 8, 2, 4
    inits = []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    nodes = []
    for tag in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", const(f"w{tag}", rng.standard_normal((hidden, hidden)).astype(np.float32))],
                             [f"{tag}_mm"]),
            helper.make_node("Add", [f"{tag}_mm", const(f"b{tag}", rng.standard_normal(hidden).astype(np.float32))],
                             [f"{tag}_lin"]),
            helper.make_node("Reshape", [f"{tag}_lin", const(f"{tag}_shape", np.array([0, 0, heads, size], np.int64))],
                             [f"{tag}_r"]),
            helper.make_node("Transpose", [f"{tag}_r"], [f"{tag}_t"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k_t"], ["k_tt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_t", "k_tt"], ["scores"]),
        helper.make_node("Div", ["scores", const("sqrt_d", np.array(2.0, np.float32))], ["scaled"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=1),
        helper.make_node("Sub", [const("one", np.array(1.0, np.float32)), "mask_f"], ["inv"]),
        helper.make_node("Mul", ["inv", const("big", np.array(-10000.0, np.float32))], ["add_mask"]),
        helper.make_node("Unsqueeze", ["add_mask", const("axes", np.array([1, 2], np.int64))], ["mask4"]),
        helper.make_node("Add", ["scaled", "mask4"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", const("out_shape", np.array([0, 0, hidden], np.int64))], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for target in ("trt", "ort-cpu"):
        manager = PassManager(parse_pipeline("fuse"), PassContext(target=target), verify="numeric")
        manager.run(model)
        stats = manager.records[0].stats
        assert stats["attention_rules"] == "k-transposed-late" and stats["attention"] == 1
        assert manager.records[0].verify["numeric"]["passed"]


def test_fp16_keeps_io_types_and_guards_overflow(exports):
    path = exports.get("bert", size="tiny")
    model, manager, ctx = compile_with(path, "fold,fuse,fp16{margin=0.00001}", "ort-cpu")
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(i.type.tensor_type.elem_type == TensorProto.INT64 for i in model.graph.input)
    stats = manager.records[2].stats
    assert stats["fp32_nodes_guarded"] > 0  # margin 1e-5 * 65504 = 0.66: many nodes exceed it
    assert any("kept in FP32 by the overflow guard" in m for m in ctx.messages)
    assert manager.records[2].verify["numeric"]["passed"]
    fp16_weights = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert fp16_weights


def test_fp16_default_guard_on_minilm(exports):
    model, manager, _ = compile_with(exports.get("minilm"), "fold,fuse,fp16", "trt")
    assert manager.records[2].stats["fp32_nodes_guarded"] == 0
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert all(types[w] == TensorProto.FLOAT16 for w in matmul_weights if w in types)


@pytest.mark.parametrize("target, spec, form", [("ort-cpu", "fuse{skip_layernorm=contrib}", "contrib"),
                                                ("ort-cuda", "fuse", "contrib"),
                                                ("ort-cpu", "fuse{skip_layernorm=off}", None)])
def test_residual_layernorm_forms(target, spec, form, exports):
    path = exports.get("bert", size="tiny")
    model, manager, _ = compile_with(path, "fold," + spec, target)
    stats = manager.records[1].stats
    ops = ops_of(model)
    if form is None:
        assert stats["skip_layernorm"] == 0 and not any(op in ("Sum", "SkipLayerNormalization") for _, op in ops)
    else:
        assert stats["skip_layernorm_form"] == form
        assert ops.count(("com.microsoft", "SkipLayerNormalization")) == stats["skip_layernorm"] == 4
    assert manager.records[1].verify["numeric"]["passed"]


def test_ort_does_not_refuse_the_sum_form_into_its_slow_skip_layernorm(exports, tmp_path):
    """The reason for ort-cpu's Sum form: ORT's own optimizer turns Add + LayerNormalization into
    SkipLayerNormalization (2.5x slower on its CPU provider), but leaves Sum + LayerNormalization alone."""
    import onnxruntime as ort

    model, _, _ = compile_with(exports.get("bert", size="tiny"), "fold,fuse", "ort-cpu")
    source = tmp_path / "fused.onnx"
    onnx.save(model, str(source))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "SkipLayerNormalization" not in optimized
    assert optimized.count("Sum") == 4 and optimized.count("LayerNormalization") == 4


def _weights_behind_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite an export as a base-size dynamo export writes shared weights: each MatMul reads W through
    ``Transpose(W^T)`` (one node per weight, shared by its readers; the exporter folds only small tensors),
    and every other one through an Identity alias as well (legacy exports of shared ALBERT layers)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name: t for t in model.graph.initializer}
    made: dict[str, str] = {}
    new_nodes = []
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight in initializers and len(initializers[weight].dims) == 2:
            if weight not in made:
                transposed = numpy_helper.from_array(numpy_helper.to_array(initializers[weight]).T.copy(),
                                                     f"{weight}_T")
                model.graph.initializer.append(transposed)
                made[weight] = f"{weight}_via_transpose"
                new_nodes.append(helper.make_node("Transpose", [transposed.name], [made[weight]], perm=[1, 0]))
                if len(made) % 2:
                    new_nodes.append(helper.make_node("Identity", [made[weight]], [made[weight] + "_alias"]))
                    made[weight] += "_alias"
            node.input[1] = made[weight]
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + rest)  # producers first: the graph stays sorted
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exporter, attn", VARIANTS)
def test_fuse_alone_needs_no_fold(family, exporter, attn, exports, tmp_path):
    """The tagline pipeline is ``-p fuse,qdq``: fuse canonicalizes what it matches against itself (issue 10:
    ALBERT base exported by dynamo keeps W^T as Transpose nodes and gave 0/12 without fold)."""
    path = tmp_path / "transposed.onnx"
    onnx.save(_weights_behind_transposes(load_model(exports.get(family, exporter=exporter, attn=attn, size="tiny"))),
              str(path))
    for target in ("trt", "ort-cpu"):
        ctx = PassContext(target=target, explain={"fuse"})
        verify = "numeric" if family == "albert" else "structure"
        manager = PassManager(parse_pipeline("fuse"), ctx, verify=verify)
        manager.run(load_model(path))
        stats = manager.records[0].stats
        assert stats["attention_summary"] == "2/2 attention fused", ctx.messages
        assert stats["canonicalized_nodes"] > 0
        if target != "trt":
            assert stats["embed_layernorm"] == 1, ctx.messages
        if verify == "numeric":
            assert manager.records[0].verify["numeric"]["outputs"]["last_hidden_state"]["max_abs"] <= 1e-4
    ctx = PassContext(target="trt", explain={"fuse"})
    manager = PassManager(parse_pipeline("fuse{canonicalize=false}"), ctx, verify="structure")
    manager.run(load_model(path))
    assert manager.records[0].stats["attention"] < 2  # what the issue saw: projections without a constant weight
    assert any("has no constant 2-D weight" in m for m in ctx.messages)
