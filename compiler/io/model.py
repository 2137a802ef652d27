"""Loading and saving ONNX models safely.

* ``load_model`` checks the path first (missing, a directory, not ONNX) and loads external data that sits
  next to the model.
* ``save_model`` writes atomically through ``tqc.compiler.io.output_guard`` (a temporary file in the destination
  folder, fsync, mode 0666 & ~umask, then ``os.replace``, or staged until the command commits); models
  whose tensors exceed the 2 GB protobuf limit go to one external data file ``<name>.data`` beside them.
  Serialization is deterministic, so compiling the same input twice gives byte-identical files.
* ``model_hash`` hashes the file and its external data, for reports, calibration tables and plan metadata.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from tqc.compiler.core.errors import TqcError

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
    """Fail before any work when the output cannot be written or would overwrite an input (a model's external
    data files count as the model); see ``tqc.compiler.io.output_guard`` for the checks."""
    from tqc.compiler.io.output_guard import OutputGuard

    guard = OutputGuard("check")
    for inp in inputs:
        if str(inp).endswith((".onnx", ".plan")):
            guard.reads_model(inp)
        else:
            guard.reads(inp, "an input")
    return guard.writes(path, "output")


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    p = check_input_path(path)
    from tqc.compiler.io.model_check import refuse_openvino_ir

    refuse_openvino_ir(p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise TqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not model.graph.node and not model.graph.output:
        raise TqcError(f"'{p}' is not a readable ONNX model (no graph)")
    from tqc.compiler.io.model_check import check_external_data, raw_data_lengths, validate_model

    check_external_data(model, p)  # before anything follows a location: inside the folder, regular, long enough
    external = {t.name for t in model.graph.initializer if uses_external_data(t)}
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
    validate_model(model, p, raw_lengths=raw_data_lengths(p), external=external)
    return model


def load_model_lean(path: str | os.PathLike, weights: bool = True):
    """``load_model`` for a model that is only compiled: a skeleton plus weights read straight into numpy
    arrays (see ``tqc.compiler.io.lean``), the weights held once instead of three times. ``weights=False``:
    the skeleton alone, checked the same way (the weights are loaded later, e.g. one model at a time)."""
    from tqc.compiler.io.lean import load_lean

    p = check_input_path(path)
    from tqc.compiler.io.model_check import InvalidModelError, refuse_openvino_ir, validate_model

    refuse_openvino_ir(p)
    try:
        lean = load_lean(p, weights=weights)
    except InvalidModelError:
        raise
    except TqcError as exc:  # external data outside the folder, missing or short: the model is invalid
        reason = str(exc).removeprefix(f"'{p}': ").removeprefix(f"'{p}' ")
        raise InvalidModelError(p, reason) from None
    except (DecodeError, ValueError, IndexError, RuntimeError, OSError) as exc:
        raise TqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not lean.skeleton.graph.node and not lean.skeleton.graph.output:
        raise TqcError(f"'{p}' is not a readable ONNX model (no graph)")
    validate_model(lean.skeleton, p)
    return lean


def external_locations(model: onnx.ModelProto) -> list[str]:
    return sorted({ExternalDataInfo(t).location for t in _external_tensors(model)})


def _external_tensors(model: onnx.ModelProto):
    """Every tensor stored outside the file: initializers, Constant values, subgraph bodies' tensors."""
    from tqc.compiler.io.model_check import all_tensors

    for tensor, _ in all_tensors(model.graph):
        if uses_external_data(tensor):
            yield tensor


def needs_external_data(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except EncodeError:  # upb's ByteSize serializes the message and refuses above 2 GB: certainly over
        return True


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def save_model(model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` (a ModelProto or a ``LeanModel``) to ``path`` atomically; nothing is left behind on
    failure. A ``LeanModel`` is written straight from its arrays (``tqc.compiler.io.lean.write_lean``).

    Through ``tqc.compiler.io.output_guard``: temp files in the destination folder, fsync, mode 0666 & ~umask;
    when the running command declared ``path`` as an output, the files are renamed into place only when the
    command commits (model and external data together)."""
    from tqc.compiler.io.lean import LeanModel, write_lean
    from tqc.compiler.io.output_guard import atomic_write, make_temp_dir, move_beside, place_file

    out = Path(path)
    lean = model if isinstance(model, LeanModel) else None
    if external_data is not None:
        external = external_data
    elif lean is not None:
        external = lean.nbytes() + lean.skeleton.ByteSize() > EXTERNAL_DATA_THRESHOLD
    else:
        external = needs_external_data(model)
    if not external:
        if lean is not None:
            return atomic_write(out, lambda fh: write_lean(lean, fh))
        return atomic_write(out, lambda fh: fh.write(serialize(model)))
    from tqc.compiler.io.output_guard import refuse_special, remove_if_present, release_temp

    refuse_special(out)
    out = Path(os.path.realpath(out))  # a symlink is followed (as atomic_write does)
    data_name = out.name + ".data"
    folder = out.parent
    refuse_special(folder / data_name, "external-data output")
    tmp_dir = None
    try:
        # Written under their final names in a temp folder (the model names its data file), then moved next
        # to the destination as temp files and placed (or staged) together.
        tmp_dir = make_temp_dir(".tqc-", dir=folder)
        if lean is not None:
            with open(tmp_dir / out.name, "wb") as fh, open(tmp_dir / data_name, "wb") as data_fh:
                write_lean(lean, fh, external_data=data_name, data_out=data_fh)
                for f in (fh, data_fh):
                    f.flush()
                    os.fsync(f.fileno())
        else:
            _save_external(model, tmp_dir / out.name, data_name)
        moved = [(move_beside(tmp_dir / name, folder / name), folder / name) for name in (data_name, out.name)]
        for tmp, final in moved:
            place_file(tmp, final)
    except OSError as exc:
        raise TqcError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        if tmp_dir is not None:
            remove_if_present(str(tmp_dir))
            release_temp(tmp_dir)
    return Path(path)


def _save_external(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024, convert_attribute=True)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """``data`` to ``path`` atomically (see ``tqc.compiler.io.output_guard.atomic_write``)."""
    from tqc.compiler.io.output_guard import atomic_write

    return atomic_write(path, lambda fh: fh.write(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode(), path)


def model_hash(path: str | os.PathLike) -> str:
    """sha256 over the model file and, in sorted order, the external data files it names."""
    return model_hash_async(path)()


def model_hash_async(path: str | os.PathLike):
    """Start ``model_hash`` in a thread (file reads and hashlib release the GIL, so it overlaps loading);
    call the returned function for the hash. Give it the external-data locations when the model is loaded
    already (``LeanModel.external_locations``): the file is then not parsed a second time to find them."""
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

    def finish(locations: list[str] | None = None) -> str:
        thread.join()
        if failure:
            raise TqcError(f"cannot read '{p}': {failure[0].strerror or failure[0]}")
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
