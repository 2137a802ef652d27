"""Rotary position embeddings (RoPE, rotate-half layout: ModernBERT, and rotary encoders in general) ->
ONNX Runtime's com.microsoft ``RotaryEmbedding`` (ORT targets; standard targets keep the standard ops).

The rule walks from the Add that ends the rotation::

    rotate-half:  Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2), axis=-1), sin))
                  x: [batch, heads, sequence, D] float; cos, sin: [1, 1, sequence, D], either operand order

    after:        RotaryEmbedding(x, position_ids=[0], cos_cache, sin_cache, interleaved=0)

The op's contract, checked on ORT 1.32 by running it: 4-D input [B, H, S, D] (3-D [B, S, H·D] needs
``num_heads``); ``position_ids`` of shape [1] is the first position of every row; caches [positions, D/2]
(cos(p·θ) for the first half of the rotate-half layout, whose second half repeats it); ``interleaved=0`` is
rotate-half. A sequence longer than the cache is an error in ORT, not a wrong answer.

The tables are proven, not assumed: they must depend on the inputs' shapes only (every path from a graph input
goes through a Shape), and evaluated on the tables' own subgraph they must be [1, 1, S, D] at batch 2, repeat
their first half, and agree with the first S rows of the cache (evaluated at the cache's length): positions
0..S-1 whatever S. Each distinct pair of tables becomes one pair of caches, shared by every layer that reads it
(ModernBERT: one pair for the global layers, one for the local ones).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.engine import Miss, NoMatch, Rule, Step, StepFunction, Walk, search
from tqc.passes.fuse.match import describe, producer, slice_bounds, token_subgraph, values_read
from tqc.passes.rewrite import replace_output

CACHE_POSITIONS = 8192   # ModernBERT's max_position_embeddings
_FLOAT = 1


def _uncast(tensor: gs.Tensor) -> gs.Tensor:
    """``tensor`` before float -> float Casts (the legacy exporter's ``.float()`` on float tensors)."""
    node = producer(tensor)
    while node is not None and node.op == "Cast" and node.attrs.get("to") == _FLOAT and \
            node.inputs[0].dtype in (np.float32, np.dtype(np.float32)):
        tensor, node = node.inputs[0], producer(node.inputs[0])
    return tensor


def _terms(step: Step, w: Walk) -> list[Walk]:
    """Add(Mul(x, cos), Mul(rotated, sin)): every operand order where the second Mul reads a Concat."""
    add = w.anchor
    fits = []
    for a, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        left, right = producer(a), producer(b)
        if left is None or right is None or left.op != "Mul" or right.op != "Mul":
            continue
        for rotated, sin in ((right.inputs[0], right.inputs[1]), (right.inputs[1], right.inputs[0])):
            if producer(rotated) is not None and producer(rotated).op == "Concat":
                for x, cos in ((left.inputs[0], left.inputs[1]), (left.inputs[1], left.inputs[0])):
                    fits.append(w.bind(x=x, cos=cos, sin=sin, rotated=rotated, nodes=[add, left, right]))
    if not fits:
        raise NoMatch(f"{describe(add)} does not add Mul(x, cos) to Mul(Concat(...), sin)")
    return fits


def _last_axis_slice(node: gs.Node | None) -> tuple[gs.Tensor, int, int] | None:
    """(data, start, end) of a step-1 Slice over the last axis of 4-D heads; else None."""
    bounds = slice_bounds(node)
    return (bounds[0], bounds[2], bounds[3]) if bounds is not None and bounds[1] in (-1, 3) else None


def _rotate_half(step: Step, w: Walk) -> list[Walk]:
    """Concat(Neg(Slice(x, h:)), Slice(x, 0:h)) on the last axis, x the cos term's x (float Casts aside)."""
    concat = producer(w["rotated"])
    if concat.attrs.get("axis") not in (-1, 3) or len(concat.inputs) != 2:
        raise NoMatch(f"{describe(concat)} is not a two-part Concat on the last axis")
    neg = producer(concat.inputs[0])
    second = _last_axis_slice(producer(neg.inputs[0])) if neg is not None and neg.op == "Neg" else None
    first = _last_axis_slice(producer(concat.inputs[1]))
    if second is None or first is None:
        raise NoMatch(f"{describe(concat)} is not Concat(Neg(Slice(x, h:)), Slice(x, :h)) on the last axis")
    source = _uncast(w.x)
    if _uncast(second[0]) is not source or _uncast(first[0]) is not source:
        raise NoMatch(f"{describe(concat)} rotates another tensor than the one multiplied by cos")
    half = first[2]
    if first[1] != 0 or second[1] != half or second[2] < 2 * half:
        raise NoMatch(f"{describe(concat)} slices [{second[1]}:{second[2]}] and [{first[1]}:{first[2]}], not the "
                      "two halves")
    nodes = [concat, neg, producer(neg.inputs[0]), producer(concat.inputs[1])]
    return [w.bind(half=half, nodes=nodes)]


def _tables(step: Step, w: Walk) -> list[Walk]:
    """cos and sin: shape-only, position-indexed, repeating their halves (module docstring); the caches."""
    graph, cache = w["graph"], w["caches"]
    key = (w["cos"].name, w["sin"].name)
    if key not in cache:
        cache[key] = _evaluate(graph, w["cos"], w["sin"], w["positions"])
    found = cache[key]
    if isinstance(found, str):
        raise NoMatch(found)
    if found[0].shape[1] != w["half"]:
        raise NoMatch(f"the tables are {2 * found[0].shape[1]} wide, the rotation {2 * w['half']}")
    x, before = w.x, producer(_uncast(w.x))
    four_d = len(x.shape) == 4 if x.shape is not None else \
        before is not None and before.op == "Transpose" and len(before.attrs.get("perm", ())) == 4
    if x.dtype not in (np.float32, np.dtype(np.float32)) or not four_d:
        raise NoMatch(f"'{x.name}' is not a 4-D float32 tensor [batch, heads, sequence, head size]")
    return [w.bind(cos_cache=found[0], sin_cache=found[1])]


def _evaluate(graph: gs.Graph, cos: gs.Tensor, sin: gs.Tensor, positions: int) -> tuple[np.ndarray, ...] | str:
    inputs = {t.name for t in graph.inputs}
    if values_read(cos, inputs, limit=500) != set() or values_read(sin, inputs, limit=500) != set():
        return f"the tables '{cos.name}', '{sin.name}' depend on input values, not only on the sequence length"
    run = token_subgraph(graph, [cos, sin])
    if run is None:
        return "the tables are computed from inputs that are not [batch, sequence]: cannot evaluate them"
    full, short = run((1, positions)), run((2, 7))
    tables = []
    for long_table, short_table in zip(full, short):
        if short_table.shape[:3] != (1, 1, 7) or long_table.shape[:3] != (1, 1, positions):
            return f"the tables are {list(short_table.shape)} at batch 2, sequence 7, not [1, 1, 7, D]"
        table = long_table[0, 0]
        half = table.shape[-1] // 2
        if table.shape[-1] % 2 or not np.array_equal(table[:, :half], table[:, half:]):
            return "the tables do not repeat their first half (not the rotate-half layout)"
        if not np.array_equal(short_table[0, 0], table[:7]):
            return "the tables at sequence 7 are not the first 7 rows of the longer ones (not positions 0..S-1)"
        tables.append(np.ascontiguousarray(table[:, :half], np.float32))
    return tables[0], tables[1]


STEPS: dict[str, StepFunction] = {"terms": _terms, "rotate_half": _rotate_half, "tables": _tables}

RULES: tuple[Rule, ...] = (
    Rule("rotate-half", "RoPE, rotate-half layout (transformers' apply_rotary_pos_emb): x·cos + rotate_half(x)·sin",
         ("Add",), (Step("terms", ("Add",), commutative=True), Step("rotate_half", ("Concat",)),
                    Step("tables", ("Cos", "Sin")))),
)


def _rotary_mul(t: gs.Tensor) -> bool:
    mul = producer(t)
    return mul is not None and mul.op == "Mul" and any(
        producer(i) is not None and producer(i).op == "Concat" and
        any(producer(c) is not None and producer(c).op == "Neg" for c in producer(i).inputs) for i in mul.inputs)


def is_rotation(node: gs.Node | None) -> bool:
    """A RotaryEmbedding, or an Add with a Mul operand that reads a Concat of a Neg (rotary-shaped)."""
    return node is not None and (node.op == "RotaryEmbedding" or (
        node.op == "Add" and len(node.inputs) == 2 and any(_rotary_mul(t) for t in node.inputs)))


def rotary_candidates(graph: gs.Graph) -> list[gs.Node]:
    """The rotary-shaped Adds of ``graph``."""
    return [n for n in graph.nodes if n.op == "Add" and is_rotation(n)]


def fuse_rotary(graph: gs.Graph, positions: int = CACHE_POSITIONS) -> tuple[int, list[Miss]]:
    """Every rotary rotation -> RotaryEmbedding (above). Returns (count, the rotary-shaped Adds not fused)."""
    caches: dict = {}
    start = (("graph", graph), ("caches", caches), ("positions", positions))
    found, misses = search(rotary_candidates(graph), RULES, STEPS, start=lambda node: Walk(node, bound=start))
    constants: dict[int, tuple[gs.Constant, gs.Constant]] = {}
    start_position = gs.Constant("tqc_rotary_position_ids", np.zeros(1, np.int64))
    for index, (_, w) in enumerate(found):
        key = id(w["cos_cache"])
        if key not in constants:
            number = len(constants)
            constants[key] = (gs.Constant(f"tqc_rotary_cos_cache{number}", w["cos_cache"]),
                              gs.Constant(f"tqc_rotary_sin_cache{number}", w["sin_cache"]))
        cos_cache, sin_cache = constants[key]
        replace_output(graph, w.anchor.outputs[0], "RotaryEmbedding", f"tqc_rotary{index}",
                       [w.x, start_position, cos_cache, sin_cache], attrs={"interleaved": 0},
                       domain="com.microsoft")
    return len(found), misses

