"""Loading and saving ONNX models safely.

* ``load_model`` checks the path first (missing, a directory, not ONNX) and loads external data that sits
  next to the model.
* ``save_model`` writes atomically: a temporary file in the destination folder, then ``os.replace``; models
  whose tensors exceed the 2 GB protobuf limit go to one external data file ``<name>.data`` beside them.
  Serialization is deterministic, so compiling the same input twice gives byte-identical files.
* ``model_hash`` hashes the file and its external data, for reports, calibration tables and plan metadata.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from tqc.compiler.errors import TqcError

PROTOBUF_LIMIT = 2**31 - 1
# Leave room for the graph structure next to the tensors.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def check_input_path(path: str | os.PathLike, what: str = "model") -> Path:
    p = Path(path)
    if not p.exists():
        raise TqcError(f"{what} '{p}' does not exist")
    if p.is_dir():
        raise TqcError(f"{what} '{p}' is a directory; expected an ONNX file")
    if not os.access(p, os.R_OK):
        raise TqcError(f"{what} '{p}' is not readable")
    return p


def check_output_path(path: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Fail before any work when the output cannot be written or would overwrite an input."""
    out = Path(path)
    if out.exists() and out.is_dir():
        raise TqcError(f"output '{out}' is a directory; expected a file path")
    for inp in inputs:
        ip = Path(inp)
        if out.resolve() == ip.resolve() or (out.exists() and ip.exists() and os.path.samefile(out, ip)):
            raise TqcError(f"output '{out}' is the input model; choose another output path")
    parent = out.resolve().parent
    if not parent.exists():
        raise TqcError(f"output folder '{parent}' does not exist")
    if out.exists() and not os.access(out, os.W_OK):
        raise TqcError(f"output '{out}' is not writable")
    try:  # a real probe: os.access says yes to root on read-only or virtual file systems
        with tempfile.NamedTemporaryFile(prefix=".tqc-probe-", dir=parent):
            pass
    except OSError as exc:
        raise TqcError(f"output folder '{parent}' is not writable ({exc.strerror or exc})") from None
    return out


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    p = check_input_path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise TqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not model.graph.node and not model.graph.output:
        raise TqcError(f"'{p}' is not a readable ONNX model (no graph)")
    _EXTERNAL_LOCATIONS[str(p.resolve())] = external_locations(model)
    if load_external_data:
        base = p.resolve().parent
        for tensor in _external_tensors(model):
            location = ExternalDataInfo(tensor).location
            if not (base / location).exists():
                raise TqcError(
                    f"'{p}' stores tensor '{tensor.name}' in '{location}', which is missing next to the model"
                )
        try:
            onnx.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise TqcError(f"cannot read the external data of '{p}': {exc}") from exc
    return model


def load_model_lean(path: str | os.PathLike):
    """``load_model`` for a model that is only compiled: a skeleton plus weights read straight into numpy
    arrays (see ``tqc.compiler.lean_io``), the weights held once instead of three times."""
    from tqc.compiler.lean_io import load_lean

    p = check_input_path(path)
    try:
        lean = load_lean(p)
    except TqcError:
        raise
    except (DecodeError, ValueError, IndexError, RuntimeError, OSError) as exc:
        raise TqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not lean.skeleton.graph.node and not lean.skeleton.graph.output:
        raise TqcError(f"'{p}' is not a readable ONNX model (no graph)")
    _EXTERNAL_LOCATIONS[str(p.resolve())] = lean.external_locations
    return lean


def external_locations(model: onnx.ModelProto) -> list[str]:
    return sorted({ExternalDataInfo(t).location for t in _external_tensors(model)})


def _external_tensors(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            yield tensor
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and uses_external_data(attr.t):
                yield attr.t


def needs_external_data(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except EncodeError:  # upb's ByteSize serializes the message and refuses above 2 GB: certainly over
        return True


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def save_model(model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` (a ModelProto or a ``LeanModel``) to ``path`` atomically; nothing is left behind on
    failure. A ``LeanModel`` is written straight from its arrays (``tqc.compiler.lean_io.write_lean``)."""
    from tqc.compiler.lean_io import LeanModel, write_lean

    out = Path(path)
    lean = model if isinstance(model, LeanModel) else None
    if external_data is not None:
        external = external_data
    elif lean is not None:
        external = lean.nbytes() + lean.skeleton.ByteSize() > EXTERNAL_DATA_THRESHOLD
    else:
        external = needs_external_data(model)
    folder = out.resolve().parent
    tmp_files: list[Path] = []
    try:
        if external:
            data_name = out.name + ".data"
            tmp_dir = Path(tempfile.mkdtemp(prefix=".tqc-", dir=folder))
            tmp_files.append(tmp_dir)
            if lean is not None:
                with open(tmp_dir / out.name, "wb") as fh, open(tmp_dir / data_name, "wb") as data_fh:
                    write_lean(lean, fh, external_data=data_name, data_out=data_fh)
            else:
                _save_external(model, tmp_dir / out.name, data_name)
            os.replace(tmp_dir / data_name, folder / data_name)
            os.replace(tmp_dir / out.name, out)
            tmp_dir.rmdir()
            tmp_files.clear()
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
            tmp_files.append(Path(tmp))
            with os.fdopen(fd, "wb") as fh:
                if lean is not None:
                    write_lean(lean, fh)
                else:
                    fh.write(serialize(model))
            os.replace(tmp, out)
            tmp_files.clear()
    except OSError as exc:
        raise TqcError(f"cannot write '{out}': {exc.strerror or exc}") from exc
    finally:
        for leftover in tmp_files:
            if leftover.is_dir():
                for f in leftover.iterdir():
                    f.unlink()
                leftover.rmdir()
            elif leftover.exists():
                leftover.unlink()
    return out


def _save_external(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024, convert_attribute=True)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise TqcError(f"cannot write '{out}': {exc.strerror or exc}") from exc
    return out


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode(), path)


_EXTERNAL_LOCATIONS: dict[str, list[str]] = {}  # filled by load_model: saves parsing a model twice to hash it


def model_hash(path: str | os.PathLike) -> str:
    """sha256 over the model file and, in sorted order, the external data files it names."""
    return model_hash_async(path)()


def model_hash_async(path: str | os.PathLike):
    """Start ``model_hash`` in a thread (file reads and hashlib release the GIL, so it overlaps loading);
    call the returned function for the hash."""
    p = Path(path)
    digest = hashlib.sha256()
    failure: list[OSError] = []

    def hash_main_file() -> None:
        try:
            _hash_file(p, digest)
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=hash_main_file, name="tqc-model-hash", daemon=True)
    thread.start()

    def finish() -> str:
        thread.join()
        if failure:
            raise TqcError(f"cannot read '{p}': {failure[0].strerror or failure[0]}")
        locations = _EXTERNAL_LOCATIONS.get(str(p.resolve()))
        if locations is None:
            locations = external_locations(onnx.load(str(p), load_external_data=False))
        for location in locations:
            _hash_file(p.resolve().parent / location, digest)
        return "sha256:" + digest.hexdigest()

    return finish


def structure_hash(model: onnx.ModelProto) -> str:
    """sha256 of a graph's structure (ops, tensor names, weight shapes), not of its weights' bytes.

    Identifies the graph a calibration table was computed on, cheaply, in memory or from a file alike.
    """
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(f"{node.domain}:{node.op_type}:{','.join(node.input)}>{','.join(node.output)};".encode())
    used = {name for node in model.graph.node for name in node.input}
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):  # as stored or as gs exports them
        if tensor.name in used:
            digest.update(f"{tensor.name}:{tensor.data_type}:{list(tensor.dims)};".encode())
    return "graph-sha256:" + digest.hexdigest()


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
