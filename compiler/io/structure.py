"""Structural checks run after every pass: onnx checker, strict shape inference, unchanged signature.

Models whose tensors exceed protobuf's 2 GB limit are checked through a temporary file with external data,
using the path-based checker and shape inference. ``float_tensor_types``: the element type of every tensor the
model's value infos, inputs and outputs declare (what exposing intermediates as outputs needs).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from tqc.compiler.core.errors import VerificationError
from tqc.compiler.io.skeleton import SKELETON_DATA, skeleton


@dataclass(frozen=True)
class Port:
    name: str
    elem_type: int
    rank: int | None

    def describe(self) -> str:
        dtype = onnx.helper.tensor_dtype_to_string(self.elem_type) if self.elem_type else "?"
        return f"{self.name} ({dtype.replace('TensorProto.', '').lower()}, rank {self.rank})"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]


def _port(value: onnx.ValueInfoProto) -> Port:
    tt = value.type.tensor_type
    rank = len(tt.shape.dim) if tt.HasField("shape") else None
    return Port(value.name, tt.elem_type, rank)


def signature(model: onnx.ModelProto) -> Signature:
    initializers = {t.name for t in model.graph.initializer}
    return Signature(
        inputs=tuple(_port(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(_port(v) for v in model.graph.output),
    )


def check_signature(before: Signature, after: Signature, stage: str) -> None:
    for kind, old, new in (("input", before.inputs, after.inputs), ("output", before.outputs, after.outputs)):
        if [p.name for p in old] != [p.name for p in new]:
            raise VerificationError(
                f"{stage}: graph {kind}s changed from {[p.name for p in old]} to {[p.name for p in new]}")
        for a, b in zip(old, new):
            if a.elem_type != b.elem_type or (a.rank is not None and b.rank is not None and a.rank != b.rank):
                raise VerificationError(f"{stage}: graph {kind} changed from {a.describe()} to {b.describe()}")


def changed_signature(before: Signature, after: Signature, removed: tuple[str, ...], added: tuple[str, ...],
                      stage: str) -> Signature:
    """The signature a pass that changes the graph's outputs promised: the outputs before less ``removed``, plus
    ``added`` (their ports as the graph declares them), in the graph's order. A graph whose outputs are not
    exactly these fails here; ``check_signature`` then holds the kept outputs to their types and ranks."""
    old = {p.name: p for p in before.outputs}
    unknown = [name for name in removed if name not in old]
    if unknown:
        raise VerificationError(f"{stage}: the pass removed output(s) {unknown} the graph did not have")
    wanted = sorted([name for name in old if name not in removed] + list(added))
    got = [p.name for p in after.outputs]
    if sorted(got) != wanted or len(set(got)) != len(got):
        raise VerificationError(f"{stage}: graph outputs are {got}; the pass declared {wanted}")
    new = {p.name: p for p in after.outputs}
    return Signature(before.inputs, tuple(new[name] if name in added else old[name] for name in got))


def infer_shapes(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """Shape inference on the skeleton; the inferred value_info is set on ``model`` (returned).

    With ``strict`` a type or shape conflict raises ``VerificationError``.
    """
    try:
        light = skeleton(model)
        inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=strict, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        if not strict:
            return model
        raise VerificationError(f"shape inference failed: {_first_line(exc)}") from exc
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def float_tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of every tensor whose type shape inference (or the graph) knows."""
    types: dict[str, int] = {}
    for value in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def run_checker(model: onnx.ModelProto) -> None:
    """The path-based onnx checker on the skeleton (works for models of any size)."""
    try:
        with tempfile.TemporaryDirectory(prefix="tqc-verify-") as tmp:
            (Path(tmp) / SKELETON_DATA).touch()
            path = Path(tmp) / "model.onnx"
            path.write_bytes(skeleton(model).SerializeToString())
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, RuntimeError) as exc:
        raise VerificationError(f"onnx checker: {_first_line(exc)}") from exc


def verify_structure(model: onnx.ModelProto, expected: Signature, stage: str) -> onnx.ModelProto:
    """Checker, strict shape inference and signature; returns the model with inferred shapes."""
    try:
        run_checker(model)
        inferred = infer_shapes(model, strict=True)
    except VerificationError as exc:
        raise VerificationError(f"{stage}: {exc}") from exc
    check_signature(expected, signature(model), stage)
    return inferred


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
