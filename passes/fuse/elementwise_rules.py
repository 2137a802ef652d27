"""The GELU, LayerNorm and residual-LayerNorm pattern catalogue: one rule per exporter variant, as data.

Like ``attention_rules``, each rule is a list of steps walked from an anchor node; ``elementwise.py`` runs
them, and on a miss keeps the rule that got furthest and the reason it stopped (``--explain fuse``). A step
marked ``commutative`` declares its operand-order alternatives: both orders of the node's two inputs are
tried (``match.either_order``), so the rules never spell out the swapped forms.

GELU, anchored at the Erf or Tanh node (``0.5·x·(1 + erf(x/√2))``, ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``)::

    erf:       x ─► Scale(1/√2) ─► [Erf] ─► Add(1) ─► Mul(x) ─► Mul(0.5)       (any order of the last two)
    tanh-pow:  x ─► Add(x, 0.044715·Pow(x, 3)) ─► Scale(√(2/π)) ─► [Tanh] ─► Add(1) ─► Mul(x) ─► Mul(0.5)
    tanh-mul:  the same, x³ written Mul(Mul(x, x), x)

    after:  Gelu(x[, approximate=tanh])        (trt, opset ≥ 20)
            BiasGelu(xw, b) / Gelu(x)           (ort, erf form: com.microsoft; the bias Add absorbed when only
            FastGelu(xw, b) / FastGelu(x)        the GELU reads x = MatMul + b)

LayerNorm written out in primitives (torch's legacy exporter below opset 17), anchored at the last Add (β)::

    legacy-pow:  Add(Mul(Div(x - ReduceMean(x), Sqrt(ReduceMean(Pow(x - mean, 2)) + eps)), γ), β)
    legacy-mul:  the same, the square written Mul(x - mean, x - mean)

    after:  LayerNormalization(x, γ, β, axis=-1, epsilon=eps)          (opset ≥ 17)

Residual LayerNorm (ORT targets), anchored at a LayerNorm (the op, or a decomposition above)::

    residual-bias:  LayerNorm(Add(Add(MatMul, b), residual))

    after:  SkipLayerNormalization(MatMul, residual, γ, β, b)           (form 'contrib')
            LayerNormalization(Sum(MatMul, residual, b), γ, β)          (form 'sum')
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One node of a pattern, reached from the previous step's tensor.

    ``kind`` names what the step checks (``STEP_KINDS``); ``op`` the node's op types; ``value`` the scalar
    constant operand it expects (within ``tolerance``, relative); ``commutative``: both operand orders are
    alternatives."""

    kind: str
    op: tuple[str, ...]
    value: float | None = None
    commutative: bool = False
    tolerance: float = 1e-3     # relative; 0: the value must be exact

    def __str__(self) -> str:
        ops = "/".join(self.op)
        value = f"({self.value:.6g})" if self.value is not None else ""
        return f"{self.kind}: {ops}{value}" + (" either order" if self.commutative else "")


# What each step kind checks (``elementwise.py`` implements them):
STEP_KINDS: dict[str, str] = {
    "scale_input": "the anchor's input is x·c (Mul, either order) or x/(1/c) (Div)",
    "cube_sum": "the scaled tensor is Add(x, 0.044715·x³), either order",
    "plus_one": "the anchor's output is read by one Add(·, 1), either order",
    "half_product": "that sum is multiplied by x and by 0.5, in any order and grouping (at most 4 Muls)",
    "shift": "Add(·, β) with a constant 1-D β, either order",
    "scale": "Mul(·, γ) with a constant 1-D γ, either order",
    "normalize": "Div(centered, std)",
    "center": "centered = Sub(x, ReduceMean(x)) over the last axis",
    "root": "std = Sqrt(·)",
    "epsilon": "Add(variance, eps) with a scalar eps, either order",
    "variance": "variance = ReduceMean(square) over the last axis",
    "square": "square = Pow(centered, 2) or Mul(centered, centered)",
    "affine_constant": "the LayerNorm's γ and β are constants",
    "residual_add": "the LayerNorm's input is an Add of two computed tensors, read only by the LayerNorm",
    "bias_projection": "one operand of that Add is Add(MatMul, b) with a constant 1-D b (either order), read once; "
                       "the first operand order whose operand is such a projection is the one checked",
}


@dataclass(frozen=True)
class GeluRule:
    name: str
    description: str
    anchor: str                 # the op the rule starts from: "Erf" | "Tanh"
    steps: tuple[Step, ...]
    approximate: str            # the Gelu op's attribute: "none" | "tanh"
    ort_op: str                 # com.microsoft op without a bias to absorb
    ort_biased_op: str          # com.microsoft op taking (MatMul output, bias)


@dataclass(frozen=True)
class LayerNormRule:
    name: str
    description: str
    steps: tuple[Step, ...]     # walked backwards from the Add (β) that ends the LayerNorm


@dataclass(frozen=True)
class SkipLayerNormRule:
    name: str
    description: str
    steps: tuple[Step, ...]     # walked backwards from the LayerNorm


_PLUS_ONE = Step("plus_one", ("Add",), 1.0, commutative=True, tolerance=1e-6)
_HALF_PRODUCT = Step("half_product", ("Mul",), 0.5, commutative=True)

GELU_RULES: tuple[GeluRule, ...] = (
    GeluRule(
        name="erf",
        description="exact GELU (torch nn.GELU(), BERT's 'gelu'): 0.5·x·(1 + erf(x/√2))",
        anchor="Erf",
        steps=(Step("scale_input", ("Div", "Mul"), 1 / math.sqrt(2), commutative=True), _PLUS_ONE, _HALF_PRODUCT),
        approximate="none", ort_op="Gelu", ort_biased_op="BiasGelu",
    ),
    GeluRule(
        name="tanh-pow",
        description="tanh GELU (ALBERT's 'gelu_new'; torch.pow(x, 3.0)): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))",
        anchor="Tanh",
        steps=(Step("scale_input", ("Mul",), math.sqrt(2 / math.pi), commutative=True),
               Step("cube_sum", ("Pow",), 0.044715, commutative=True), _PLUS_ONE, _HALF_PRODUCT),
        approximate="tanh", ort_op="FastGelu", ort_biased_op="FastGelu",
    ),
    GeluRule(
        name="tanh-mul",
        description="tanh GELU with x³ written x·x·x: Mul(Mul(x, x), x), either operand order",
        anchor="Tanh",
        steps=(Step("scale_input", ("Mul",), math.sqrt(2 / math.pi), commutative=True),
               Step("cube_sum", ("Mul",), 0.044715, commutative=True), _PLUS_ONE, _HALF_PRODUCT),
        approximate="tanh", ort_op="FastGelu", ort_biased_op="FastGelu",
    ),
)


def _layernorm_steps(square: Step) -> tuple[Step, ...]:
    return (
        Step("shift", ("Add",), commutative=True),
        Step("scale", ("Mul",), commutative=True),
        Step("normalize", ("Div",)),
        Step("center", ("Sub",)),
        Step("root", ("Sqrt",)),
        Step("epsilon", ("Add",), commutative=True),
        Step("variance", ("ReduceMean",)),
        square,
    )


LAYERNORM_RULES: tuple[LayerNormRule, ...] = (
    LayerNormRule(
        name="legacy-pow",
        description="torch's legacy exporter below opset 17: the variance of (x - mean) squared by Pow(·, 2)",
        steps=_layernorm_steps(Step("square", ("Pow",), 2.0, tolerance=0.0)),
    ),
    LayerNormRule(
        name="legacy-mul",
        description="LayerNorm written by hand (or other exporters): (x - mean) squared as Mul(c, c)",
        steps=_layernorm_steps(Step("square", ("Mul",))),
    ),
)

SKIP_LAYERNORM_RULES: tuple[SkipLayerNormRule, ...] = (
    SkipLayerNormRule(
        name="residual-bias",
        description="BERT-style residual: LayerNorm(Add(Add(MatMul, b), residual)), any operand order; "
                    "embedding sums (a position table may broadcast from [1, S, H]) are left alone",
        steps=(Step("affine_constant", ("LayerNorm",)),
               Step("residual_add", ("Add",), commutative=True),
               Step("bias_projection", ("Add",), commutative=True)),
    ),
)
