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
from tqc.passes.fuse.match import token_subgraph, values_read
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


def _window_of(values: list[np.ndarray], probes: list[np.ndarray]) -> tuple[int | None, float] | None:
    """(h, fill) of an exported additive mask from its values on ``probes`` (h None: global, key padding only),
    or None when it is not one: other values than 0 and one fill of at most -10000, not [B, 1, S, S], or not
    exactly key padding and a window at every probe."""
    fills = {float(v) for out in values for v in np.unique(out) if v != 0}
    if len(fills) > 1 or any(f > -1e4 for f in fills):
        return None
    fill = fills.pop() if fills else -1e4
    widest = np.array(values[-4])  # the unpadded probe of the longest length
    if widest.ndim != 4 or widest.shape[1] != 1:
        return None
    allowed = np.broadcast_to(widest[0, 0] == 0, (PROBE_LENGTH, PROBE_LENGTH))
    distance = np.abs(np.arange(PROBE_LENGTH)[:, None] - np.arange(PROBE_LENGTH)[None, :])
    half = int(distance[allowed].max()) if allowed.any() else -1
    window = None if half >= PROBE_LENGTH - 1 else half
    for probe, out in zip(probes, values):
        length = probe.shape[1]
        if not np.array_equal(np.broadcast_to(out == 0, (2, 1, length, length)), expected(probe, window)):
            return None
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
    ("bias", the window form). Masks not proven are left out (their cores keep them). Every candidate mask runs
    in one session, every rebuilt window in another."""
    source = masks.source()
    if source is None:
        return {}
    inputs = {t.name for t in graph.inputs}
    candidates = [m for m in {t.name: t for t in exported}.values() if values_read(m, inputs) == {source.name}]
    run = token_subgraph(graph, candidates) if candidates else None
    if run is None:
        return {}
    probes = _probes(np.random.default_rng(0))
    values = [run(probe.shape, {source.name: probe}) for probe in probes]
    found: dict[str, tuple] = {}
    windows: dict[str, tuple[int, float, gs.Tensor]] = {}
    for index, mask in enumerate(candidates):
        read = _window_of([outs[index] for outs in values], probes)
        if read is None:
            continue
        window, fill = read
        if window is None:
            found[mask.name] = ("key_padding", masks.end_positions() if mask_format == "end" else masks.int32_index())
        else:
            windows[mask.name] = (window, fill, build_window_bias(graph, masks, window, fill))
    if windows:  # the rebuilt forms, checked on other probes
        biases = list(windows.values())
        check = token_subgraph(graph, [bias for _, _, bias in biases])
        probes = _probes(np.random.default_rng(1))
        got = [check(probe.shape, {source.name: probe}) for probe in probes] if check is not None else []
        for index, (name, (window, fill, bias)) in enumerate(windows.items()):
            rebuilt = [outs[index] for outs in got]
            if rebuilt and all(np.array_equal(out == 0, expected(probe, window)) and
                               np.all((out == 0) | (out == np.float32(fill))) for probe, out in zip(probes, rebuilt)):
                found[name] = ("bias", bias)
    return found
