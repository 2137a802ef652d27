"""``tqc export-triton``: a Triton Inference Server model repository for an ONNX model or TensorRT plan.

    repo/
      <name>/
        config.pbtxt        platform onnxruntime_onnx | tensorrt_plan, max_batch_size, dynamic batching,
                            the model's real input/output names, types and dims (batch axis left out)
        1/model.onnx        (or model.plan)

The written config is parsed back and compared with what was meant before the repository is moved into
place, so a malformed config never lands.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import onnx

from tqc.compiler.errors import TqcError
from tqc.compiler.model_io import load_model

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _ports(values, initializers=frozenset()) -> list[dict]:
    ports = []
    for value in values:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        if tt.elem_type not in ONNX_TO_TRITON:
            raise TqcError(f"'{value.name}' has an element type Triton configs cannot name")
        ports.append({"name": value.name, "data_type": ONNX_TO_TRITON[tt.elem_type], "dims": dims})
    return ports


def model_config(name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int,
                 instances: int, kind: str, queue_delay_us: int) -> dict:
    """The config as data; the batch axis (axis 0) is Triton's when max_batch_size > 0."""
    strip = (lambda dims: dims[1:]) if max_batch > 0 else (lambda dims: dims)
    return {
        "name": name, "platform": platform, "max_batch_size": max_batch,
        "input": [{"name": p["name"], "data_type": p["data_type"], "dims": strip(p["dims"])} for p in inputs],
        "output": [{"name": p["name"], "data_type": p["data_type"], "dims": strip(p["dims"])} for p in outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": queue_delay_us} if max_batch > 0 else None,
        "instance_group": [{"count": instances, "kind": kind}],
    }


def to_pbtxt(config: dict) -> str:
    def tensor(p):
        return (f'  {{\n    name: "{p["name"]}"\n    data_type: {p["data_type"]}\n'
                f'    dims: [ {", ".join(str(d) for d in p["dims"])} ]\n  }}')
    lines = [f'name: "{config["name"]}"', f'platform: "{config["platform"]}"',
             f'max_batch_size: {config["max_batch_size"]}',
             "input [\n" + ",\n".join(tensor(p) for p in config["input"]) + "\n]",
             "output [\n" + ",\n".join(tensor(p) for p in config["output"]) + "\n]"]
    if config.get("dynamic_batching"):
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: "
                     f'{config["dynamic_batching"]["max_queue_delay_microseconds"]}\n}}')
    group = config["instance_group"][0]
    lines.append(f'instance_group [\n  {{\n    count: {group["count"]}\n    kind: {group["kind"]}\n  }}\n]')
    return "\n".join(lines) + "\n"


def parse_pbtxt(text: str) -> dict:
    """Parse the protobuf text format subset that ``to_pbtxt`` writes (and Triton reads) back into data."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        if tok == "{":
            pos += 1
            return message("}")
        if tok == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        if tok.startswith('"'):
            return tok[1:-1]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        return tok

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            out[key] = value()
        pos += 1
        return out

    tokens.append("<end>")
    return message("<end>")


def export_triton(model_path: str | Path, repo: str | Path, name: str | None = None, max_batch: int = 32,
                  instances: int = 1, kind: str = "KIND_GPU", queue_delay_us: int = 100, version: int = 1) -> dict:
    model_path = Path(model_path)
    if not model_path.exists() or model_path.is_dir():
        raise TqcError(f"model '{model_path}' does not exist or is a directory")
    name = name or model_path.stem
    if not NAME.match(name):
        raise TqcError(f"model name '{name}' may hold letters, digits, '.', '_' and '-' only")
    if model_path.suffix == ".plan":
        meta_path = model_path.with_name(model_path.name + ".json")
        if not meta_path.exists():
            raise TqcError(f"'{meta_path}' (written by tqc build) is missing: it names the plan's inputs and outputs")
        meta = json.loads(meta_path.read_text())
        if "inputs" not in meta:
            raise TqcError(f"'{meta_path}' does not list the plan's inputs and outputs")
        inputs, outputs, platform = meta["inputs"], meta["outputs"], "tensorrt_plan"
        files = [(model_path, "model.plan")]
    else:
        model = load_model(model_path, load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        inputs, outputs = _ports(model.graph.input, initializers), _ports(model.graph.output)
        platform = "onnxruntime_onnx"
        files = [(model_path, "model.onnx")] + [(p, p.name) for p in sorted(model_path.parent.glob(model_path.name + ".data"))]
    if max_batch > 0:
        for port in inputs + outputs:
            if not port["dims"] or port["dims"][0] != -1:
                raise TqcError(f"'{port['name']}' has no dynamic batch axis 0; use --max-batch 0")
    config = model_config(name, platform, inputs, outputs, max_batch, instances, kind, queue_delay_us)
    text = to_pbtxt(config)
    parsed = parse_pbtxt(text)
    expected = {k: v for k, v in config.items() if v is not None}
    if parsed != expected:
        raise TqcError("internal: the written config.pbtxt does not parse back to the intended config")
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / name
    if final.exists():
        raise TqcError(f"'{final}' exists; choose another --name or repository")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=repo))
    try:
        (staging / str(version)).mkdir()
        (staging / "config.pbtxt").write_text(text)
        for source, target in files:
            shutil.copyfile(source, staging / str(version) / target)
        staging.rename(final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise TqcError(f"cannot write the repository: {exc}") from None
    return {"repository": str(repo), "model": str(final), "config": config}
