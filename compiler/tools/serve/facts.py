"""What ``tqc serve`` reads off a model: its token inputs, outputs, vocabulary and position limits, metadata.

ONNX (``model_facts``) from the graph and its initializers; OpenVINO IR (``ir_facts``, a ``tqc compile --target
openvino`` output) from the IR's graph, with the ONNX metadata (tokenizer, pool pass) that ``model.xml.json``
records. OpenVINO is imported only for an IR.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.model import load_model
from tqc.compiler.io.openvino_ir import is_ir

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}
OV_TO_TRITON = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "i64": "TYPE_INT64", "i32": "TYPE_INT32"}
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")  # position ids start after the padding index


@dataclass
class ModelFacts:
    path: Path
    inputs: list[dict]
    outputs: list[dict]
    vocab: int | None
    type_vocab: int
    max_positions: int | None  # rows of the position-embedding table (RoBERTa-style: minus the padding offset)
    metadata: dict = field(default_factory=dict)  # the model's metadata_props (tqc.tokenizer, tqc.pool, ...)


def model_facts(path: Path) -> ModelFacts:
    """The facts of an ONNX model, read without its weights."""
    from tqc.compiler.runtime.feeds import vocab_size

    model = load_model(path, load_external_data=False)
    initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
    inputs, outputs = [], []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        inputs.append(_token_input(value.name, tt.elem_type == onnx.TensorProto.INT64 and len(tt.shape.dim) == 2))
    for value in model.graph.output:
        tt = value.type.tensor_type
        if tt.elem_type not in ONNX_TO_TRITON:
            raise TqcError(f"output '{value.name}' has an element type the server cannot return")
        outputs.append({"name": value.name, "data_type": ONNX_TO_TRITON[tt.elem_type],
                        "dims": [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                                 for d in tt.shape.dim][1:]})
    if "input_ids" not in [i["name"] for i in inputs]:
        raise TqcError("'tqc serve' needs a model with an 'input_ids' input")
    type_vocab = 2
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "token_type_ids":
            type_vocab = int(initializers.get(node.input[0], (2,))[0])
        if node.op_type == "EmbedLayerNormalization" and len(node.input) > 4 and node.input[4] in initializers:
            type_vocab = int(initializers[node.input[4]][0])  # its ids may arrive through a Cast
    vocab = vocab_size(model, "input_ids")
    if vocab is None:
        for node in model.graph.node:
            if node.op_type == "EmbedLayerNormalization" and len(node.input) > 2:
                vocab = int(initializers.get(node.input[2], (0,))[0]) or None
    positions = None
    for name, dims in initializers.items():
        if "position_embeddings" in name and len(dims) == 2:
            positions = int(dims[0])
    for node in model.graph.node:
        if node.op_type == "EmbedLayerNormalization" and len(node.input) > 3 and node.input[3] in initializers:
            positions = int(initializers[node.input[3]][0])
    meta = {p.key: p.value for p in model.metadata_props}
    if positions and meta.get("tqc.family") in ROBERTA_LIKE:
        positions -= 2
    return ModelFacts(path=path, inputs=inputs, outputs=outputs, vocab=vocab, type_vocab=type_vocab,
                      max_positions=positions, metadata=meta)


def _token_input(name: str, is_int64_2d: bool) -> dict:
    if name not in TOKEN_INPUTS or not is_int64_2d:
        raise TqcError(f"'tqc serve' serves token models (INT64 input_ids/attention_mask/token_type_ids "
                       f"[batch, sequence]); input '{name}' is not one")
    return {"name": name, "data_type": "TYPE_INT64"}


def ir_facts(path: Path) -> ModelFacts:
    """The facts of an OpenVINO IR: ports from the IR; vocabulary and token types from the Gathers that read
    input_ids / token_type_ids; positions from the position-embedding constant; metadata from model.xml.json."""
    from tqc.compiler.io.openvino_ir import require_openvino

    ov = require_openvino()
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise TqcError(f"OpenVINO cannot read '{path}': {str(exc).strip().splitlines()[0]}") from None
    inputs, outputs = [], []
    for port in model.inputs:
        shape = port.get_partial_shape()
        inputs.append(_token_input(port.get_any_name(), port.get_element_type().get_type_name() == "i64"
                                   and shape.rank.is_static and shape.rank.get_length() == 2))
    for port in model.outputs:
        kind = OV_TO_TRITON.get(port.get_element_type().get_type_name())
        if kind is None:
            raise TqcError(f"output '{port.get_any_name()}' has an element type the server cannot return")
        dims = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
        outputs.append({"name": port.get_any_name(), "data_type": kind, "dims": dims[1:]})
    if "input_ids" not in [i["name"] for i in inputs]:
        raise TqcError("'tqc serve' needs a model with an 'input_ids' input")
    vocab, type_vocab, positions = None, 2, None
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Gather":
            source = _parameter_of(op.input_value(1).get_node())
            rows = op.get_input_partial_shape(0)[0]
            if source is not None and rows.is_static:
                if source == "input_ids":
                    vocab = rows.get_length()
                elif source == "token_type_ids":
                    type_vocab = rows.get_length()
        if op.get_type_name() == "Constant" and "position_embeddings" in op.get_friendly_name():
            shape = op.get_output_partial_shape(0)
            if shape.rank.is_static and shape.rank.get_length() == 2:
                positions = shape[0].get_length()
    side = path.with_name(path.name + ".json")
    meta = json.loads(side.read_text()).get("metadata", {}) if side.exists() else {}
    if positions and meta.get("tqc.family") in ROBERTA_LIKE:
        positions -= 2
    return ModelFacts(path=path, inputs=inputs, outputs=outputs, vocab=vocab, type_vocab=type_vocab,
                      max_positions=positions, metadata=meta)


def _parameter_of(node, depth: int = 4) -> str | None:
    """The model input a Gather's indices come from, through up to ``depth`` Converts."""
    for _ in range(depth):
        if node.get_type_name() == "Parameter":
            return node.get_friendly_name()
        if node.get_type_name() != "Convert":
            return None
        node = node.input_value(0).get_node()
    return None


def read_facts(path: Path, provider: str) -> ModelFacts:
    """An IR (served by OpenVINO only) or an ONNX model (any provider)."""
    if is_ir(path):
        if provider != "openvino":
            raise TqcError(f"'{path.name}' is OpenVINO IR: it is served with --provider openvino (the default "
                           f"for an .xml), not {provider}")
        if not path.with_suffix(".bin").exists():
            raise TqcError(f"OpenVINO IR '{path}' has no weights file '{path.with_suffix('.bin').name}' beside it")
        return ir_facts(path)
    return model_facts(path)
