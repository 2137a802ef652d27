"""The NaN guard of an sdpa block over a ``-inf`` mask, kept exact when the block fuses.

torch's TorchScript exporter writes sdpa as ``Softmax(scores + mask)`` followed by ``Where(IsNaN(p), 0, p)``,
and transformers >= 5.2x builds ModernBERT's masks as ``Where(allowed, 0, -inf)``. A query row whose keys are
all masked (a padding query farther than the sliding window from every real token) is then all ``-inf``: its
Softmax is NaN and the guard makes it 0, so that row's context is 0. The fused forms have no guard. Fusing with
the mask as is would spread the NaN (0 x NaN) into every row through V; fusing with a finite fill would give
such a row the mean of V instead of 0. So the block fuses on a finite copy of the mask, and the context is
multiplied by whether its row has any key at all::

    before:  mask = Where(allowed, 0, -inf)                       (shared by the layers that use it)
             context = MergeHeads(Where(IsNaN(p), 0, p) @ V),  p = Softmax(scores + mask)

    after:   finite = Where(allowed, 0, -10000)                   (once per mask)
             any_key = Squeeze(ReduceMax(Cast(allowed), -1), 1)   (once per mask: [B, S, 1], 1.0 or 0.0;
                                                                   from the rebuilt mask where fuse rebuilt it)
             context = fused(..., mask=finite) * any_key

Exact: where a row has a key, exp(-10000 + ...) is 0 as exp(-inf) was, and the factor is 1; where it has none,
the factor is 0, as the guard's output was. ``-10000`` is also a float16, so ``fp16`` keeps it finite.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.engine import Walk
from tqc.passes.fuse.masks import MASK_FILL
from tqc.passes.fuse.match import constant_values, producer
from tqc.passes.rewrite import NodeBuilder, produce, produce_reduce, replace_output


def _branches(mask: gs.Tensor) -> tuple[gs.Node, list[np.ndarray]] | None:
    node = producer(mask)
    if node is None or node.op != "Where":
        return None
    values = [constant_values(t) for t in node.inputs[1:]]
    return None if any(v is None for v in values) else (node, values)


def mask_check(mask: gs.Tensor | None) -> str | None:
    """Why a guarded block over ``mask`` cannot fuse exactly, or None: a Where between constants, either finite
    or one branch all 0 and the other all -inf (``guard``'s form)."""
    if mask is None:
        return None
    read = _branches(mask)
    if read is None:
        return f"the mask '{mask.name}' is not a Where between constants: cannot prove it finite, and the NaN " \
               "guard this block has would be lost"
    values = read[1]
    if all(np.isfinite(v).all() for v in values) or _zero_branch(values) is not None:
        return None
    return f"the mask '{mask.name}' fills with a value that is neither finite nor a uniform -inf against 0: the " \
           "NaN guard's zeros for fully masked rows cannot be kept"


def _zero_branch(values: list[np.ndarray]) -> int | None:
    """0 or 1: the branch that is all zeros, when the other is all -inf; else None."""
    for keep, fill in ((0, 1), (1, 0)):
        if np.all(values[keep] == 0) and np.all(np.isneginf(values[fill])):
            return keep
    return None


def guard(graph: gs.Graph, walks: list[Walk]) -> tuple[list[Walk], dict[str, tuple[gs.Variable, gs.Node, int]]]:
    """For each walk whose mask fills with -inf: the walk again, its mask a finite copy and its ``out`` a new
    tensor that the fused op is to write, multiplied into the old ``out`` by its rows' any-key factor; the other
    walks as they are. Also, per finite copy (by name): (the factor, still unbuilt, the mask's Where, the index
    of its zero branch), for ``build_factors`` once the masks the fused ops read are known."""
    copies: dict[str, gs.Tensor] = {}
    factors: dict[str, tuple[gs.Variable, gs.Node, int]] = {}
    guarded: list[Walk] = []
    for index, w in enumerate(walks):
        mask = w.get("mask")
        read = _branches(mask) if mask is not None else None
        keep = _zero_branch(read[1]) if read is not None else None
        if keep is None:
            guarded.append(w)
            continue
        if mask.name not in copies:
            b = NodeBuilder(graph, f"tqc_guard{len(copies)}")
            zero, fill = b.const("zero", 0.0, np.float32), b.const("fill", MASK_FILL, np.float32)
            condition = read[0].inputs[0]
            finite = b.op("Where", [condition, zero, fill] if keep == 0 else [condition, fill, zero], np.float32)
            copies[mask.name] = finite
            factors[finite.name] = (b.variable("any_key", np.float32), read[0], keep)
        finite = copies[mask.name]
        inner = gs.Variable(f"tqc_guarded{index}_context", dtype=np.float32)
        replace_output(graph, w["out"], "Mul", f"tqc_guarded{index}_rows", [inner, factors[finite.name][0]])
        guarded.append(w.bind(mask=finite, out=inner))
    return guarded, factors


def build_factors(graph: gs.Graph, factors: dict[str, tuple[gs.Variable, gs.Node, int]],
                  canonical: dict[str, tuple], source: gs.Tensor | None) -> None:
    """Each row factor (1.0 where the query row has a key, else 0.0), from what its fused ops read: a window
    rebuilt from the attention mask (its zeros are the allowed keys), the attention mask itself for a mask
    proven key padding ([B, 1, 1]), else the exported mask's condition ([B, S, 1]) -- so no Shape-built mask is
    kept alive for the factor alone."""
    for name, (factor, where, keep) in factors.items():
        b = NodeBuilder(graph, f"{factor.name}_")
        kind, rebuilt = canonical.get(name, (None, None))
        if kind == "key_padding" and source is not None:
            has_key = _reduce_max(b, graph, b.op("Cast", [source], np.float32, attrs={"to": 1}), 1)  # [B, 1]
            produce(graph, "Unsqueeze", f"{factor.name}_rows", [has_key, b.const("axis", [2])], [factor])
            continue
        if kind == "bias":  # 0 where allowed, the fill elsewhere: a row has a key where its maximum is 0
            row_max = _reduce_max(b, graph, rebuilt, -1)
            has_key = b.op("Equal", [row_max, b.const("zero", 0.0, np.float32)], np.bool_)
        else:
            allowed = where.inputs[0] if keep == 0 else b.op("Not", [where.inputs[0]], np.bool_)
            has_key = _reduce_max(b, graph, b.op("Cast", [allowed], np.float32, attrs={"to": 1}), -1)
        as_float = b.op("Cast", [has_key], np.float32, attrs={"to": 1}) if kind == "bias" else has_key
        produce(graph, "Squeeze", f"{factor.name}_rows", [as_float, b.const("head_axis", [1])], [factor])


def _reduce_max(b: NodeBuilder, graph: gs.Graph, x: gs.Tensor, axis: int) -> gs.Variable:
    """ReduceMax of ``x`` over ``axis``, kept (``rewrite.produce_reduce``), into a fresh tensor."""
    out = b.variable("reducemax", np.float32)
    produce_reduce(graph, "ReduceMax", out.name, x, axis, out, f"{out.name}_axes")
    return out
