"""Sibling Slices that cut one axis into adjacent parts -> one Split (GeGLU's halves: one kernel, not two).

::

    before:  a = Slice(x, [0], [1152], [-1])     b = Slice(x, [1152], [2304], [-1])     x: [..., 2304]
    after:   a, b = Split(x, [1152, 1152], axis=-1)

Only when the Slices' starts, ends and axis are known without running the graph (``match.slice_bounds``), on
one axis with step 1, their ranges are
adjacent from 0, and the last one ends at the axis' length, known statically (from shape inference, or from
the MatMul weight that made ``x``) or given as a large sentinel (INT64_MAX-style "to the end").
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import producer, slice_bounds, static_dims
from tqc.passes.rewrite import detach, produce

_TO_THE_END = 2**31 - 1


def _axis_length(x: gs.Tensor, axis: int) -> int | None:
    if axis == -1:
        node = producer(x)
        if node is not None and node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant):
            return int(node.inputs[1].shape[-1])
    dims = static_dims(x)
    return dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None


def split_sibling_slices(graph: gs.Graph) -> int:
    """Every tensor read by Slices that tile one axis (above) -> one Split. Returns the Splits made; the
    Slices are left dead for ``cleanup``."""
    groups: dict[tuple[str, int], list[tuple[int, int, gs.Node]]] = defaultdict(list)
    for node in graph.nodes:
        bounds = slice_bounds(node)
        if bounds is not None and 0 <= bounds[2] < bounds[3]:
            groups[(bounds[0].name, bounds[1])].append((bounds[2], bounds[3], node))
    made = 0
    for (_, axis), parts in groups.items():
        if len(parts) < 2:
            continue
        parts.sort(key=lambda p: p[0])
        x = parts[0][2].inputs[0]
        length = _axis_length(x, axis)
        if length is None:
            continue
        ends = [min(end, length) if end >= _TO_THE_END else end for _, end, _ in parts]
        starts = [start for start, _, _ in parts]
        if starts[0] != 0 or ends[-1] != length or any(s != e for s, e in zip(starts[1:], ends[:-1])):
            continue
        sizes = np.array([e - s for s, e in zip(starts, ends)], np.int64)
        outputs = [detach(node.outputs[0]) for _, _, node in parts]
        produce(graph, "Split", f"tqc_split{made}_{x.name}",
                [x, gs.Constant(f"tqc_split{made}_{x.name}_sizes", sizes)], outputs, attrs={"axis": axis})
        made += 1
    return made
