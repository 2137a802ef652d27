"""Lean load/save: the skeleton + arrays path that ``compile`` uses must equal onnx's own load and save."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tqc.compiler.io import model as model_io
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.graph import lean_of_graph, to_graph, to_model
from tqc.compiler.io.lean import LeanModel
from tqc.compiler.io.skeleton import SKELETON_DATA

from tests.conftest import make_mlp


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("external", [False, True])
def test_lean_load_equals_onnx_load(tmp_path, external):
    path = model_io.save_model(make_mlp(hidden=512), tmp_path / "m.onnx", external_data=external)
    lean = model_io.load_model_lean(path)
    full = model_io.load_model(path)
    # Inline, the bias (2 kB) stays in the skeleton; every tensor in an external file is read as an array.
    assert set(lean.weights) == ({"wa", "wb", "w2", "b"} if external else {"wa", "wb", "w2"})
    stand_ins = {t.name for t in lean.skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert stand_ins == set(lean.weights)
    assert all(t.external_data[0].value == SKELETON_DATA for t in lean.skeleton.graph.initializer if t.name in stand_ins)
    expected = _initializers(full)
    for name, array in lean.weights.items():
        assert array.dtype == expected[name].dtype
        np.testing.assert_array_equal(array, expected[name])
    assert list(lean.skeleton.graph.node) == list(full.graph.node)
    assert lean.skeleton.ByteSize() < 4096
    assert lean.external_locations == (["m.onnx.data"] if external else [])
    # weights=False: the same skeleton, checked the same way, and not a byte of the weights read.
    bare = model_io.load_model_lean(path, weights=False)
    assert bare.weights == {} and bare.skeleton == lean.skeleton
    assert bare.external_locations == lean.external_locations


@pytest.mark.parametrize("external", [False, True])
def test_lean_save_round_trips_and_runs(tmp_path, external):
    model = make_mlp(hidden=512)
    graph = to_graph(model)
    lean = lean_of_graph(graph, like=model)
    assert set(lean.weights) == {"wa", "wb", "w2"}
    out = model_io.save_model(lean, tmp_path / "lean.onnx", external_data=external)
    assert (tmp_path / "lean.onnx.data").exists() == external
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["lean.onnx"] + (["lean.onnx.data"] if external else []))
    loaded = model_io.load_model(out)
    onnx.checker.check_model(loaded)
    reference = to_model(to_graph(model), like=model)
    assert _initializers(loaded).keys() == _initializers(reference).keys()
    for name, array in _initializers(reference).items():
        np.testing.assert_array_equal(_initializers(loaded)[name], array)
    assert list(loaded.graph.node) == list(reference.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    again = model_io.save_model(lean, tmp_path / "again.onnx", external_data=False)
    if not external:
        assert again.read_bytes() == out.read_bytes()  # deterministic


def test_lean_load_then_save_keeps_every_weight(tmp_path):
    path = model_io.save_model(make_mlp(hidden=512), tmp_path / "m.onnx")
    lean = model_io.load_model_lean(path)
    graph = to_graph(lean.skeleton, lean.weights)
    out = model_io.save_model(lean_of_graph(graph, like=lean.skeleton), tmp_path / "copy.onnx")
    for name, array in _initializers(model_io.load_model(path)).items():
        np.testing.assert_array_equal(_initializers(model_io.load_model(out))[name], array)


def test_external_lean_save_aligns_offsets(tmp_path):
    lean = lean_of_graph(to_graph(make_mlp(hidden=300)))
    out = model_io.save_model(lean, tmp_path / "e.onnx", external_data=True)
    offsets = [int(dict((e.key, e.value) for e in t.external_data)["offset"])
               for t in onnx.load(str(out), load_external_data=False).graph.initializer if t.external_data]
    assert offsets == [0, 8192]  # wa and wb (4800 bytes each) at 4096-byte aligned offsets


@pytest.mark.parametrize("content", [b"not a model at all", b"", b"\x0f\xff\xff"])
def test_lean_load_of_corrupt_files_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(TqcError, match="not a readable ONNX model"):
        model_io.load_model_lean(path)


def test_lean_load_of_truncated_model(tmp_path):
    data = make_mlp(hidden=512).SerializeToString()
    for cut in (len(data) // 2, len(data) - 10):
        path = tmp_path / f"trunc{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(TqcError, match="not a readable ONNX model"):
            model_io.load_model_lean(path)


def test_lean_load_names_missing_external_data(tmp_path):
    model_io.save_model(make_mlp(hidden=512), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(TqcError, match="missing next to the model"):
        model_io.load_model_lean(tmp_path / "ext.onnx")


def test_plain_model_as_lean_model_saves_as_is(tmp_path):
    model = make_mlp()
    out = model_io.save_model(LeanModel(model), tmp_path / "plain.onnx")
    assert out.read_bytes() == model.SerializeToString(deterministic=True)


def test_async_hash_equals_hash(tmp_path):
    path = model_io.save_model(make_mlp(hidden=512), tmp_path / "ext.onnx", external_data=True)
    import hashlib

    digest = hashlib.sha256(path.read_bytes() + (tmp_path / "ext.onnx.data").read_bytes()).hexdigest()
    assert model_io.model_hash_async(path)() == model_io.model_hash(path) == "sha256:" + digest


def test_lean_save_refuses_a_stand_in_without_data(tmp_path):
    lean = lean_of_graph(to_graph(make_mlp(hidden=512)))
    del lean.weights["wa"]
    with pytest.raises(TqcError, match="no data for initializer 'wa'"):
        model_io.save_model(lean, tmp_path / "broken.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_lean_load_refuses_external_data_outside_the_model_folder(tmp_path):
    model = make_mlp(hidden=512)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 8192)
    inner = tmp_path / "models"
    inner.mkdir()
    for tensor in model.graph.initializer:
        if tensor.name == "wa":
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "../secret.bin"
    onnx.save(model, str(inner / "m.onnx"))
    with pytest.raises(TqcError, match="outside the model's folder"):
        model_io.load_model_lean(inner / "m.onnx")
