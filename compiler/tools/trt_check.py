"""``tqc check --target trt``: will TensorRT 10's ONNX parser take this model, and how will it run?

Static, without TensorRT: every op and its inputs against the parser's support list (kept as data in
``data/trt10_onnx_ops.json`` with its source version), no contrib-domain ops, the Q/DQ rules of explicit
quantization (INT8, zero-point 0, per-channel scales only on constants and on a valid axis, every Q feeding
DQs), the dynamic dimensions that optimization profiles must cover, and which attention blocks meet the
conditions of TensorRT's INT8 multi-head attention (head size 16/32/64, sequence <= 512).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import onnx
from onnx import numpy_helper

from tqc.compiler.core.target import TRT_INT8_MHA, attention_heads, position_table_rows, sequence_bound


@lru_cache(maxsize=1)
def support_table() -> dict:
    return json.loads(resources.files("tqc.compiler.core").joinpath("data/trt10_onnx_ops.json").read_text())


@dataclass
class Finding:
    severity: str  # "error" (will not parse/build), "warning", "info"
    code: str
    message: str
    node: str = ""

    def as_dict(self) -> dict:
        return {"severity": self.severity, "code": self.code, "message": self.message, "node": self.node}


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    dynamic_inputs: dict[str, list] = field(default_factory=dict)
    attention: list[dict] = field(default_factory=list)
    qdq_pairs: int = 0

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def add(self, severity: str, code: str, message: str, node: str = "") -> None:
        self.findings.append(Finding(severity, code, message, node))

    def as_dict(self) -> dict:
        table = support_table()
        return {"ok": self.ok, "source": table["source"], "findings": [f.as_dict() for f in self.findings],
                "dynamic_inputs": self.dynamic_inputs, "attention": self.attention, "qdq_pairs": self.qdq_pairs}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t
    return values


def model_sequence_bound(model: onnx.ModelProto, profiles: dict | None = None) -> tuple[int | None, str]:
    """The longest sequence the model will see: the profiles' max (--shapes), else its position table."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    made = {out: node for node in model.graph.node for out in node.output}
    gathers = [(int(dims[n.input[0]][0]), n.input[1]) for n in model.graph.node
               if n.op_type == "Gather" and len(dims.get(n.input[0], [])) == 2]

    def producer(name):
        node = made.get(name)
        return (node.op_type, list(node.input)) if node is not None else None

    positions = position_table_rows(gathers, producer, {i.name for i in model.graph.input})
    return sequence_bound([p.max for p in (profiles or {}).values()], (), positions)


def check_trt(model: onnx.ModelProto, profiles: dict | None = None) -> CheckReport:
    table = support_table()
    supported, unsupported = set(table["supported"]), set(table["unsupported"])
    restrictions = table["restrictions"]
    report = CheckReport()
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if not table["opset_min"] <= opset <= table["opset_max"]:
        report.add("error", "opset", f"opset {opset} is outside TensorRT {table['tensorrt_version']}'s range "
                                     f"{table['opset_min']}..{table['opset_max']}")
    constants = _constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        label = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            hint = " (an ONNX Runtime contrib op: compile with --target trt)" if node.domain == "com.microsoft" else ""
            report.add("error", "domain", f"{node.domain}::{node.op_type} is not an ONNX-domain op; TensorRT's "
                                          f"parser has no importer for it{hint}", label)
            continue
        if node.op_type in unsupported:
            report.add("error", "unsupported-op", f"{node.op_type} is not supported by TensorRT's ONNX parser", label)
            continue
        if node.op_type not in supported:
            report.add("error", "unknown-op", f"{node.op_type} is not in TensorRT's ONNX operator list", label)
            continue
        rule = restrictions.get(node.op_type, {})
        for index in rule.get("constant_inputs", []):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                report.add("error", "constant-input", f"{node.op_type}: {rule['note']}", label)
        if node.op_type == "LayerNormalization" and sum(1 for o in node.output if o) > 1:
            report.add("error", "layernorm-outputs", "LayerNormalization: " + rule["note"], label)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, label, constants, consumers, report)
    report.qdq_pairs = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            report.dynamic_inputs[value.name] = dims
    if report.dynamic_inputs:
        names = ", ".join(f"{k}{v}" for k, v in report.dynamic_inputs.items())
        report.add("info", "profiles", f"dynamic inputs need optimization profiles (--shapes): {names}")
    report.attention = _attention_blocks(model, constants, report, model_sequence_bound(model, profiles))
    return report


def _check_qdq(node, label, constants, consumers, report: CheckReport) -> None:
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None:
        if zero_point not in constants:
            report.add("error", "qdq-zero-point", f"{node.op_type}: zero-point must be a constant", label)
        else:
            zp = numpy_helper.to_array(constants[zero_point])
            if zp.dtype not in (np.int8,):
                report.add("error", "qdq-type", f"{node.op_type}: {zp.dtype} quantization; TensorRT takes INT8 "
                                                f"(symmetric) Q/DQ", label)
            if np.any(zp != 0):
                report.add("error", "qdq-asymmetric", f"{node.op_type}: zero-point must be 0 (symmetric "
                                                      f"quantization); found {zp.reshape(-1)[:4].tolist()}", label)
    scale = node.input[1]
    if scale not in constants:
        report.add("error", "qdq-scale", f"{node.op_type}: scale must be a constant", label)
        return
    scale_values = numpy_helper.to_array(constants[scale])
    if scale_values.size > 1:
        data = node.input[0]
        if data not in constants:
            report.add("error", "qdq-per-channel-activation", f"{node.op_type}: per-channel scales ({scale_values.size}) "
                                                                "on a non-constant input; TensorRT quantizes activations "
                                                                "per tensor", label)
        else:
            shape = numpy_helper.to_array(constants[data]).shape
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if not -len(shape) <= axis < len(shape) or shape[axis] != scale_values.size:
                report.add("error", "qdq-axis", f"{node.op_type}: {scale_values.size} scales on axis {axis} of a "
                                                f"{list(shape)} tensor", label)
    if node.op_type == "QuantizeLinear":
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            report.add("error", "q-without-dq", "QuantizeLinear must feed DequantizeLinear nodes only "
                                                 f"(feeds {', '.join(u.op_type for u in users) or 'nothing'})", label)


def _attention_blocks(model, constants, report: CheckReport, bound: tuple[int | None, str] = (None, "")) -> list[dict]:
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def skip_qdq(name):
        node = producers.get(name)
        while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            name = node.input[0]
            node = producers.get(name)
        return name, node

    last_dims = {info.name: info.type.tensor_type.shape.dim for info in model.graph.value_info}

    def head_size(name):
        """D of Q or V: from the Reshape [0, 0, H, D] that split the heads, else (Q or V rotated, or split
        elsewhere: fuse's cores) the last dimension of a [B, H, S, D] tensor as shape inference recorded it."""
        name, node = skip_qdq(name)
        if node is not None and node.op_type == "Transpose":
            reshape = producers.get(node.input[0])
            if reshape is not None and reshape.op_type == "Reshape" and reshape.input[1] in constants:
                layout = attention_heads(numpy_helper.to_array(constants[reshape.input[1]]).reshape(-1).tolist())
                if layout is not None:
                    return layout[1]
        dims = last_dims.get(name)
        if dims is not None and len(dims) == 4 and dims[3].HasField("dim_value") and dims[3].dim_value > 0:
            return int(dims[3].dim_value)
        return None

    blocks = []
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        score = softmax.input[0]
        node = producers.get(score)
        while node is not None and node.op_type in ("Add", "Mul", "Div", "Where"):
            # the scores: the first operand, or the one computed branch of a masked_fill (DeBERTa's Where)
            computed = [t for t in node.input[1:] if t in producers] if node.op_type == "Where" else node.input[:1]
            node = producers.get(computed[0]) if len(computed) == 1 else None
        qk = node if node is not None and node.op_type == "MatMul" else None
        out = consumers.get(softmax.output[0], [])
        pv = None
        for user in out:
            if user.op_type == "QuantizeLinear":
                for dq in consumers.get(user.output[0], []):
                    pv = next((u for u in consumers.get(dq.output[0], []) if u.op_type == "MatMul"), pv)
            elif user.op_type == "MatMul":
                pv = user
        if qk is None or pv is None:
            continue
        size = head_size(qk.input[0]) or head_size(pv.input[1])
        quantized = all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                        for i in list(qk.input) + list(pv.input))
        too_long = bound[0] is not None and bound[0] > TRT_INT8_MHA.max_sequence
        eligible = size in TRT_INT8_MHA.head_sizes and quantized and not too_long
        reason = (f"eligible for INT8 MHA when the profile's max sequence is <= {TRT_INT8_MHA.max_sequence}" +
                  (f" (sequences up to {bound[0]}: {bound[1]})" if bound[0] is not None else "") if eligible else
                  f"head size {size} is not in {TRT_INT8_MHA.head_sizes}" if size not in TRT_INT8_MHA.head_sizes else
                  f"sequences up to {bound[0]} ({bound[1]}) exceed TensorRT's INT8 MHA limit of "
                  f"{TRT_INT8_MHA.max_sequence}" + ("; the quantized batched MatMuls will run outside the fused INT8 "
                                                "MHA kernel" if quantized else "") if too_long else
                  "batched MatMuls not quantized: runs as FP16/FP32 MHA")
        blocks.append({"softmax": softmax.name, "head_size": size, "int8_mha": eligible, "note": reason,
                       "quantized": quantized})
    if blocks:
        count = sum(b["int8_mha"] for b in blocks)
        report.add("info", "attention", f"{len(blocks)} attention blocks; {count} meet TensorRT's INT8 MHA conditions "
                                        f"(head size {TRT_INT8_MHA.head_sizes}, sequence <= {TRT_INT8_MHA.max_sequence})"
                                        + (f"; sequences up to {bound[0]} ({bound[1]})" if bound[0] is not None else ""))
        if bound[0] is not None and bound[0] > TRT_INT8_MHA.max_sequence and any(b["quantized"] for b in blocks):
            report.add("warning", "int8-mha-sequence", f"sequences up to {bound[0]} ({bound[1]}) exceed TensorRT's "
                                                       f"INT8 MHA limit of {TRT_INT8_MHA.max_sequence}: give --shapes "
                                                       "with a smaller max, or keep attention in float")
    return blocks


def format_check(report: CheckReport, name: str) -> str:
    lines = [f"{name}: {'ready for TensorRT' if report.ok else 'will NOT parse/build in TensorRT'} "
             f"({support_table()['source']})"]
    for f in report.findings:
        where = f" [{f.node}]" if f.node else ""
        lines.append(f"  {f.severity:<7} {f.code:<26} {f.message}{where}")
    if report.qdq_pairs:
        lines.append(f"  info    {'qdq':<26} {report.qdq_pairs} QuantizeLinear nodes (explicit quantization: "
                     "build a strongly typed network)")
    return "\n".join(lines)
