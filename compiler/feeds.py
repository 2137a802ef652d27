"""Inputs for verification and diffs, drawn from a model's signature when the user gives none.

Token-id inputs get random ids below the vocabulary size (read from the embedding Gather), attention masks
get right padding on every other row (so masking paths are exercised), token-type ids are zeros then ones,
position ids count up. Dynamic dimensions resolve to batch 2 and sequence 16 unless asked otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints or dim-param strings / None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def vocab_size(model: onnx.ModelProto, input_name: str) -> int | None:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == input_name:
            dims = shapes.get(node.input[0])
            if dims:
                return int(dims[0])
    return None


def _resolve(dims: tuple, batch: int, seq: int) -> tuple[int, ...]:
    out = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        else:
            text = str(dim or "").lower()
            if "batch" in text or (axis == 0 and "seq" not in text):
                out.append(batch)
            else:
                out.append(seq)
    return tuple(out)


def synthesize_feeds(model: onnx.ModelProto, count: int = 2, batch: int = 2, seq: int = 16,
                     seed: int = 0) -> list[Feed]:
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    feeds = []
    for _ in range(count):
        feed: Feed = {}
        for spec in specs:
            shape = _resolve(spec.shape, batch, seq)
            name = spec.name.lower()
            if np.issubdtype(spec.dtype, np.integer):
                if "mask" in name:
                    value = np.ones(shape, dtype=spec.dtype)
                    if len(shape) == 2 and shape[1] > 2:
                        value[1::2, shape[1] * 3 // 4:] = 0
                elif "type" in name or "segment" in name:
                    value = np.zeros(shape, dtype=spec.dtype)
                    if len(shape) == 2:
                        value[:, shape[1] // 2:] = 1
                    limit = vocab_size(model, spec.name)
                    if limit == 1:
                        value[:] = 0
                elif "position" in name:
                    value = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
                else:
                    high = min(vocab_size(model, spec.name) or 1000, 30000)
                    value = rng.integers(low=min(5, high - 1), high=high, size=shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                value = np.ones(shape, dtype=np.bool_)
            else:
                value = rng.standard_normal(shape).astype(spec.dtype)
            feed[spec.name] = value
        feeds.append(feed)
    return feeds
