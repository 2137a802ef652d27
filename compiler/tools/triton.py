"""``tqc export-triton``: a Triton Inference Server model repository for an ONNX model or TensorRT plan.

    repo/
      <name>/
        config.pbtxt        platform onnxruntime_onnx | tensorrt_plan, max_batch_size, dynamic batching,
                            the model's real input/output names, types and dims (batch axis left out)
        1/model.onnx        (or model.plan)

The written config is parsed back and compared with what was meant before the repository is moved into
place, so a malformed config never lands. Every external-data file the model names is copied (with its
relative path); tensor names that would break config.pbtxt, counts out of range and bad plan metadata are
refused in one line before anything is written; the model folder lands whole or not at all
(``tqc.compiler.io.output_guard``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.model import load_model

ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def triton_ports(values, initializers=frozenset()) -> list[dict]:
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


ENUM_FIELDS = {"data_type", "kind"}  # written bare (TYPE_FP32, KIND_GPU); every other string is quoted


def to_pbtxt(config: dict) -> str:
    """A config as data (nested dicts, lists, ints, strings) in protobuf text format, as Triton reads it; a list
    of messages is written ``key [ {...}, {...} ]`` (maps too: entries with ``key`` and ``value``); None is left
    out."""
    def scalar(key: str, value) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"config field '{key}' holds {value!r}")
        return str(value) if isinstance(value, int) or key in ENUM_FIELDS else f'"{value}"'

    def fields(message: dict, pad: str) -> list[str]:
        lines = []
        for key, value in message.items():
            if value is None:
                continue
            if isinstance(value, dict):
                lines += [f"{pad}{key} {{", *fields(value, pad + "  "), f"{pad}}}"]
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                items = [[f"{pad}  {{", *fields(item, pad + "    "), f"{pad}  }}"] for item in value]
                lines.append(f"{pad}{key} [")
                for position, item in enumerate(items):
                    lines += item[:-1] + [item[-1] + ("," if position < len(items) - 1 else "")]
                lines.append(f"{pad}]")
            elif isinstance(value, list):
                lines.append(f"{pad}{key}: [ {', '.join(scalar(key, v) for v in value)} ]")
            else:
                lines.append(f"{pad}{key}: {scalar(key, value)}")
        return lines

    return "\n".join(fields(config, "")) + "\n"


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


INT32_MAX = 2**31 - 1
COUNT_RANGES = {"--max-batch": (0, INT32_MAX), "--instances": (1, 1024), "--queue-delay-us": (0, INT32_MAX),
                "version": (1, INT32_MAX)}
TRITON_TYPES = set(ONNX_TO_TRITON.values())
UNSAFE_IN_PBTXT = re.compile(r'["\\\x00-\x1f\x7f]')


def _check_counts(**values: int) -> None:
    for option, value in values.items():
        low, high = COUNT_RANGES[option]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TqcError(f"{option} must be an integer in [{low}, {high}], got {value!r}")


def _check_port_names(ports: list[dict], where: str) -> None:
    """A name config.pbtxt cannot hold (a quote, a backslash, a control character; empty) is refused."""
    seen = set()
    for port in ports:
        name = port["name"]
        if not name or UNSAFE_IN_PBTXT.search(name):
            raise TqcError(f"{where}: tensor name {name!r} cannot be written into config.pbtxt (quotes, "
                           "backslashes and control characters are not allowed); rename it in the model")
        if name in seen:
            raise TqcError(f"{where}: tensor name '{name}' appears twice")
        seen.add(name)


def _plan_ports(meta_path: Path) -> tuple[list[dict], list[dict]]:
    """The plan's inputs and outputs from ``<plan>.json`` (written by tqc build), checked field by field."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TqcError(f"'{meta_path}' is not readable plan metadata ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(meta, dict) or "inputs" not in meta or "outputs" not in meta:
        raise TqcError(f"'{meta_path}' does not list the plan's inputs and outputs")
    for key in ("inputs", "outputs"):
        ports = meta[key]
        if not isinstance(ports, list) or not ports:
            raise TqcError(f"'{meta_path}': '{key}' must be a non-empty list")
        for port in ports:
            ok = (isinstance(port, dict) and isinstance(port.get("name"), str)
                  and port.get("data_type") in TRITON_TYPES and isinstance(port.get("dims"), list)
                  and all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in port["dims"]))
            if not ok:
                raise TqcError(f"'{meta_path}': bad entry in '{key}': {str(port)[:120]} (expected name, a Triton "
                               "data_type and dims of integers >= -1)")
    return meta["inputs"], meta["outputs"]


def _weight_files(model_path: Path) -> list[tuple[Path, str]]:
    """Every external-data file the model names, with its path relative to the model (kept in the repo)."""
    from tqc.compiler.io.output_guard import external_data_files

    base = model_path.resolve().parent
    files = []
    for data in external_data_files(model_path):
        source = data.resolve()
        if base not in source.parents:
            raise TqcError(f"'{model_path}' names external data '{data.relative_to(model_path.parent)}' outside "
                           "the model's folder")
        if not source.is_file():
            raise TqcError(f"'{model_path}' names external data '{data.name}', which is missing next to the model")
        files.append((data, str(data.relative_to(model_path.parent))))
    return files


def check_options(max_batch: int, instances: int, kind: str, queue_delay_us: int, version: int) -> None:
    """The counts and the instance kind of an export, refused in one line before anything is read."""
    _check_counts(**{"--max-batch": max_batch, "--instances": instances, "--queue-delay-us": queue_delay_us,
                     "version": version})
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise TqcError(f"--kind must be KIND_GPU or KIND_CPU, got '{kind}'")


def model_folder(guard, model_path: str | Path, repo: Path, name: str | None, max_batch: int, instances: int,
                 kind: str, queue_delay_us: int) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The model's folder declared with the guard: (folder, config, [(source file, name in the version folder)])."""
    from tqc.compiler.io.model import check_input_path

    model_path = check_input_path(model_path)
    name = name or model_path.stem
    if not NAME.match(name) or name in (".", ".."):
        raise TqcError(f"model name '{name}' may hold letters, digits, '.', '_' and '-' only")
    guard.reads_model(model_path)
    final = guard.writes_folder(repo / name, "the Triton model folder")
    if model_path.suffix == ".plan":
        meta_path = model_path.with_name(model_path.name + ".json")
        if not meta_path.is_file():
            raise TqcError(f"'{meta_path}' (written by tqc build) is missing: it names the plan's inputs and outputs")
        inputs, outputs = _plan_ports(meta_path)
        platform = "tensorrt_plan"
        files = [(model_path, "model.plan")]
    else:
        model = load_model(model_path, load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        inputs, outputs = triton_ports(model.graph.input, initializers), triton_ports(model.graph.output)
        platform = "onnxruntime_onnx"
        files = [(model_path, "model.onnx")] + _weight_files(model_path)
    _check_port_names(inputs, f"inputs of '{model_path}'")
    _check_port_names(outputs, f"outputs of '{model_path}'")
    if max_batch > 0:
        for port in inputs + outputs:
            if not port["dims"] or port["dims"][0] != -1:
                raise TqcError(f"'{port['name']}' has no dynamic batch axis 0; use --max-batch 0")
    return final, model_config(name, platform, inputs, outputs, max_batch, instances, kind, queue_delay_us), files


def stage_folder(guard, final: Path, config: dict, files: list[tuple[Path, str]], version: int = 1) -> None:
    """``final`` staged whole: config.pbtxt (parsed back and compared with ``config`` first) and the version folder
    holding ``files``; renamed into place when the command commits."""
    text = to_pbtxt(config)
    if parse_pbtxt(text) != {k: v for k, v in config.items() if v is not None}:
        raise RuntimeError(f"the written config.pbtxt of '{final.name}' does not parse back to the intended config")
    staging = guard.stage_dir(final)
    try:
        (staging / str(version)).mkdir()
        (staging / "config.pbtxt").write_text(text)
        for source, target in files:
            destination = staging / str(version) / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
    except OSError as exc:
        raise TqcError(f"cannot write the repository '{final.parent}': {exc.strerror or exc}") from None


def export_triton(model_path: str | Path, repo: str | Path, name: str | None = None, max_batch: int = 32,
                  instances: int = 1, kind: str = "KIND_GPU", queue_delay_us: int = 100, version: int = 1) -> dict:
    """Write ``repo/<name>/`` (config.pbtxt, ``<version>/model.onnx`` and every external-data file it names, or
    ``model.plan``). Everything is checked before anything is written; the model folder is assembled in a
    temp folder and renamed into place (parent folders created for it are removed again on failure)."""
    from tqc.compiler.io import output_guard

    check_options(max_batch, instances, kind, queue_delay_us, version)
    with output_guard.command("export-triton") as guard:
        final, config, files = model_folder(guard, model_path, Path(repo), name, max_batch, instances, kind,
                                            queue_delay_us)
        stage_folder(guard, final, config, files, version)
    return {"repository": str(repo), "model": str(final), "config": config}
