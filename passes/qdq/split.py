"""``qdq{split}``: the few input channels that own a linear layer's range leave its INT8 MatMul for a float one
beside it.

Encoders put massive activations on a few channels at the first token ([CLS]; Sun et al. 2024, "Massive
Activations", Bondarenko et al. 2023). In the real all-MiniLM-L6-v2 one GELU channel of the FFN output layers 0-3
reaches 24 / 20 / 18 / 14 at [CLS] (below 0.2 at every other token) while no other channel passes 6.3, and channel
99 of the residual stream reaches 28 at [CLS] in the FFN input layers 0-2. One INT8 range (and SmoothQuant's
weight scales, which take the rest of such a channel) spends the codes on them. Where the top k channels'
calibrated ranges (k <= ``MAX_CHANNELS``) are each at least ``RATIO`` (2) times every other channel's, the layer
becomes::

    x ─► [Mul(1/s)] ─► Q/DQ (range of the other channels) ─► MatMul(W, those rows 0, INT8) ─► Add ─► (bias ...)
    └──► Gather(channels, axis -1) ─► MatMul(W's rows, float) (one channel: Mul by its row) ────┘

exact in float: the INT8 MatMul's rows of those channels are zero, so whatever its input holds there (clipped by
the range that leaves them out) adds nothing, and the float MatMul adds them back exactly. On ONNX Runtime the
float part joins the Sum that already adds the bias and the residual (no op of its own). The float MatMul's
weight is 3-D ([1, k, N]): qdq's planner takes 2-D weights only, so it stays float. A weight several MatMuls
share (ALBERT) is not split.

``choose_splits`` reads the calibration table (per-channel ranges over the real tokens, where the table has them:
padding positions carry no meaning, and in MiniLM a padded row hid layer 2's FFN input channels; a table alone is
enough), ``split_table`` gives qdq the ranges without those channels (the rest over every position, as the other
range readers take them), ``split_producer.find_producer`` says where the float part can recompute the channels
from the layer before instead of gathering them (OpenVINO), ``zero_split_rows`` zeroes the rows in the graph
``insert`` will quantize and ``add_float_parts`` writes the float MatMuls after it (bias correction and the shift
have then seen the INT8 path alone, which is what they correct).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from tqc.compiler.analysis.calibration import CalibrationTable
from tqc.compiler.core.errors import TqcError
from tqc.passes.fuse.match import constant_values
from tqc.passes.qdq.plan import float_type
from tqc.passes.qdq.split_producer import Producer, find_producer, recompute
from tqc.passes.rewrite import NodeBuilder, detach, produce, rebase

MAX_CHANNELS = 4
RATIO = 2.0  # a top channel's range over every remaining one's: MiniLM's [CLS] channels stand 2.5-4x above


@dataclass(frozen=True)
class Split:
    """One linear layer's split: its input tensor, the channels that leave the INT8 MatMul, their weight rows."""

    node: str
    tensor: str
    channels: tuple[int, ...]
    rows: np.ndarray  # [k, N], float
    producer: Producer | None = None  # where the float part recomputes the channels (split_producer.py)


def outlier_channels(amax: np.ndarray, ratio: float, limit: int = MAX_CHANNELS) -> tuple[int, ...]:
    """The fewest top channels (at most ``limit``) whose smallest range is at least ``ratio`` times the largest
    range left; () where no such cut exists."""
    order = np.argsort(-amax, kind="stable")
    for k in range(1, min(limit, amax.size - 1) + 1):
        if amax[order[k]] > 0 and amax[order[k - 1]] >= ratio * amax[order[k]]:
            return tuple(sorted(int(c) for c in order[:k]))
    return ()


def real_channel_range(entry) -> tuple[list[float] | None, list[float] | None]:
    """A table entry's per-channel (min, max) over the real tokens (padding left out), or over every position
    in tables without them (before the real-token ranges, or calibrated without an attention mask)."""
    if entry is None:
        return None, None
    if entry.real_channel_min is not None:
        return entry.real_channel_min, entry.real_channel_max
    return entry.channel_min, entry.channel_max


def choose_splits(graph: gs.Graph, table: CalibrationTable, ratio: float, residual: bool = False,
                  recomputed: str = "") -> dict[str, Split]:
    """node name -> ``Split`` for every MatMul with a constant [K, N] weight of its own whose input's per-channel
    ranges in ``table`` have outlier channels (``outlier_channels``), where every reader of that input that qdq
    may quantize (MatMul, Gemm, a fused Attention; with trt's ``residual``, an Add) splits the same channels: the
    input's range in the table then leaves them out for all of them. ``recomputed``: "" gathers every float part;
    "where" recomputes it from the producing layer where there is one (``split_producer``); "only" also splits
    those layers alone."""
    users: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            users[t.name] = users.get(t.name, 0) + 1
    splits = {}
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) < 2 or not isinstance(node.inputs[0], gs.Variable):
            continue
        weight, entry = constant_values(node.inputs[1]), table.tensors.get(node.inputs[0].name)
        low, high = real_channel_range(entry)
        if weight is None or weight.ndim != 2 or users.get(node.inputs[1].name, 0) > 1 or low is None or \
                len(low) != weight.shape[0]:
            continue
        amax = np.maximum(np.abs(np.asarray(low)), np.abs(np.asarray(high)))
        channels = outlier_channels(amax, ratio)
        if channels and not any(t in graph.outputs for t in node.outputs):
            splits[node.name] = Split(node.name, node.inputs[0].name, channels,
                                      np.array(weight[list(channels)], np.float32))
    quantizing = ("MatMul", "Gemm", "Attention", "QAttention") + (("Add",) if residual else ())
    readers: dict[str, set[tuple[int, ...] | None]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if node.op in quantizing and isinstance(t, gs.Variable):
                split = splits.get(node.name)
                readers.setdefault(t.name, set()).add(split.channels if split is not None else None)
    chosen = {name: s for name, s in splits.items() if readers.get(s.tensor) == {s.channels}}
    if recomputed:
        chosen = {name: replace(s, producer=find_producer(graph, s.tensor, s.channels)) for name, s in chosen.items()}
        if recomputed == "only":
            chosen = {name: s for name, s in chosen.items() if s.producer is not None}
    return chosen


def split_table(table: CalibrationTable, splits: dict[str, Split]) -> CalibrationTable:
    """The table with the split channels' ranges 0 in the inputs of the split layers ('max' range of the rest).
    Every quantizing reader of such a tensor splits the same channels (``choose_splits``)."""
    tensors = dict(table.tensors)
    for split in splits.values():
        entry, channels = tensors[split.tensor], list(split.channels)
        low, high = np.array(entry.channel_min, np.float64), np.array(entry.channel_max, np.float64)
        low[channels] = high[channels] = 0.0
        lo, hi = float(low.min()), float(high.max())
        real = {}
        if entry.real_channel_min is not None:
            real_low, real_high = np.array(entry.real_channel_min), np.array(entry.real_channel_max)
            real_low[channels] = real_high[channels] = 0.0
            real = {"real_channel_min": [float(v) for v in real_low], "real_channel_max": [float(v) for v in real_high]}
        tensors[split.tensor] = replace(entry, min=lo, max=hi, amax={**entry.amax, "max": max(abs(lo), abs(hi))},
                                lo={**entry.lo, "max": lo}, hi={**entry.hi, "max": hi},
                                channel_min=[float(v) for v in low], channel_max=[float(v) for v in high], **real)
    return replace(table, tensors=tensors)


def zero_split_columns(samples: dict[str, np.ndarray], splits: dict[str, Split]) -> None:
    """The split channels of the layer-input samples set to 0 (in place: new arrays): the refinements (GPTQ's
    error feedback above all) must see them as the dead channels they are in the INT8 path."""
    for split in splits.values():
        if split.tensor in samples:
            sample = np.array(samples[split.tensor])
            sample[:, list(split.channels)] = 0.0
            samples[split.tensor] = sample


def zero_split_rows(graph: gs.Graph, splits: dict[str, Split]) -> list[str]:
    """Zero the split rows of each split MatMul's weight (a new constant); returns the nodes changed."""
    done = []
    for node in graph.nodes:
        split = splits.get(node.name)
        weight = constant_values(node.inputs[1]) if split is not None else None
        if weight is None or weight.ndim != 2:
            continue
        zeroed = np.array(weight)
        zeroed[list(split.channels)] = 0
        node.inputs[1] = gs.Constant(f"{node.inputs[1].name}_tqc_split", zeroed)
        done.append(node.name)
    return done


def add_float_parts(graph: gs.Graph, splits: dict[str, Split], nodes: list[str]) -> None:
    """After ``insert``: the float MatMul of each split layer in ``nodes``, added to its output (into the Sum
    that reads it, where one does)."""
    tensors = graph.tensors()
    by_name = {n.name: n for n in graph.nodes}
    for name in nodes:
        node, split = by_name.get(name), splits[name]
        if node is None or split.tensor not in tensors:  # its rows are zero: without the part it would be wrong
            raise TqcError(f"qdq: the split layer '{name}' or its input '{split.tensor}' is gone after quantization; "
                           "give qdq{split=false}")
        x, y = tensors[split.tensor], node.outputs[0]
        ftype = float_type(x)
        build = NodeBuilder(graph, f"{name}_tqc_split")
        gathered = recompute(graph, split.producer, build, ftype) if split.producer is not None else None
        if gathered is None:
            gathered = build.op("Gather", [x, build.const("channels", list(split.channels))], ftype,
                                attrs={"axis": -1})
        rows = build.const("rows", split.rows[0] if len(split.channels) == 1 else split.rows, ftype)
        # One channel: an outer product by broadcast ([.., 1] * [N]), which ORT CPU runs faster than a K=1 MatMul
        part = build.op("Mul" if len(split.channels) == 1 else "MatMul", [gathered, rows], ftype)
        readers = list(y.outputs)
        if len(readers) == 1 and readers[0].op == "Sum" and y not in graph.outputs:
            readers[0].inputs = [*readers[0].inputs, part]
            rebase(y, "split_partial")  # the float part is missing from it; the Sum's output is whole
            continue
        if len(readers) == 1 and readers[0].op == "Add" and y not in graph.outputs and any(
                t is not y and constant_values(t) is not None for t in readers[0].inputs) and \
                readers[0].outputs[0] not in graph.outputs:
            y = readers[0].outputs[0]  # after the bias Add: the runtime keeps fusing it into the MatMul
        # y keeps its name, readers and place among the graph outputs, now written by the Add of the two parts
        partial = gs.Variable(f"{y.name}_tqc_split_partial", dtype=y.dtype, shape=y.shape)
        produce(graph, "Add", f"{name}_tqc_split_sum", [partial, part], [detach(y, writes=partial)])
