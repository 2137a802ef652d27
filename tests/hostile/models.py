"""Tiny synthetic models for the hostile-input matrix: a token model with embedding tables, and broken
variants of the conftest MLP (each a few hundred bytes to a few kB, built in milliseconds)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import make_mlp


def make_token_model(path: Path | None = None, vocab: int = 50, positions: int = 16, types: int = 2,
                     hidden: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A BERT-like embedding block and one MatMul, with the tables tqc derives data limits from:

        input_ids ─► Gather(word_embeddings [vocab, H]) ─┐
        token_type_ids ─► Gather(token_type [types, H]) ─┼─ Add ─► * mask ─► MatMul(W) ─► y [B, S, H]
        Slice(position_ids [1, P], 0, S) ─► Gather(position_embeddings [P, H]) ─┘
    """
    rng = np.random.default_rng(seed)
    tensors = {
        "embeddings.word_embeddings.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "embeddings.token_type_embeddings.weight": rng.standard_normal((types, hidden)).astype(np.float32),
        "embeddings.position_embeddings.weight": rng.standard_normal((positions, hidden)).astype(np.float32),
        "embeddings.position_ids": np.arange(positions, dtype=np.int64)[None, :],
        "w": rng.standard_normal((hidden, hidden)).astype(np.float32),
        "one": np.array(1, np.int64), "zero": np.array([0], np.int64), "axis0": np.array([0], np.int64),
        "axis1": np.array([1], np.int64), "last": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embeddings.word_embeddings.weight", "input_ids"], ["words"], name="word_gather"),
        helper.make_node("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"], ["types"],
                         name="type_gather"),
        helper.make_node("Shape", ["input_ids"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["seq"], name="seq", axis=0),
        helper.make_node("Unsqueeze", ["seq", "axis0"], ["seq1"], name="seq1"),
        helper.make_node("Slice", ["embeddings.position_ids", "zero", "seq1", "axis1"], ["pos_idx"], name="slice"),
        helper.make_node("Gather", ["embeddings.position_embeddings.weight", "pos_idx"], ["positions"],
                         name="position_gather"),
        helper.make_node("Add", ["words", "types"], ["sum1"], name="add1"),
        helper.make_node("Add", ["sum1", "positions"], ["sum2"], name="add2"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"], name="mask3"),
        helper.make_node("Mul", ["sum2", "mask3"], ["masked"], name="mul"),
        helper.make_node("MatMul", ["masked", "w"], ["y"], name="mm"),
    ]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "tokens", ints,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


def _write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _external(folder: Path, name: str, location_of=lambda i: None, truncate: int | None = None) -> Path:
    """The MLP with every initializer in ``<name>.data``; ``location_of(i)`` may rewrite locations."""
    path = folder / name
    model = make_mlp()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".data",
              size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for i, tensor in enumerate(model.graph.initializer):
        location = location_of(i)
        if location is not None:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    _write(model, path)
    if truncate is not None:
        data = folder / (name + ".data")
        data.write_bytes(data.read_bytes()[:truncate])
    return path


def broken_model(kind: str, folder: Path) -> Path:
    """``folder/<kind>.onnx``, broken as ``kind`` says (see ``BROKEN``)."""
    path = folder / f"{kind}.onnx"
    model = make_mlp(hidden=8 if kind != "short_raw_large" else 300)
    g = model.graph
    if kind == "cycle":  # relu reads the identity's output, which reads relu's
        next(n for n in g.node if n.name == "relu").input[0] = "h3"
    elif kind == "duplicate_output":
        g.node.append(helper.make_node("Relu", ["x"], ["h1"], name="dup"))
    elif kind == "undefined_tensor":
        next(n for n in g.node if n.name == "mm2").input[0] = "ghost"
    elif kind == "undefined_output":
        g.output.append(helper.make_tensor_value_info("nowhere", TensorProto.FLOAT, ["batch", 3]))
    elif kind in ("short_raw_small", "short_raw_large"):
        g.initializer[0].raw_data = g.initializer[0].raw_data[:-8]
    elif kind == "absurd_input_dims":
        g.input[0].type.tensor_type.shape.dim[0].dim_value = 10**9
        g.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
        g.input[0].type.tensor_type.shape.dim[1].dim_value = 10**9
    elif kind == "absurd_initializer_dims":
        del g.initializer[3].dims[:]
        g.initializer[3].dims.extend([10**7, 10**7])
    elif kind == "negative_dims":
        del g.initializer[3].dims[:]
        g.initializer[3].dims.extend([-8, 3])
    elif kind == "duplicate_initializer":
        g.initializer.append(numpy_helper.from_array(np.zeros((8,), np.float32), "b"))
    elif kind == "unsorted":  # acyclic, but a node before its producer: the ONNX spec requires order
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(reversed(nodes))
    elif kind == "type_mismatch":  # MatMul of float and int64: strict shape inference refuses it
        g.initializer[3].CopyFrom(numpy_helper.from_array(np.ones((8, 3), np.int64), "w2"))
    elif kind == "external_parent":
        (folder.parent / "outside.bin").write_bytes(b"\0" * 4096)
        return _external(folder, path.name, lambda i: "../outside.bin")
    elif kind == "external_absolute":
        (folder.parent / "outside.bin").write_bytes(b"\0" * 4096)
        return _external(folder, path.name, lambda i: str(folder.parent / "outside.bin"))
    elif kind == "external_symlink":
        (folder.parent / "outside.bin").write_bytes(b"\0" * 4096)
        os.symlink(folder.parent / "outside.bin", folder / "link.bin")
        return _external(folder, path.name, lambda i: "link.bin")
    elif kind == "external_short":
        return _external(folder, path.name, truncate=100)
    elif kind == "external_missing":
        return _external(folder, path.name, lambda i: "nope.bin")
    elif kind == "external_fifo":
        os.mkfifo(folder / "fifo.bin")
        return _external(folder, path.name, lambda i: "fifo.bin")
    elif kind == "truncated":
        path.write_bytes(model.SerializeToString()[:-37])
        return path
    elif kind == "empty":
        path.write_bytes(b"")
        return path
    elif kind == "not_protobuf":
        path.write_text("this is not an ONNX model\n" * 20)
        return path
    else:  # pragma: no cover
        raise ValueError(kind)
    return _write(model, path)


# kind -> words one of which the error line holds
BROKEN = {
    "cycle": ("cycle",),
    "duplicate_output": ("assigned twice",),
    "undefined_tensor": ("defines",),
    "undefined_output": ("not produced",),
    "short_raw_small": ("bytes of data",),
    "short_raw_large": ("bytes of data",),
    "absurd_input_dims": ("memory",),
    "absurd_initializer_dims": ("memory",),
    "negative_dims": ("negative",),
    "type_mismatch": ("checker",),
    "duplicate_initializer": ("defined twice",),
    "unsorted": ("topologically sorted",),
    "external_parent": ("outside the model's folder",),
    "external_absolute": ("absolute", "outside the model's folder"),
    "external_symlink": ("outside the model's folder",),
    "external_short": ("ends before", "needs bytes"),
    "external_missing": ("missing",),
    "external_fifo": ("not a regular file",),
    "truncated": ("not a readable onnx model", "invalid"),
    "empty": ("not a readable onnx model",),
    "not_protobuf": ("not a readable onnx model",),
}
