"""``tqc inspect``: what a model is made of (opsets, signature, op histogram by domain, parameters, Q/DQ)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _port(value: onnx.ValueInfoProto) -> dict:
    tt = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    dtype = helper.tensor_dtype_to_string(tt.elem_type).replace("TensorProto.", "").lower() if tt.elem_type else "?"
    return {"name": value.name, "dtype": dtype, "shape": dims}


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _numel(dims) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def summarize(model: onnx.ModelProto) -> dict:
    ops = Counter()
    for node in _all_nodes(model.graph):
        ops[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
    params = sum(_numel(t.dims) for t in model.graph.initializer)
    param_bytes = 0
    dtype_counts = Counter()
    for t in model.graph.initializer:
        n = _numel(t.dims)
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        param_bytes += n * itemsize
        dtype_counts[helper.tensor_dtype_to_string(t.data_type).replace("TensorProto.", "").lower()] += n
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    params += _numel(attr.t.dims)
    initializers = {t.name for t in model.graph.initializer}
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opsets": {(imp.domain or "ai.onnx"): imp.version for imp in model.opset_import},
        "inputs": [_port(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_port(v) for v in model.graph.output],
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": params,
        "parameter_bytes": param_bytes,
        "parameter_dtypes": dict(dtype_counts),
        "qdq": {
            "QuantizeLinear": ops.get("ai.onnx::QuantizeLinear", 0),
            "DequantizeLinear": ops.get("ai.onnx::DequantizeLinear", 0),
        },
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def format_summary(info: dict, name: str) -> str:
    lines = [f"{name}", f"  ir {info['ir_version']}, producer {info['producer'] or '?'}, opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items())]
    for kind in ("inputs", "outputs"):
        lines.append(f"  {kind}:")
        for port in info[kind]:
            lines.append(f"    {port['name']:<28} {port['dtype']:<8} [{', '.join(map(str, port['shape']))}]")
    lines.append(f"  parameters: {info['parameters']:,} ({info['parameter_bytes'] / 2**20:.1f} MiB: "
                 + ", ".join(f"{k} {v:,}" for k, v in info["parameter_dtypes"].items()) + ")")
    lines.append(f"  Q/DQ: {info['qdq']['QuantizeLinear']} QuantizeLinear, "
                 f"{info['qdq']['DequantizeLinear']} DequantizeLinear")
    lines.append(f"  nodes: {info['nodes']}")
    for op, count in info["ops"].items():
        lines.append(f"    {count:>5}  {op}")
    return "\n".join(lines)
