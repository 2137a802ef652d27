"""An exported attention mask, read by running it, and rebuilt from the attention mask input without Shape ops
(ModernBERT's global and sliding-window masks; ORT targets, cores fused by ``core_attention``)::

    before  attention_mask ─► Shape/Gather/Concat/Expand/Range/... ─► [B, 1, S, S] additive mask ─► MHA bias
    after   global layers:  int32(attention_mask)  [B, S]  ─► MHA key_padding_mask
            window layers:  Where(|p_i - p_j| <= h  and  attention_mask_j,  0,  fill)  [B, 1, S, S] ─► MHA bias
                            p = CumSum(ones like attention_mask, axis 1)      (no Shape: nothing on the CPU)

Why: ONNX Runtime puts the shape arithmetic of the exported masks (Shape, Gather, Concat, Equal, Where on
int64) on the CPU, and a session with any CPU node cannot capture a CUDA graph ("all compute graph nodes have
not been partitioned", ModernBERT-base on an H100), so every kernel launches from the host at batch 1.

Proof, not assumption: the exported mask's subgraph must read the attention mask input's values and nothing
else's (other inputs only through Shape); evaluated on probes (every length up to 600 covered by a window of
half-width h, rows padded on the right, on the left, and at random), it must be ``fill`` exactly where a key is
padded or further than h from the query, and 0 elsewhere, one fill for the whole tensor. The rebuilt form is
evaluated on the same probes and must agree position by position, fully masked rows included (the fill kept:
a row masked whole stays uniform, as in the export). Anything else keeps the exported mask.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.masks import MaskCache
from tqc.passes.fuse.match import values_read
from tqc.passes.rewrite import produce

PROBE_LENGTH = 600  # a window wider than this on each side is read as global


def _probes(rng: np.random.Generator) -> list[np.ndarray]:
    """Attention masks [2, S]: full rows, right and left padding, random holes; short and long."""
    probes = []
    for length in (1, 7, 40, 137, 300, PROBE_LENGTH):
        full = np.ones((2, length), np.int64)
        right = full.copy()
        right[1, max(1, length * 2 // 3):] = 0
        left = full.copy()
        left[0, :length // 3] = 0
        holes = (rng.random((2, length)) > 0.3).astype(np.int64)
        holes[:, 0] = 1
        probes += [full, right, left, holes]
    return probes


def _run(graph: gs.Graph, outputs: list[gs.Tensor], probes: list[np.ndarray], mask_name: str) -> list[list]:
    from tqc.compiler.runtime.graph_session import GraphSession

    sub = graph.copy()
    tensors = sub.tensors()
    sub.outputs = [tensors[t.name] for t in outputs]
    sub.cleanup(remove_unused_graph_inputs=True)
    if any(t.shape is None or len(t.shape) != 2 for t in sub.inputs):
        return []
    session = GraphSession(sub)
    results = []
    for probe in probes:
        feed = {t.name: (probe if t.name == mask_name else np.ones(probe.shape, np.int64)).astype(np.dtype(t.dtype))
                for t in sub.inputs}
        results.append(session.run([t.name for t in outputs], feed))
    return results


def read_window(graph: gs.Graph, mask: gs.Tensor, source: gs.Tensor) -> tuple[int | None, float] | str:
    """(h, fill) of an exported additive mask (h None: global, key padding only), or why it is not one."""
    if values_read(mask, {t.name for t in graph.inputs}) != {source.name}:
        return f"the mask '{mask.name}' reads other inputs than '{source.name}'"
    probes = _probes(np.random.default_rng(0))
    values = _run(graph, [mask], probes, source.name)
    if not values:
        return f"the mask '{mask.name}' is computed from inputs that are not [batch, sequence]"
    fills = {float(v) for (out,) in values for v in np.unique(out) if v != 0}
    if len(fills) > 1 or any(f > -1e4 for f in fills):
        return f"the mask '{mask.name}' holds other values than 0 and one fill of at most -10000"
    fill = fills.pop() if fills else -1e4
    widest = np.array(values[-4][0])  # the unpadded probe of the longest length
    if widest.ndim != 4 or widest.shape[1] != 1:
        return f"the mask '{mask.name}' is not [batch, 1, S, S] ({list(widest.shape)})"
    allowed = np.broadcast_to(widest[0, 0] == 0, (PROBE_LENGTH, PROBE_LENGTH))
    distance = np.abs(np.arange(PROBE_LENGTH)[:, None] - np.arange(PROBE_LENGTH)[None, :])
    half = int(distance[allowed].max()) if allowed.any() else -1
    window = None if half >= PROBE_LENGTH - 1 else half
    for probe, (out,) in zip(probes, values):
        if not np.array_equal(np.broadcast_to(out == 0, (2, 1, probe.shape[1], probe.shape[1])),
                              expected(probe, window)):
            return f"the mask '{mask.name}' is not key padding{'' if window is None else f' and a window of {window}'}" \
                   f" at length {probe.shape[1]}"
    return window, fill


def expected(probe: np.ndarray, window: int | None) -> np.ndarray:
    """Where a query may attend, [B, 1, S, S]: keys not padded, within ``window`` of the query."""
    keys = np.broadcast_to(probe[:, None, None, :] > 0, (probe.shape[0], 1, probe.shape[1], probe.shape[1]))
    if window is None:
        return keys
    distance = np.abs(np.arange(probe.shape[1])[:, None] - np.arange(probe.shape[1])[None, :])
    return keys & (distance <= window)[None, None]


def build_window_bias(graph: gs.Graph, masks: MaskCache, window: int, fill: float) -> gs.Tensor:
    """The window form (module docstring), built once per (window, fill) for the whole graph."""
    prefix = f"tqc_window{window}"
    name = f"{prefix}_bias"
    existing = graph.tensors().get(name)
    if existing is not None:
        return existing
    made: dict[str, gs.Tensor] = {"index": masks.int32_index()}
    constants = {"zero": np.int32(0), "one": np.int32(1), "axis": np.int64(1), "row_axes": np.array([1, 3], np.int64),
                 "column_axes": np.array([1, 2], np.int64), "half": np.int32(window), "open": np.float32(0.0),
                 "fill": np.float32(fill)}
    made.update({tag: gs.Constant(f"{prefix}_{tag}", np.array(value)) for tag, value in constants.items()})
    steps = (("Mul", ("index", "zero"), "zeros", np.int32, None),
             ("Add", ("zeros", "one"), "ones", np.int32, None),
             ("CumSum", ("ones", "axis"), "positions", np.int32, None),  # 1..S on every row: p_i - p_j = i - j
             ("Unsqueeze", ("positions", "row_axes"), "rows", np.int32, None),
             ("Unsqueeze", ("positions", "column_axes"), "columns", np.int32, None),
             ("Sub", ("rows", "columns"), "offset", np.int32, None),
             ("Abs", ("offset",), "distance", np.int32, None),
             ("LessOrEqual", ("distance", "half"), "near", np.bool_, None),
             ("Cast", ("index",), "keys", np.bool_, {"to": 9}),
             ("Unsqueeze", ("keys", "column_axes"), "keys4", np.bool_, None),
             ("And", ("near", "keys4"), "allowed", np.bool_, None),
             ("Where", ("allowed", "open", "fill"), "bias", np.float32, None))
    for op, inputs, tag, dtype, attrs in steps:
        made[tag] = gs.Variable(f"{prefix}_{tag}", dtype=dtype)
        produce(graph, op, f"{prefix}_{tag}_node", [made[i] for i in inputs], [made[tag]], attrs=attrs)
    return made["bias"]


def canonical_masks(graph: gs.Graph, masks: MaskCache, exported: list[gs.Tensor],
                    mask_format: str = "raw") -> dict[str, tuple]:
    """For each exported mask tensor (by name) that is proven a key padding or window mask: ("key_padding", the
    int32 mask, or its token counts with ``mask_format`` 'end' as fuse{mask=end} gives every attention) or
    ("bias", the window form). Masks not proven are left out (their cores keep them)."""
    source = masks.source()
    if source is None:
        return {}
    found: dict[str, tuple] = {}
    for mask in {t.name: t for t in exported}.values():
        read = read_window(graph, mask, source)
        if isinstance(read, str):
            continue
        window, fill = read
        if window is None:
            found[mask.name] = ("key_padding", masks.end_positions() if mask_format == "end" else masks.int32_index())
            continue
        bias = build_window_bias(graph, masks, window, fill)
        probes = _probes(np.random.default_rng(1))
        got = _run(graph, [bias], probes, source.name)
        if got and all(np.array_equal(out == 0, expected(p, window)) and
                       np.all((out == 0) | (out == np.float32(fill))) for p, (out,) in zip(probes, got)):
            found[mask.name] = ("bias", bias)
    return found
