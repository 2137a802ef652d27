"""The analysis half of ``qdq``: which MatMuls, attention batched MatMuls and fused Attentions to quantize.

``plan_sites(graph, target, options, table)`` is a pure function: it reads the float graph and the calibration
table and returns a ``QdqPlan``; the graph is not touched (lowering is tried on a copy, see below).
``tqc.passes.qdq.insert.insert(graph, plan, ...)`` applies a plan.

    float graph (after fuse)                        QdqPlan
      Attention 'tqc_attn0' (ort-cpu) ──────────►    qattention   'tqc_attn0'                       (QAttention)
      Attention 'tqc_attn1' (excluded)  ────────►    float_attentions 'tqc_attn1' (expanded, QKV float)
      MatMul '/.../output/dense/MatMul' ────────►    PlannedSite('/.../output/dense/MatMul', linear,
                                                                 activations (0,), weight 1, axis 1, flops)
      MatMul 'tqc_attn0_pv' (trt, head 32) ─────►    PlannedSite('tqc_attn0_pv', attention, activations (0, 1))
      MatMul 'tqc_core0_scores' (trt) ──────────►    PlannedSite('tqc_core0_scores', attention, ...)  (core_layouts)
      MatMul with a [1, K] input         ────────►    notes: "... is GEMV-shaped ...; left in float"

Site ids are stable: a site answers to its consumer node's name in the float graph; a QAttention site to the
name of the Attention node it replaces. For ORT targets the attentions that are not turned into QAttention are
expanded into MatMuls first (``tqc.passes.qdq.lower``); their QKV MatMuls are sites under the expanded names
(``tqc_xattn<i>_qkv_matmul``). The planner expands them on a copy of the graph to see those MatMuls;
``insert`` converts the QAttention sites, then expands the same attentions (so the expansion indices and the
order of the rewritten nodes are those of the single-step pass this replaced), then places the Q/DQ pairs.

A quantized graph names its QAttention nodes ``<attention>_tqc_q<n>_QAttention`` (``qattention_tag``, the
only place that spells it); ``quantized_sites`` inverts that, so ``tqc diff --sensitivity`` and the accuracy
budget rank the same ids. Note: with ``qattention`` on, a QAttention site returned to float is expanded, which
shifts the expansion index of an attention expanded after it for another reason (no table entry): its QKV
MatMul then has another id. Only plans with such mixed attentions are affected.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.calibration import CalibrationTable
from tqc.compiler.core.target import (CALIBRATION_LENGTHS, Target, attention_heads, position_table_rows,
                                     sequence_bound)
from tqc.passes.base import PassContext
from tqc.passes.fuse.match import constant_values, heads_from_split, producer, static_dims
from tqc.passes.qdq.lower import is_ort_attention, lower

FLOP_TOKENS = 128  # FLOP shares are reported for a 128-token sequence
QATTENTION_SUFFIX = "_QAttention"
QATTENTION_TAG = "_tqc_q"

LINEAR, ATTENTION, QATTENTION = "linear", "attention", "qattention"


@dataclass(frozen=True)
class PlannedSite:
    """One site to quantize (or, in ``QdqPlan.matmuls``, one the FLOP statistics count)."""

    id: str                                  # the consumer node's name in the (lowered) float graph
    kind: str                                # linear | attention | qattention
    activations: tuple[int, ...] = ()        # input indices quantized as activations
    weight: int | None = None                # input index of the constant weight
    weight_axis: int = 1                     # per-channel axis of the weight
    flops_per_token: float = 0.0
    fixed_amax: tuple[float | None, ...] = ()  # per activation: a known range (Softmax outputs: 1.0), else None


@dataclass(frozen=True)
class PlanOptions:
    """The options of ``qdq`` that choose sites (the rest say how to quantize them: ``insert``)."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    exclude: tuple[str, ...] = ()            # fnmatch patterns on site ids
    attention: bool = True                   # trt/openvino: quantize the attention batched MatMuls
    residual: bool = False                   # trt: also quantize both inputs of residual Adds
    qattention: bool = False                 # ORT targets: fused Attention -> QAttention (already resolved)
    max_sequence: tuple[int | None, str] = (None, "")  # the longest sequence the model will see, and why


@dataclass(frozen=True)
class QdqPlan:
    """What ``insert`` does to a float graph. ``sites`` and ``qattention`` are the rankable sites."""

    target: Target
    sites: tuple[PlannedSite, ...]           # MatMul/Gemm sites to quantize, in the lowered graph's order
    qattention: tuple[PlannedSite, ...]      # fused Attentions to convert to QAttention, in graph order
    float_attentions: dict[str, str]         # Attentions expanded with their QKV projection left in float: why
    residual_adds: tuple[str, ...]           # trt ``residual``: Add nodes whose two inputs get Q/DQ
    matmuls: tuple[PlannedSite, ...]         # every MatMul site the FLOP share counts (quantized or not)
    qattention_enabled: bool                 # the QAttention step runs (and cleans up) even with no site
    total_flops: float                       # per token: every MatMul and QAttention
    qattention_int8_flops: float             # per token: QKV projections already INT8 or planned as QAttention
    notes: tuple[str, ...] = field(default=())

    @property
    def site_ids(self) -> list[str]:
        """Every rankable site, QAttention ones first (the order ``insert`` rewrites them)."""
        return [s.id for s in self.qattention] + [s.id for s in self.sites]


def is_dq(tensor: gs.Tensor) -> bool:
    node = producer(tensor)
    return node is not None and node.op == "DequantizeLinear"


def float_type(tensor: gs.Tensor) -> type:
    """The float type of a tensor a Q/DQ pair quantizes: its scales and dequantized output take it."""
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    try:
        return np.float16 if dtype is not None and np.dtype(dtype) == np.float16 else np.float32
    except TypeError:
        return np.float32


def qattention_tag(attention: str, counter: int) -> str:
    """The prefix of everything the QAttention conversion of ``attention`` adds (the node is tag + suffix)."""
    return f"{attention}{QATTENTION_TAG}{counter}"


def qattention_node_name(tag: str) -> str:
    return f"{tag}{QATTENTION_SUFFIX}"


def attention_of_qattention(name: str) -> str | None:
    """``<attention>_tqc_q<n>_QAttention`` -> ``<attention>``; None for any other name."""
    if not name.endswith(QATTENTION_SUFFIX):
        return None
    attention, tag, counter = name[: -len(QATTENTION_SUFFIX)].rpartition(QATTENTION_TAG)
    return attention if tag and attention and counter.isdigit() else None


def _quantized_activation(tensor: gs.Tensor) -> bool:
    """``tensor`` is DequantizeLinear(QuantizeLinear(...)): an activation Q/DQ pair."""
    dq = producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return False
    q = producer(dq.inputs[0])
    return q is not None and q.op == "QuantizeLinear"


def site_id(node: gs.Node) -> str | None:
    """The plan's site id of a node of a quantized graph: a QAttention answers to the Attention it was made
    from, a MatMul/Gemm fed by an activation Q/DQ pair to its own name; None for anything else."""
    if node.op == "QAttention" and node.domain == "com.microsoft":
        return attention_of_qattention(node.name) or node.name
    if node.op in ("MatMul", "Gemm") and any(_quantized_activation(t) for t in node.inputs[:2]):
        return node.name
    return None


def quantized_sites(graph: gs.Graph) -> list[tuple[str, gs.Node]]:
    """(site id, node) of every quantized site of a quantized graph, in graph order."""
    found = []
    for node in graph.nodes:
        sid = site_id(node)
        if sid is not None:
            found.append((sid, node))
    return found


def graph_sequence_bound(graph: gs.Graph, ctx: PassContext) -> tuple[int | None, str]:
    """The longest sequence the model will see: --shapes, else calibration lengths and the position table."""
    feeds = ctx.calibration_batches() + list(ctx.verification_feeds or [])
    lengths = [int(v.shape[1]) for feed in feeds for v in feed.values() if getattr(v, "ndim", 0) >= 2]
    made = {out.name: node for node in graph.nodes for out in node.outputs}
    gathers = []
    for node in graph.nodes:
        if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and len(node.inputs[0].shape) == 2:
            gathers.append((int(node.inputs[0].shape[0]), node.inputs[1].name))

    def made_by(name: str) -> tuple[str, list[str]] | None:
        node = made.get(name)
        return (node.op, [t.name for t in node.inputs]) if node is not None else None

    positions = position_table_rows(gathers, made_by, {t.name for t in graph.inputs})
    return sequence_bound([p.max for p in ctx.shapes.values()], lengths, positions)


def heads_layout(node: gs.Node) -> tuple[int, int] | None:
    """(heads, head size) of a tqc-canonical attention MatMul: its inputs come from Reshape [0, 0, H, D]
    then Transpose (Q @ K^T, probs @ V)."""
    for t in node.inputs:
        transpose = producer(t)
        reshape = producer(transpose.inputs[0]) if transpose is not None and transpose.op == "Transpose" else None
        if reshape is not None and reshape.op == "Reshape":
            values = constant_values(reshape.inputs[1])
            layout = attention_heads(values.reshape(-1).tolist()) if values is not None else None
            if layout is not None:
                return layout
    return None


_SCORE_OPS = ("Mul", "Div", "Add", "Where")  # the scale, an additive bias or mask, a masked_fill


def _scores_matmul(softmax: gs.Node) -> gs.Node | None:
    """The MatMul Q K^T whose scores reach ``softmax`` through the scale, the bias and the mask: the scores are
    the first operand of a Mul/Div/Add (as fuse writes the standard forms) and the operand of a Where that is not
    a constant (the fill)."""
    tensor = softmax.inputs[0]
    for _ in range(len(_SCORE_OPS) + 2):
        node = producer(tensor)
        if node is None or node.op == "MatMul":
            return node
        if node.op not in _SCORE_OPS:
            return None
        if node.op == "Where":
            computed = [t for t in node.inputs[1:] if isinstance(t, gs.Variable) and producer(t) is not None]
            if len(computed) != 1:
                return None
            tensor = computed[0]
        else:
            tensor = node.inputs[0]
    return None


def _heads_of(tensor: gs.Tensor) -> tuple[int, int] | None:
    """(heads, head size) of a [batch, heads, sequence, head size] tensor: from its static dimensions, H else
    from the Reshape that split the heads (``heads_from_split``: through a rotation, Transpose, Split...)."""
    dims = static_dims(tensor)
    if dims is None or len(dims) != 4 or dims[3] is None:
        return None
    heads = dims[1] if dims[1] is not None else heads_from_split(tensor, dims[3])
    return (int(heads), int(dims[3])) if heads else None


def core_layouts(graph: gs.Graph) -> dict[str, tuple[int, int]]:
    """(heads, head size) of the two MatMuls of every standard attention core, by node name::

        MatMul(Q, K^T) [-> Mul/Div scale] [-> Add bias] [-> Add mask | Where fill] -> Softmax -> MatMul(., V)

    Q and V [batch, heads, sequence, head size] with the same H and D, the Softmax read by that MatMul alone.
    These are the cores ``fuse`` writes where Q, K and V do not come straight from a head split (ModernBERT's
    rotated Q and K, ``fuse.core_attention``), and every other core of this shape; what they read (a rotation,
    a bias subgraph) stays float: only the two MatMuls' inputs are sites."""
    layouts = {}
    for softmax in graph.nodes:
        if softmax.op != "Softmax" or softmax.attrs.get("axis", -1) not in (-1, 3):
            continue
        users = list(softmax.outputs[0].outputs)
        qk = _scores_matmul(softmax)
        if qk is None or len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not softmax.outputs[0]:
            continue
        pv = users[0]
        q, v = _heads_of(qk.inputs[0]), _heads_of(pv.inputs[1])
        if q is not None and q == v:
            layouts[qk.name] = layouts[pv.name] = q
    return layouts


def _fixed_amax(node: gs.Node, index: int) -> float | None:
    """Softmax outputs lie in [0, 1]: their range needs no calibration."""
    made = producer(node.inputs[index])
    return 1.0 if made is not None and made.op == "Softmax" else None


def matmul_sites(graph: gs.Graph, op_types: Iterable[str], target: Target, attention: bool, notes: list[str],
                 max_sequence: tuple[int | None, str] = (None, "")) -> list[tuple[PlannedSite, bool]]:
    """(site, eligible) for every MatMul/Gemm of a linear layer or of attention; attention MatMuls count in the
    FLOPs but are eligible only where the target runs them in INT8 (``int8_attention_matmuls``), within its
    fused INT8 attention's limits (``int8_mha``: trt's head sizes and sequence)."""
    sites = []
    limits = target.int8_mha
    long_sequence_noted = False
    cores = core_layouts(graph)
    for node in graph.nodes:
        if node.op not in op_types or len(node.inputs) < 2:
            continue
        a, b = node.inputs[0], node.inputs[1]
        b_values = constant_values(b)
        if b_values is None and is_dq(b):
            b_values = constant_values(producer(b).inputs[0])  # an INT8 weight from an earlier qdq
        if b_values is not None and b_values.ndim == 2:
            if node.op == "Gemm":
                trans_b = int(node.attrs.get("transB", 0))
                k, n = b_values.shape[::-1] if trans_b else b_values.shape
                axis = 0 if trans_b else 1
            else:
                k, n = b_values.shape
                axis = 1
            leading = list(a.shape[:-1]) if a.shape is not None else None
            if leading and all(isinstance(d, int) for d in leading) and int(np.prod(leading)) == 1:
                # [1, K] @ [K, N]: a GEMV; INT8 gains nothing there (and TensorRT skips it).
                notes.append(f"qdq: '{node.name}' is GEMV-shaped ([1, {k}] @ [{k}, {n}]); left in float")
                continue
            sites.append((PlannedSite(node.name, LINEAR, (0,), 1, axis, 2.0 * k * n, (_fixed_amax(node, 0),)), True))
        elif isinstance(a, gs.Variable) and isinstance(b, gs.Variable):
            layout = heads_layout(node) or cores.get(node.name)
            if layout is None:
                continue
            heads, head = layout
            site = PlannedSite(node.name, ATTENTION, (0, 1), None, 0, 2.0 * FLOP_TOKENS * heads * head,
                               (_fixed_amax(node, 0), _fixed_amax(node, 1)))
            eligible = True
            if not (attention and target.int8_attention_matmuls):
                eligible = False
            elif limits is not None and head not in limits.head_sizes:
                notes.append(f"qdq: attention MatMul '{node.name}' has head size {head}; {target.runtime}'s INT8 MHA "
                             f"needs {limits.head_sizes}: left in float")
                eligible = False
            elif limits is not None and max_sequence[0] is not None and max_sequence[0] > limits.max_sequence:
                if not long_sequence_noted:
                    notes.append(f"qdq: sequences up to {max_sequence[0]} ({max_sequence[1]}) exceed "
                                 f"{target.runtime}'s INT8 MHA limit of {limits.max_sequence}: the attention batched "
                                 f"MatMuls stay in float (give --shapes with a max sequence <= {limits.max_sequence} "
                                 "to quantize them)")
                    long_sequence_noted = True
                eligible = False
            elif limits is not None and max_sequence[1] == CALIBRATION_LENGTHS and not long_sequence_noted:
                notes.append(f"qdq: INT8 attention assumes sequences up to {max_sequence[0]} ({max_sequence[1]}: no "
                             f"position table bounds them, as with relative or rotary positions); give --shapes with "
                             f"the longest sequence it will see (at most {limits.max_sequence} for "
                             f"{target.runtime}'s INT8 MHA), or qdq{{attention=false}}")
                long_sequence_noted = True
            sites.append((site, eligible))
    return sites


def qattention_ready(node: gs.Node, table: CalibrationTable) -> bool:
    """A fused Attention that can become QAttention: float32 input with per-channel ranges in the table,
    constant weight and bias (ORT's QAttention takes float32 only)."""
    entry = table.tensors.get(node.inputs[0].name)
    return (entry is not None and entry.channel_min is not None and constant_values(node.inputs[1]) is not None
            and len(node.inputs) > 2 and constant_values(node.inputs[2]) is not None
            and float_type(node.inputs[0]) is not np.float16)


def _qattention_flops(weight_shape: tuple[int, ...]) -> tuple[float, float]:
    """(total, INT8) FLOPs per token of a QAttention: the INT8 QKV projection and two float batched MatMuls."""
    k, n = weight_shape
    return 2.0 * k * n + 2 * 2.0 * FLOP_TOKENS * (n // 3), 2.0 * k * n


def plan_sites(graph: gs.Graph, target: Target, options: PlanOptions, table: CalibrationTable,
               skip: Iterable[str] = ()) -> QdqPlan:
    """The plan for ``graph`` (not modified). ``skip``: site ids to keep in float (the accuracy budget's)."""
    skip = set(skip)
    notes: list[str] = []

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in options.exclude)

    attentions = [n for n in graph.nodes if is_ort_attention(n)]
    float_attentions = {n.name: "excluded by pattern" if excluded(n.name) else "kept in float by the budget"
                        for n in attentions if excluded(n.name) or n.name in skip}
    qattention: list[PlannedSite] = []
    qattention_int8 = 0.0
    if options.qattention:
        for node in attentions:
            if node.name in float_attentions or not qattention_ready(node, table):
                continue
            node_total, node_int8 = _qattention_flops(constant_values(node.inputs[1]).shape)
            qattention.append(PlannedSite(node.name, QATTENTION, (0,), 1, 1, node_total))
            qattention_int8 += node_int8
    converted = {s.id for s in qattention}

    # The MatMuls the lowered graph will have: expand on a copy (shares the weight arrays; the graph stays).
    lowered = graph
    if target.contrib_ops and any(n.name not in converted for n in attentions):
        lowered = graph.copy()
        lowered_result = lower(lowered, target, keep=converted, float_qkv=float_attentions)
        notes.extend(lowered_result.notes)
        float_prefixes = lowered_result.float_prefixes
    else:
        float_prefixes = []
    found = matmul_sites(lowered, options.op_types, target, options.attention, notes, options.max_sequence)
    nodes = {n.name: n for n in lowered.nodes}
    chosen = []
    for site, eligible in found:
        node = nodes[site.id]
        if not eligible or any(site.id.startswith(prefix) for prefix in float_prefixes):
            continue
        if excluded(site.id):
            notes.append(f"qdq: '{site.id}' excluded by pattern")
            continue
        if site.id in skip:
            continue
        if all(is_dq(node.inputs[i]) for i in site.activations):
            continue  # already quantized: running qdq twice changes nothing
        missing = [node.inputs[i].name for i, fixed in zip(site.activations, site.fixed_amax)
                   if node.inputs[i].name not in table.tensors and fixed is None]
        if missing:
            notes.append(f"qdq: '{site.id}' input '{missing[0]}' is not in the calibration table; left in float")
            continue
        chosen.append(site)

    residual_adds = []
    if target.residual_add_qdq and options.residual:
        for node in lowered.nodes:
            if node.op != "Add" or len(node.inputs) != 2:
                continue
            a, b = node.inputs
            if isinstance(a, gs.Variable) and isinstance(b, gs.Variable) and a.name in table.tensors and \
                    b.name in table.tensors and not is_dq(a) and not is_dq(b):
                residual_adds.append(node.name)

    matmuls = tuple(site for site, _ in found)
    total = sum(s.flops_per_token for s in matmuls)
    int8 = qattention_int8
    for node in graph.nodes:  # QAttention from an earlier qdq run
        if node.op == "QAttention":
            node_total, node_int8 = _qattention_flops(constant_values(node.inputs[1]).shape)
            total += node_total
            int8 += node_int8
    total += sum(s.flops_per_token for s in qattention)
    return QdqPlan(target, tuple(chosen), tuple(qattention), float_attentions, tuple(residual_adds),
                   matmuls, options.qattention, total, int8, tuple(notes))
