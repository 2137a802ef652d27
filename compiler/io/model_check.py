"""Validation of an input model on load, the same for every command (compile, calibrate, inspect, diff,
check, bench, export-triton), before any pass or runtime sees it.

    model.onnx ─► load (model_io.load_model / load_model_lean) ─► validate_model ─► passes, ORT, reports
                                                                  │
        "tqc: error: input model is invalid: <why>" (exit 2) ◄────┘ on the first problem:

* external data: a location that is absolute, leaves the model's folder (``..``, a symlink), is not a regular
  file (a FIFO would block, a device never ends), or is shorter than the tensor it holds;
* single assignment: a tensor produced twice (two nodes, or a node and an input/initializer);
* no undefined tensors: every node input and graph output is a graph input, an initializer or a node output;
* no cycles (nodes merely out of order are left to the checker, which the ONNX spec agrees with);
* initializer data matching its dims (raw bytes, typed values), no negative dims;
* no tensor whose declared static size exceeds this machine's memory (a [1e6, 1e6] input);
* the full onnx checker (``full_check``: strict shape inference too), run on the skeleton of the graph
  (weights as shape-only stand-ins), so a 4 GB model is checked in milliseconds and its weights are never
  copied or read twice.

Without this, a corrupt graph reaches the first pass and its verification blames the pass ("verification
failed: 01_fold"), or ORT prints its own errors.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from tqc.compiler.core.errors import TqcError

INVALID = "input model is invalid"
# Element types stored two to a byte.
_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class InvalidModelError(TqcError):
    """The input model itself is broken (not a pass, not the user's options)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{INVALID}: '{path}': {reason}")


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


def _itemsize(data_type: int) -> float | None:
    if data_type in _PACKED_4BIT:
        return 0.5
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _elements(dims: Iterable[int]) -> int:
    count = 1
    for d in dims:
        count *= int(d)
    return count


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} PiB"  # pragma: no cover


def all_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Initializers and Constant-like tensor attributes of the graph and its subgraphs, with where they sit."""
    for tensor in graph.initializer:
        yield tensor, f"initializer '{tensor.name}'"
    yield from node_tensors(graph)


def node_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """The tensors the nodes of ``graph`` hold: tensor attributes, and every tensor of their subgraph bodies
    (If/Loop/Scan), nested ones too."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, f"attribute '{attr.name}' of node '{node.name or node.op_type}'"
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield t, f"attribute '{attr.name}' of node '{node.name or node.op_type}'"
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _in_subgraph(all_tensors(attr.g), attr.g, node)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _in_subgraph(all_tensors(g), g, node)


def _in_subgraph(tensors, graph: onnx.GraphProto, node: onnx.NodeProto):
    for tensor, where in tensors:
        yield tensor, f"{where} in subgraph '{graph.name}' of node '{node.name or node.op_type}'"


def check_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Every external-data reference, in the main graph and in every subgraph body (If/Loop/Scan), stays in
    the model's folder, names a regular file, fits in it and in this machine's memory.

    Returns the resolved data files. Run before anything reads them (``onnx.load_external_data_for_model``
    would follow an absolute path or a symlink out of the folder, or block on a FIFO).
    """
    p = Path(path)
    memory = physical_memory_bytes()
    sizes: dict[Path, int] = {}
    for tensor, where in all_tensors(model.graph):
        if uses_external_data(tensor):
            external_source(tensor, where, p, memory, sizes)
    return sorted(sizes)


def external_source(tensor: onnx.TensorProto, where: str, path: str | os.PathLike, memory: int | None = None,
                    sizes: dict[Path, int] | None = None) -> tuple[Path, int, int | None]:
    """(data file, offset, length in bytes or None for a type of unknown size) of one external tensor, after
    the checks every loader makes before it allocates or reads anything: a location in the model's folder
    (not absolute, no ``..`` or symlink out), a regular file, dims within this machine's memory, and a file
    long enough. ``sizes`` caches the file sizes across tensors."""
    p = Path(path)
    base = p.resolve().parent
    info = ExternalDataInfo(tensor)
    location = info.location or ""
    if not location:
        raise InvalidModelError(p, f"{where} uses external data without a location")
    if os.path.isabs(location):
        raise InvalidModelError(p, f"{where} names external data by an absolute path '{location}': external "
                                   "data must stay in the model's folder")
    source = (base / location).resolve()
    if base not in source.parents:
        raise InvalidModelError(p, f"{where} names external data '{location}' outside the model's folder")
    if not source.exists():
        raise InvalidModelError(p, f"{where} is stored in '{location}', which is missing next to the model")
    if not source.is_file():
        raise InvalidModelError(p, f"{where} is stored in '{location}', which is not a regular file")
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(p, f"{where} has negative dims {dims}")
    itemsize = _itemsize(tensor.data_type)
    needed = None if itemsize is None else int(np.ceil(_elements(dims) * itemsize))
    memory = physical_memory_bytes() if memory is None else memory
    if needed is not None and needed > memory:
        raise InvalidModelError(p, f"{where} has dims {dims} ({_human(needed)}), more than this machine's memory "
                                   f"({_human(memory)})")
    sizes = {} if sizes is None else sizes
    size = sizes.setdefault(source, source.stat().st_size)
    offset = int(info.offset or 0)
    if offset < 0 or (info.length is not None and int(info.length) < 0):
        raise InvalidModelError(p, f"{where}: negative external-data offset or length")
    length = int(info.length) if info.length is not None else needed
    if needed is not None and info.length is not None and length != needed:
        raise InvalidModelError(p, f"{where}: external data holds {length} bytes, its dims {dims} need {needed}")
    if length is not None and offset + length > size:
        raise InvalidModelError(p, f"{where}: '{location}' has {size} bytes, the tensor needs bytes "
                                   f"{offset} to {offset + length}")
    return source, offset, length


def refuse_openvino_ir(path: str | os.PathLike) -> None:
    """One line for an OpenVINO IR file (``model.xml`` or its ``model.bin``) handed to a command that loads
    ONNX: the protobuf parser would only say "unsupported protobuf wire type"."""
    p = Path(path)
    xml = p if p.suffix.lower() == ".xml" else p.with_suffix(".xml") if p.suffix.lower() == ".bin" else None
    if xml is None or not xml.is_file():
        return
    try:
        with open(xml, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return
    if not head.startswith((b"<?xml", b"<net")) or b"<net" not in head:
        if p == xml and head.startswith(b"<"):
            raise TqcError(f"'{p}' is an XML file, not an ONNX model: give the .onnx file")
        return
    what = f"'{p}' is OpenVINO IR" if p == xml else f"'{p}' holds the weights of the OpenVINO IR '{xml.name}'"
    raise TqcError(f"{what}, not ONNX: give the .onnx model it was made from (OpenVINO IR runs with "
                   f"'tqc bench --provider openvino')")


def raw_data_lengths(path: str | os.PathLike) -> dict[str, int]:
    """Initializer name -> length of its ``raw_data`` in the file, read from the protobuf framing (mmap) without
    copying any weight: reading ``len(tensor.raw_data)`` of a parsed model copies the bytes (0.2 s and the
    largest tensor's size again for MiniLM)."""
    lengths: dict[str, int] = {}
    try:
        _walk_raw_lengths(path, lengths)
    except (ValueError, IndexError, OSError):  # framing tqc does not walk (groups): measured from the tensors
        lengths.clear()
    return lengths


def _walk_raw_lengths(path: str | os.PathLike, lengths: dict[str, int]) -> None:
    import mmap

    from tqc.compiler.io.wire import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, proto_fields

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, _, start, end in proto_fields(buf, 0, size):
                if number != MODEL_GRAPH:
                    continue
                for g_number, _, g_start, g_end in proto_fields(buf, start, end):
                    if g_number != GRAPH_INITIALIZER:
                        continue
                    name, raw = None, None
                    for t_number, _, t_start, t_end in proto_fields(buf, g_start, g_end):
                        if t_number == 8:  # TensorProto.name
                            name = bytes(buf[t_start:t_end]).decode("utf-8", "replace")
                        elif t_number == TENSOR_RAW_DATA:
                            raw = t_end - t_start
                    if name is not None and raw is not None:
                        lengths[name] = raw


def _check_tensor_data(tensor: onnx.TensorProto, where: str, path: Path, memory: int,
                       raw_length: int | None = None) -> None:
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(path, f"{where} has negative dims {dims}")
    count = _elements(dims)
    itemsize = _itemsize(tensor.data_type)
    if itemsize is not None and count * itemsize > memory:
        raise InvalidModelError(path, f"{where} has dims {dims} ({_human(count * itemsize)}), more than this "
                                      f"machine's memory ({_human(memory)})")
    if uses_external_data(tensor):
        return  # checked against its file by check_external_data (or a stand-in of the lean loader)
    if raw_length is not None or tensor.HasField("raw_data"):
        if itemsize is None:
            return
        needed = int(np.ceil(count * itemsize))
        length = raw_length if raw_length is not None else len(tensor.raw_data)
        if length != needed:
            raise InvalidModelError(path, f"{where} holds {length} bytes of data, its dims {dims} and "
                                          f"type need {needed}")
        return
    for name in _TYPED_FIELDS:
        values = len(getattr(tensor, name))
        if values:
            expected = (count + 1) // 2 if tensor.data_type in _PACKED_4BIT else count
            if tensor.data_type == onnx.TensorProto.COMPLEX64 or tensor.data_type == onnx.TensorProto.COMPLEX128:
                expected = 2 * count
            if values != expected:
                raise InvalidModelError(path, f"{where} holds {values} values, its dims {dims} need {expected}")
            return
    if count and tensor.data_type != onnx.TensorProto.UNDEFINED:
        raise InvalidModelError(path, f"{where} has dims {dims} but no data")


def _check_static_dims(graph: onnx.GraphProto, path: Path, memory: int) -> None:
    for kind, values in (("input", graph.input), ("output", graph.output), ("tensor", graph.value_info)):
        for value in values:
            if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
                continue
            tt = value.type.tensor_type
            dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
            if any(d < 0 for d in dims):
                raise InvalidModelError(path, f"{kind} '{value.name}' has negative dims {dims}")
            itemsize = _itemsize(tt.elem_type) or 1
            if _elements(dims) * itemsize > memory:
                raise InvalidModelError(path, f"{kind} '{value.name}' has dims {dims} "
                                              f"({_human(_elements(dims) * itemsize)} at the least), more than this "
                                              f"machine's memory ({_human(memory)})")


def _check_dataflow(graph: onnx.GraphProto, path: Path) -> None:
    """Single assignment, every tensor defined, no cycles (top level; subgraphs are left to the checker)."""
    producer: dict[str, str] = {}
    for value in graph.input:
        producer.setdefault(value.name, "a graph input")
    for tensor in graph.initializer:
        producer.setdefault(tensor.name, "an initializer")
    for index, node in enumerate(graph.node):
        label = f"node '{node.name or f'#{index} {node.op_type}'}'"
        for out in node.output:
            if not out:
                continue
            if out in producer:
                raise InvalidModelError(path, f"tensor '{out}' is assigned twice (by {producer[out]} and by {label}): "
                                              "ONNX graphs are single assignment")
            producer[out] = label
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in producer:
                label = node.name or f"#{index} {node.op_type}"
                raise InvalidModelError(path, f"node '{label}' reads tensor '{name}', which no node, graph input or "
                                              "initializer defines")
    for value in graph.output:
        if value.name not in producer:
            raise InvalidModelError(path, f"graph output '{value.name}' is not produced by any node, input or "
                                          "initializer")
    # Kahn's algorithm: what cannot be ordered lies on a cycle.
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in set(n for n in node.input if n in produced_by):
            waiting[i] += 1
            users.setdefault(produced_by[name], []).append(i)
    ready = deque(i for i, count in enumerate(waiting) if count == 0)
    done = 0
    while ready:
        i = ready.popleft()
        done += 1
        for j in users.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if done != len(graph.node):
        # What waits only downstream of a cycle is not on it: peel stuck nodes no other stuck node reads.
        stuck_ids = {i for i, count in enumerate(waiting) if count > 0}
        readers = {i: sum(1 for j in users.get(i, ()) if j in stuck_ids) for i in stuck_ids}
        feeders: dict[int, list[int]] = {}
        for i in stuck_ids:
            for j in users.get(i, ()):
                if j in stuck_ids:
                    feeders.setdefault(j, []).append(i)
        leaves = deque(i for i, count in readers.items() if count == 0)
        while leaves:
            i = leaves.popleft()
            stuck_ids.discard(i)
            for k in feeders.get(i, ()):
                readers[k] -= 1
                if readers[k] == 0:
                    leaves.append(k)
        stuck = [graph.node[i] for i in sorted(stuck_ids)]
        names = ", ".join(f"'{n.name or n.op_type}'" for n in stuck[:4]) + (", ..." if len(stuck) > 4 else "")
        raise InvalidModelError(path, f"the graph has a cycle through {len(stuck)} node(s) ({names})")


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``tqc.compiler.io.skeleton.skeleton`` deciding by dims, not by reading ``raw_data`` (which would copy every weight); the data
    sizes were checked before."""
    from tqc.compiler.io.skeleton import model_header, stand_in, travels_as_stand_in

    light = model_header(model)
    graph, source = light.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    # A Constant's value saved as external data (exporters do), or a subgraph body's tensor, points at a file
    # not here (the graph has no initializers yet: these are the nodes' tensors, nested ones too).
    for tensor, _ in all_tensors(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.CopyFrom(stand_in(tensor.name, tensor.data_type, tensor.dims))
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    for tensor in source.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or travels_as_stand_in(tensor.dims):
            graph.initializer.append(stand_in(tensor.name, tensor.data_type, tensor.dims))
        else:
            graph.initializer.append(tensor)
    return light


def _run_full_checker(model: onnx.ModelProto, path: Path) -> None:
    from tqc.compiler.io.skeleton import SKELETON_DATA

    try:
        with tempfile.TemporaryDirectory(prefix="tqc-check-") as tmp:
            (Path(tmp) / SKELETON_DATA).touch()
            light = Path(tmp) / "model.onnx"
            light.write_bytes(_skeleton(model).SerializeToString())
            onnx.checker.check_model(str(light), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:
        text = str(exc).strip()
        first = " ".join(text.split())[:300] if text else type(exc).__name__
        raise InvalidModelError(path, f"onnx checker: {first}") from None


def validate_model(model: onnx.ModelProto, path: str | os.PathLike, checker: bool = True,
                   raw_lengths: dict[str, int] | None = None, external: set[str] = frozenset()) -> None:
    """Raise ``InvalidModelError`` (one line, exit 2) when ``model`` (as loaded from ``path``: a full model, a
    model without its external data, or a lean skeleton) is not a valid ONNX graph; see the module docstring.

    ``raw_lengths`` (``raw_data_lengths(path)``) spares copying each weight to measure it; ``external`` names
    initializers whose data came from external files (checked by ``check_external_data`` before loading)."""
    p = Path(path)
    if not model.graph.node and not model.graph.output:
        raise InvalidModelError(p, "no graph")
    memory = physical_memory_bytes()
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        twice = next(n for n in names if n in seen or seen.add(n))
        raise InvalidModelError(p, f"initializer '{twice}' is defined twice")
    for tensor in model.graph.initializer:  # by position, not id(): protobuf wrappers are not kept alive
        where = f"initializer '{tensor.name}'"
        if raw_lengths is not None and tensor.name in external:
            _check_tensor_data(onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                                data_location=onnx.TensorProto.EXTERNAL), where, p, memory)
        elif raw_lengths is not None and tensor.name in raw_lengths:
            _check_tensor_data(tensor, where, p, memory, raw_length=raw_lengths[tensor.name])
        else:
            _check_tensor_data(tensor, where, p, memory)
    for tensor, where in node_tensors(model.graph):
        _check_tensor_data(tensor, where, p, memory)
    _check_static_dims(model.graph, p, memory)
    _check_dataflow(model.graph, p)
    if checker:
        _run_full_checker(model, p)


def check_export_config(config, source: str) -> None:
    """A transformers config that cannot make a model (export): sizes that are not positive integers, a hidden
    size that is not a multiple of the attention heads, weights that cannot fit in memory -> one line."""
    where = f"config of '{source}'"
    sizes = {}
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                "max_position_embeddings", "type_vocab_size"):
        try:
            value = getattr(config, key)
        except AttributeError:
            continue
        if value is None:
            continue
        # DeBERTa-v2/v3 configs say type_vocab_size 0: no token-type table (the export then has no token_type_ids)
        zero_ok = key == "num_hidden_layers" or (key == "type_vocab_size" and config.model_type == "deberta-v2")
        minimum = 0 if zero_ok else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise TqcError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
        sizes[key] = value
    hidden, heads = sizes.get("hidden_size"), sizes.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        raise TqcError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                       f"(each head gets hidden_size / heads dims)")
    if hidden:
        layers = sizes.get("num_hidden_layers", 1)
        inner = sizes.get("intermediate_size", 4 * hidden)
        params = (sizes.get("vocab_size", 0) + sizes.get("max_position_embeddings", 0)) * hidden + \
            layers * (4 * hidden * hidden + 2 * hidden * inner)
        memory = physical_memory_bytes()
        if params * 4 > memory:
            raise TqcError(f"{where}: about {params:.3g} parameters ({_human(params * 4)} in FP32), more than this "
                           f"machine's memory ({_human(memory)})")
