"""Every GELU, LayerNorm and residual-LayerNorm rule (``passes/fuse/gelu.py``, ``layernorm.py``,
``skip_layernorm.py``), each operand-order alternative included, fused on a synthetic graph and run on ONNX
Runtime CPU (optimizations off) before and after: the outputs agree within 1e-4. And ``--explain fuse`` on deliberately broken patterns."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tqc.compiler.io.graph import to_graph, to_model
from tqc.passes.base import PassContext
from tqc.passes.fuse import Fuse
from tqc.passes.fuse import gelu, layernorm, skip_layernorm

GELU_RULES, LAYERNORM_RULES, SKIP_LAYERNORM_RULES = gelu.RULES, layernorm.RULES, skip_layernorm.RULES

HIDDEN = 8
RNG = np.random.default_rng(0)
W = RNG.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.5
B = RNG.standard_normal(HIDDEN).astype(np.float32)
GAMMA = RNG.standard_normal(HIDDEN).astype(np.float32)
BETA = RNG.standard_normal(HIDDEN).astype(np.float32)


class Builder:
    """A small ONNX graph written node by node; scalars become initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op: str, *inputs: str, name: str | None = None, **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name or f"n{self.count}", **attrs))
        return out

    def binary(self, op: str, a: str, b: str, swapped: bool, name: str | None = None) -> str:
        return self.op(op, *((b, a) if swapped else (a, b)), name=name)

    def model(self, inputs: list[str], output: str, opset: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["y"], name="out"))
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 5, HIDDEN]) for n in inputs],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, HIDDEN])], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def fuse(model: onnx.ModelProto, target: str, **options) -> tuple[onnx.ModelProto, dict, PassContext]:
    graph = to_graph(onnx.shape_inference.infer_shapes(model))
    ctx = PassContext(target=target, explain={"fuse"})
    result = Fuse(**options).run(graph, ctx)
    fused = to_model(graph)
    onnx.checker.check_model(fused)
    return fused, result.stats, ctx


def assert_same_numbers(before: onnx.ModelProto, after: onnx.ModelProto, inputs: list[str]) -> None:
    rng = np.random.default_rng(1)
    feeds = {name: (rng.standard_normal((2, 5, HIDDEN)) * 2).astype(np.float32) for name in inputs}
    expected, got = run(before, feeds), run(after, feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type != "Identity"]


# GELU --------------------------------------------------------------------------------------------------------

def gelu_model(rule: str, variant: str, biased: bool = True, opset: int = 20) -> onnx.ModelProto:
    """x (-> MatMul + b) -> GELU of ``rule`` written as ``variant`` says (one operand-order alternative)."""
    g = Builder()
    x = g.binary("Add", g.op("MatMul", "x", g.const(W)), g.const(B), variant == "bias-swapped") if biased else "x"
    if rule == "erf":
        if variant == "div":
            scaled = g.op("Div", x, g.const(math.sqrt(2)))
        else:
            scaled = g.binary("Mul", x, g.const(1 / math.sqrt(2)), variant == "scale-swapped")
        core = g.op("Erf", scaled, name="core")
    else:
        if rule == "tanh-pow":
            cube = g.op("Pow", x, g.const(3.0))
        elif variant == "cube-swapped":
            cube = g.op("Mul", x, g.op("Mul", x, x))
        else:
            cube = g.op("Mul", g.op("Mul", x, x), x)
        term = g.binary("Mul", cube, g.const(0.044715), variant == "coefficient-swapped")
        inner = g.binary("Add", x, term, variant == "sum-swapped")
        scaled = g.binary("Mul", inner, g.const(math.sqrt(2 / math.pi)), variant == "scale-swapped")
        core = g.op("Tanh", scaled, name="core")
    one = g.binary("Add", core, g.const(1.0), variant == "one-swapped")
    if variant == "half-first":      # Mul(Mul(x, 0.5), t)
        out = g.op("Mul", g.op("Mul", x, g.const(0.5)), one)
    elif variant == "half-then-x":   # Mul(Mul(t, 0.5), x)
        out = g.op("Mul", g.op("Mul", one, g.const(0.5)), x)
    elif variant == "product-swapped":  # Mul(0.5, Mul(t, x))
        out = g.op("Mul", g.const(0.5), g.op("Mul", one, x))
    else:                              # Mul(Mul(x, t), 0.5)
        out = g.op("Mul", g.op("Mul", x, one), g.const(0.5))
    return g.model(["x"], out, opset)


GELU_VARIANTS = {
    "erf": ["plain", "div", "scale-swapped", "one-swapped", "half-first", "half-then-x", "product-swapped",
            "bias-swapped"],
    "tanh-pow": ["plain", "scale-swapped", "sum-swapped", "coefficient-swapped", "one-swapped", "product-swapped",
                 "bias-swapped"],
    "tanh-mul": ["plain", "cube-swapped", "sum-swapped", "coefficient-swapped"],
}


def test_every_gelu_rule_has_variants_here():
    assert sorted(GELU_VARIANTS) == sorted(r.name for r in GELU_RULES)
    assert all(step.kind in module.STEPS for module in (gelu, layernorm, skip_layernorm) for r in module.RULES
               for step in r.steps)


@pytest.mark.parametrize("rule, variant", [(r, v) for r, vs in GELU_VARIANTS.items() for v in vs])
@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_gelu_rule_fuses_exactly(rule, variant, target):
    before = gelu_model(rule, variant)
    after, stats, ctx = fuse(before, target)
    assert stats["gelu"] == 1, ctx.messages
    if target == "trt":
        assert ops(after) == ["MatMul", "Add", "Gelu"]
        gelu = after.graph.node[2]
        approximate = "none" if rule == "erf" else "tanh"
        assert helper.get_attribute_value(gelu.attribute[0]).decode() == approximate
    elif rule == "tanh-mul":  # x·x·x reads x once more than the GELU nodes: the bias Add stays
        assert ops(after) == ["MatMul", "Add", "FastGelu"]
    else:
        assert ops(after) == ["MatMul", "BiasGelu" if rule == "erf" else "FastGelu"]
    assert not any("not fused" in m for m in ctx.messages), ctx.messages
    assert_same_numbers(before, after, ["x"])


@pytest.mark.parametrize("rule", ["erf", "tanh-pow"])
def test_gelu_without_bias_on_ort(rule):
    before = gelu_model(rule, "plain", biased=False, opset=17)
    after, stats, _ = fuse(before, "ort-cpu")
    assert stats["gelu"] == 1
    assert ops(after) == ["Gelu" if rule == "erf" else "FastGelu"]
    assert after.graph.node[0].domain == "com.microsoft"
    assert_same_numbers(before, after, ["x"])


# LayerNorm ----------------------------------------------------------------------------------------------------

def layernorm_model(rule: str, swapped: str = "", opset: int = 17, exponent: float = 2.0, x: str = "x",
                    builder: Builder | None = None) -> tuple[Builder, str]:
    """LayerNorm over the last axis written out in primitives; ``swapped`` names the commutative node whose
    operands are swapped: beta, gamma or eps. A ``-nobias`` rule ends at the γ Mul (no β)."""
    g = builder or Builder()
    rule, bias = rule.removesuffix("-nobias"), not rule.endswith("-nobias")
    mean = g.op("ReduceMean", x, axes=[-1], name="mean")  # opsets 14 and 17: axes as an attribute
    centered = g.op("Sub", x, mean)
    square = g.op("Pow", centered, g.const(exponent), name="square") if rule == "legacy-pow" else \
        g.op("Mul", centered, centered, name="square")
    variance = g.op("ReduceMean", square, axes=[-1])
    std = g.op("Sqrt", g.binary("Add", variance, g.const(1e-12), swapped == "eps"))
    normalized = g.op("Div", centered, std)
    scaled = g.binary("Mul", normalized, g.const(GAMMA), swapped == "gamma", name=None if bias else "scale")
    return g, g.binary("Add", scaled, g.const(BETA), swapped == "beta", name="shift") if bias else scaled


LAYERNORM_VARIANTS = [(rule, swapped) for rule in ("legacy-pow", "legacy-mul") for swapped in ("", "beta", "gamma",
                                                                                               "eps")] + \
    [(rule, swapped) for rule in ("legacy-pow-nobias", "legacy-mul-nobias") for swapped in ("", "gamma", "eps")]


def test_every_layernorm_rule_has_variants_here():
    assert sorted({r for r, _ in LAYERNORM_VARIANTS}) == sorted(r.name for r in LAYERNORM_RULES)


@pytest.mark.parametrize("rule, swapped", LAYERNORM_VARIANTS)
def test_layernorm_rule_fuses_exactly(rule, swapped):
    g, out = layernorm_model(rule, swapped)
    before = g.model(["x"], out, 17)
    after, stats, ctx = fuse(before, "trt")
    assert stats["layernorm_fused"] == 1, ctx.messages
    assert ops(after) == ["LayerNormalization"]
    assert len(after.graph.node[0].input) == (2 if rule.endswith("-nobias") else 3)
    assert_same_numbers(before, after, ["x"])


# Residual LayerNorm -------------------------------------------------------------------------------------------

def skip_model(bias_swapped: bool, residual_swapped: bool, decomposed: bool) -> onnx.ModelProto:
    """LayerNorm(Add(Add(MatMul(h, W), b), residual)), the LayerNorm as the op (opset 17) or written out
    (opset 14)."""
    g = Builder()
    projection = g.binary("Add", g.op("MatMul", "h", g.const(W)), g.const(B), bias_swapped)
    total = g.binary("Add", projection, "residual", residual_swapped, name="residual_add")
    if decomposed:
        g, out = layernorm_model("legacy-pow", opset=14, x=total, builder=g)
        return g.model(["h", "residual"], out, 14)
    out = g.op("LayerNormalization", total, g.const(GAMMA), g.const(BETA), axis=-1, epsilon=1e-12, name="ln")
    return g.model(["h", "residual"], out, 17)


SKIP_VARIANTS = [(bias, residual) for bias in (False, True) for residual in (False, True)]


@pytest.mark.parametrize("bias_swapped, residual_swapped", SKIP_VARIANTS)
@pytest.mark.parametrize("form, decomposed", [("contrib", False), ("sum", False), ("contrib", True)])
def test_skip_layernorm_rule_fuses_exactly(bias_swapped, residual_swapped, form, decomposed):
    assert [r.name for r in SKIP_LAYERNORM_RULES] == ["residual-bias"]
    assert [r.name for r in skip_layernorm.CONTRIB_RULES] == ["residual-projection", "pre-ln-bias", "pre-ln"]
    before = skip_model(bias_swapped, residual_swapped, decomposed)
    after, stats, ctx = fuse(before, "ort-cpu", skip_layernorm=form)
    assert stats["skip_layernorm"] == 1, ctx.messages
    assert ops(after) == (["MatMul", "Sum", "LayerNormalization"] if form == "sum" else
                          ["MatMul", "SkipLayerNormalization"])
    assert_same_numbers(before, after, ["h", "residual"])


# --explain fuse --------------------------------------------------------------------------------------------

def test_explain_names_the_closest_rule_for_broken_gelu_layernorm_and_residual():
    """A GELU adding 2 instead of 1, a LayerNorm squaring with Pow(·, 3) and a residual Add without a biased
    projection: none is fused, and --explain fuse says which rule came closest and where it stopped."""
    g = Builder()
    x = g.op("Add", g.op("MatMul", "x", g.const(W)), g.const(B))
    core = g.op("Erf", g.op("Div", x, g.const(math.sqrt(2))), name="erf")
    half = g.op("Mul", g.op("Mul", x, g.op("Add", core, g.const(2.0), name="plus")), g.const(0.5))
    residual = g.op("Add", half, "x", name="residual_add")
    g, out = layernorm_model("legacy-pow", exponent=3.0, x=residual, builder=g)
    before = g.model(["x"], out, 17)
    after, stats, ctx = fuse(before, "ort-cpu")
    assert stats["gelu"] == 0 and stats["layernorm_fused"] == 0 and stats["skip_layernorm"] == 0
    assert "Erf" in ops(after) and "ReduceMean" in ops(after)
    lines = [m for m in ctx.messages if "not fused" in m]
    assert "fuse: gelu: Erf 'erf' not fused; closest rule 'erf': step 2 (plus_one: Add(1) either order): " \
           "Add 'plus' adds 2, not 1" in lines, ctx.messages
    assert "fuse: layernorm: ReduceMean 'mean' not fused; closest rule 'legacy-pow': step 8 (square: Pow(2)): " \
           "Pow 'square' raises to 3.0, not 2" in lines, ctx.messages
    # the LayerNorm is not fused, so no residual Add is found before one
    assert not any(m.startswith("fuse: skip_layernorm") for m in lines)
    assert_same_numbers(before, after, ["x"])


def test_explain_residual_add_without_biased_projection():
    g = Builder()
    total = g.op("Add", g.op("MatMul", "h", g.const(W)), "residual", name="residual_add")
    out = g.op("LayerNormalization", total, g.const(GAMMA), g.const(BETA), axis=-1, epsilon=1e-12, name="ln")
    before = g.model(["h", "residual"], out, 17)
    after, stats, ctx = fuse(before, "ort-cpu")
    assert stats["skip_layernorm"] == 0
    assert "fuse: skip_layernorm: Add 'residual_add' before LayerNormalization 'ln' not fused; closest rule " \
           "'residual-bias': step 3 (bias_projection: Add either order): neither operand of Add 'residual_add' " \
           "is Add(MatMul, b) with a constant 1-D b (an embedding sum, or a residual without a biased " \
           "projection)" in ctx.messages, ctx.messages
    assert_same_numbers(before, after, ["h", "residual"])


def test_explain_broken_layernorm_below_opset_17_and_broken_tanh_gelu():
    """Opset 14 has no LayerNormalization: the note says so, and a LayerNorm no rule matches is still named; a
    tanh GELU with a wrong cube coefficient stops rule 'tanh-pow' at its second step."""
    g = Builder()
    x = g.op("Add", g.op("MatMul", "x", g.const(W)), g.const(B))
    cube = g.op("Pow", x, g.const(3.0), name="cube")
    term = g.op("Mul", cube, g.const(0.05), name="coefficient")
    scaled = g.op("Mul", g.op("Add", x, term, name="sum"), g.const(math.sqrt(2 / math.pi)))
    core = g.op("Tanh", scaled, name="tanh")
    half = g.op("Mul", g.op("Mul", x, g.op("Add", core, g.const(1.0))), g.const(0.5))
    g, out = layernorm_model("legacy-mul", swapped="eps", x=half, builder=g)
    g.nodes[-1] = helper.make_node("Add", [g.nodes[-2].output[0], "x"], [g.nodes[-1].output[0]], name="shift")
    before = g.model(["x"], out, 14)
    after, stats, ctx = fuse(before, "ort-cpu")
    assert stats["gelu"] == 0 and stats["layernorm_fused"] == 0
    gelu = next(m for m in ctx.messages if m.startswith("fuse: gelu: Tanh 'tanh'"))
    # both operand orders of the Add are tried; the first finds the wrong coefficient
    assert gelu.startswith("fuse: gelu: Tanh 'tanh' not fused; closest rule 'tanh-pow': step 2 (cube_sum: "
                           "Pow(0.044715) either order): Add 'sum': Mul 'coefficient' multiplies by 0.05, not "
                           "0.044715; "), gelu
    # the Add(·, x) after γ is no β: what comes before it is a LayerNorm without β ('legacy-mul-nobias')
    assert not any(m.startswith("fuse: layernorm: ReduceMean") for m in ctx.messages), ctx.messages
    found = layernorm.layernorm_matches(to_graph(before))
    assert [(m.last.op, m.beta, len(m.nodes)) for m in found] == [("Mul", None, 8)]
    assert any(m.startswith("fuse: layernorm: opset 14 has no LayerNormalization") for m in ctx.messages)
    assert_same_numbers(before, after, ["x"])


def pre_ln_model(biased: bool, with_beta: bool, decomposed: bool) -> onnx.ModelProto:
    """A pre-LN block (ModernBERT): s = Add([Add(]MatMul(h, W)[, b)], residual); y = s + MatMul(LayerNorm(s), W),
    the LayerNorm with or without β, as the op (opset 17) or written out (opset 14)."""
    g = Builder()
    projection = g.op("MatMul", "h", g.const(W))
    if biased:
        projection = g.op("Add", projection, g.const(B))
    stream = g.op("Add", projection, "residual", name="residual_add")
    if decomposed:
        g, normed = layernorm_model("legacy-pow" if with_beta else "legacy-pow-nobias", x=stream, builder=g)
    else:
        normed = g.op("LayerNormalization", stream, g.const(GAMMA), *([g.const(BETA)] if with_beta else []),
                      axis=-1, epsilon=1e-12, name="ln")
    out = g.op("Add", stream, g.op("MatMul", normed, g.const(W)))
    return g.model(["h", "residual"], out, 14 if decomposed else 17)


@pytest.mark.parametrize("biased, with_beta", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("decomposed", [False, True])
def test_pre_ln_residual_stream_fuses_with_its_sum_output(biased, with_beta, decomposed):
    """The residual Add read by the LayerNorm and by the next residual Add: SkipLayerNormalization re-produces
    the sum as its fourth output (form 'contrib' only: the 'sum' form keeps the block as it is)."""
    before = pre_ln_model(biased, with_beta, decomposed)
    after, stats, ctx = fuse(before, "ort-cuda")
    assert stats["skip_layernorm"] == 1, ctx.messages
    skip = next(n for n in after.graph.node if n.op_type == "SkipLayerNormalization")
    assert skip.output[3] == "t3" if biased else skip.output[3] == "t2"  # the Add's sum, under its name
    assert len(skip.input) == 3 + with_beta + biased + (biased and not with_beta)
    assert "Add" in ops(after)  # the next residual Add reads the sum
    assert_same_numbers(before, after, ["h", "residual"])
    if not decomposed:
        kept, sum_stats, _ = fuse(before, "ort-cpu")
        assert sum_stats["skip_layernorm"] == 0 and ops(kept) == ops(before)


def test_residual_projection_without_bias_fuses_on_contrib():
    """LayerNorm(Add(MatMul, residual)) without a bias and without β: SkipLayerNormalization(MatMul, residual,
    γ) on ort-cuda; ort-cpu's 'sum' form keeps it (Add + LayerNormalization is that form)."""
    g = Builder()
    total = g.op("Add", "residual", g.op("MatMul", "h", g.const(W)), name="residual_add")
    out = g.op("LayerNormalization", total, g.const(GAMMA), axis=-1, epsilon=1e-12, name="ln")
    before = g.model(["h", "residual"], out, 17)
    after, stats, ctx = fuse(before, "ort-cuda")
    assert stats["skip_layernorm"] == 1, ctx.messages
    assert ops(after) == ["MatMul", "SkipLayerNormalization"]
    assert list(after.graph.node[1].input)[1:] == ["residual", "c1"]
    assert_same_numbers(before, after, ["h", "residual"])
