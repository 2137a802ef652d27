"""Calibration data sources and their errors, the streamed statistics and every range method."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
from tqc.compiler.analysis.calibration import (BINS, CalibrationTable, calibrate, calibration_targets, entropy_amax,
                                      mse_amax)
from tqc.compiler.cli.main import main
from tqc.compiler.core.errors import TqcError

from tests.conftest import make_mlp


def npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def mlp_data(n=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def folded(model):
    from tqc.compiler.pipeline.manager import PassManager
    from tqc.passes.fold import Fold

    return PassManager([Fold()]).run(model)


def test_ranges_match_numpy_and_memory_is_bounded(tmp_path):
    model = folded(make_mlp(with_identity=False))
    x = mlp_data(64)
    source = FeedSource(DataSpec(npz(tmp_path, x=x), batch_size=8), model)
    targets = calibration_targets(model)
    assert targets == ["x", "h3"]  # the MatMul activations: the graph input and the second ReLU
    table = calibrate(model, source, targets)
    assert table.samples == 64
    # h3 = relu(relu(x @ (wa + wb) + b)): recompute in numpy
    init = {t.name: t for t in make_mlp(with_identity=False).graph.initializer}
    from onnx import numpy_helper

    w1 = numpy_helper.to_array(init["wa"]) + numpy_helper.to_array(init["wb"])
    h = np.maximum(np.maximum(x @ w1 + numpy_helper.to_array(init["b"]), 0), 0)
    assert all(len(np.asarray(r.channel_max)) <= 8 for r in table.tensors.values())  # per channel, not per sample
    assert table.tensors["h3"].max == pytest.approx(float(h.max()), rel=1e-5)
    assert table.tensors["h3"].min == pytest.approx(0.0)
    assert table.tensors["x"].min == pytest.approx(float(x.min()))
    assert table.tensors["x"].channel_max == pytest.approx(x.max(axis=0).tolist(), rel=1e-5)
    # Symmetric ranges never exceed the observed |x|; percentiles are ordered.
    r = table.tensors["x"]
    bound = max(abs(r.min), abs(r.max))
    assert r.amax["max"] == pytest.approx(bound)
    assert r.amax["percentile:99.9"] <= r.amax["percentile:99.99"] <= r.amax["percentile:99.999"] <= bound + 1e-9
    assert 0 < r.amax["entropy"] <= bound and 0 < r.amax["mse"] <= bound


def test_table_round_trip(tmp_path):
    model = make_mlp()
    table = calibrate(model, FeedSource(DataSpec(npz(tmp_path, x=mlp_data())), model), calibration_targets(model))
    table.save(tmp_path / "t.json")
    loaded = CalibrationTable.load(tmp_path / "t.json")
    assert loaded.tensors.keys() == table.tensors.keys()
    assert loaded.tensors["x"].amax == table.tensors["x"].amax
    assert json.loads((tmp_path / "t.json").read_text())["format"] == "tqc-calibration/1"


def test_methods_on_known_distributions():
    # |x| uniform on [0, 1]: nothing to clip, every method keeps (nearly) the whole range.
    hist = np.full(BINS // 2, 100, np.int64)
    assert mse_amax(hist, 1.0) > 0.9
    assert entropy_amax(hist, 1.0) > 0.9
    # A half-Gaussian bulk (sigma: 5% of the range) with rare far outliers: both clip well below them.
    bins = np.arange(BINS // 2)
    hist = (1e6 * np.exp(-(bins / 100.0) ** 2)).astype(np.int64)
    hist[1900:] += 1
    assert 5.0 < entropy_amax(hist, 100.0) < 30.0
    assert 5.0 < mse_amax(hist, 100.0) < 30.0


def test_polygraphy_json_and_script_sources(tmp_path):
    from polygraphy.json import save_json

    model = make_mlp()
    feeds = [{"x": mlp_data(4, seed=i)} for i in range(3)]
    save_json(feeds, str(tmp_path / "inputs.json"))
    source = FeedSource(DataSpec(str(tmp_path / "inputs.json")), model)
    assert sum(f["x"].shape[0] for f in source) == 12
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n"
                      "def load():\n"
                      "    for i in range(2):\n"
                      "        yield {'x': np.ones((3, 4), np.float32) * i}\n")
    source = FeedSource(DataSpec(f"{script}:load"), model)
    assert [f["x"][0, 0] for f in source] == [0.0, 1.0]


def test_text_source_with_tokenizer(exports):
    from tqc.compiler.io.model import load_model

    model = load_model(exports.get("minilm"))
    shipped = Path(__file__).resolve().parents[3] / "models" / "data" / "calib_sentences.txt"
    source = FeedSource(DataSpec(str(shipped), samples=16, batch_size=8), model)  # tokenizer from metadata
    feeds = list(source)
    assert len(feeds) == 2 and set(feeds[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds[0]["input_ids"].dtype == np.int64 and feeds[0]["input_ids"][0, 0] == 101  # [CLS]


@pytest.mark.parametrize("case, message", [
    ("wrong_name", "no data for model input 'x' (data has y)"),
    ("extra_name", "'z' is not an input of the model"),
    ("dtype", "input 'x' is <U1, the model expects float32"),
    ("rank", "input 'x' has rank 3, the model expects rank 2"),
    ("size", "input 'x' has size 5 on axis 1, the model expects 4"),
    ("nan", "input 'x' holds NaN or infinite values"),
    ("empty", "holds no samples"),
    ("missing", "does not exist"),
    ("suffix", "unknown format"),
    ("not_npz", "is not a readable .npz file"),
])
def test_bad_calibration_data(case, message, tmp_path):
    model = make_mlp()
    x = mlp_data(8)
    if case == "wrong_name":
        path = npz(tmp_path, y=x)
    elif case == "extra_name":
        path = npz(tmp_path, x=x, z=x)
    elif case == "dtype":
        path = npz(tmp_path, x=np.array([["a"] * 4] * 2))
    elif case == "rank":
        path = npz(tmp_path, x=x[:, :, None])
    elif case == "size":
        path = npz(tmp_path, x=np.zeros((8, 5), np.float32))
    elif case == "nan":
        bad = x.copy()
        bad[3, 1] = np.nan
        path = npz(tmp_path, x=bad)
    elif case == "empty":
        path = npz(tmp_path, x=np.zeros((0, 4), np.float32))
    elif case == "missing":
        path = str(tmp_path / "nope.npz")
    elif case == "suffix":
        path = str(tmp_path / "data.csv")
        (tmp_path / "data.csv").write_text("1,2\n")
    else:
        path = str(tmp_path / "bad.npz")
        (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(TqcError) as info:
        list(FeedSource(DataSpec(path), model))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_calibration_is_one_line_exit_2(tmp_path, mlp_path, capsys):
    path = npz(tmp_path, y=mlp_data())
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(mlp_path), "-p", "fold,qdq", "-o", str(tmp_path / "o.onnx"), "--calib", path])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "no data for model input 'x'" in err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_calibrate_then_compile_with_table(tmp_path, capsys):
    mlp_path = tmp_path / "mlp.onnx"
    make_mlp(mlp_path, with_identity=False)  # fold keeps every tensor name the table was made on
    data = npz(tmp_path, x=mlp_data(32))
    with pytest.raises(SystemExit) as info:
        main(["-q", "calibrate", str(mlp_path), "--data", data, "-o", str(tmp_path / "t.json")])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(mlp_path), "-p", "fold,qdq", "-o", str(tmp_path / "q.onnx"),
              "--calib-table", str(tmp_path / "t.json"), "--verify", "numeric"])
    assert info.value.code == 0, capsys.readouterr().err
    assert "quantized_matmuls=2" in capsys.readouterr().out


def test_qdq_without_calibration_is_a_clear_error(tmp_path, mlp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(mlp_path), "-p", "qdq", "-o", str(tmp_path / "q.onnx")])
    assert info.value.code == 2 and "requires calibration data" in capsys.readouterr().err


def test_infinite_mask_values_leave_finite_ranges(tmp_path):
    """An additive mask of finfo.min plus a score overflows to -inf in float32; `tqc calibrate` on a raw
    export observes such tensors and must still give finite ranges for every method."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["masked"]), helper.make_node("MatMul", ["masked", "w"], ["y"])],
        "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
                   helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = mlp_data(8)
    mask = np.zeros_like(x)
    mask[:, -1] = np.finfo(np.float32).min
    mask[0, -1] = -np.inf
    feeds = [{"x": x, "mask": mask}]
    table = calibrate(model, feeds, ["x", "mask", "masked"])
    for name in ("mask", "masked"):
        r = table.tensors[name]
        assert np.isfinite(r.min) and np.isfinite(r.max)
        assert all(np.isfinite(v) for v in r.amax.values())
    assert table.tensors["masked"].channel_min is None  # per-channel ranges only from all-finite batches
    assert table.tensors["x"].max == pytest.approx(float(x.max()))


def test_cli_calibrate_on_a_raw_export_then_compile(exports, tmp_path, capsys):
    """The raw export (mask Adds, every residual) calibrates, and its table drives fold,fuse,qdq."""
    from tqc.compiler.runtime.feeds import synthesize_feeds
    from tqc.compiler.io.model import load_model

    path = exports.get("bert", size="tiny")
    feeds = synthesize_feeds(load_model(path), count=2)
    data = npz(tmp_path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    table = tmp_path / "t.json"
    with pytest.raises(SystemExit) as info:
        main(["-q", "calibrate", str(path), "--data", data, "-o", str(table)])
    assert info.value.code == 0, capsys.readouterr().err
    ranges = json.loads(table.read_text())["tensors"]
    assert all(np.isfinite(r["min"]) and np.isfinite(r["max"]) for r in ranges.values())
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(path), "-p", "fold,fuse,qdq", "--target", "ort-cpu", "-o", str(tmp_path / "q.onnx"),
              "--calib-table", str(table), "--verify", "numeric"])
    assert info.value.code == 0, capsys.readouterr().err
    assert "qattention=2" in capsys.readouterr().out


def test_any_percentile_in_range_is_measured_with_calibration_data(tmp_path, capsys):
    """qdq{percentile} accepts [90, 100]: with --calib the asked percentile is measured (it was refused unless it
    was one of the table's standard three); a table from tqc calibrate holds those three only."""
    model = folded(make_mlp(with_identity=False))
    x = mlp_data(64)
    table = calibrate(model, FeedSource(DataSpec(npz(tmp_path, x=x)), model), calibration_targets(model),
                      percentiles=(95.0,))
    r = table.tensors["x"]
    assert r.amax["percentile:95"] <= r.amax["percentile:99.9"]
    # 95% of |x| lie at or below it, and not already one histogram bin lower
    bin_width = 2 * max(abs(r.min), abs(r.max)) / BINS
    assert np.mean(np.abs(x) <= r.amax["percentile:95"] + 1e-6) >= 0.95
    assert np.mean(np.abs(x) <= r.amax["percentile:95"] - bin_width) < 0.95
    mlp_path = tmp_path / "mlp.onnx"
    make_mlp(mlp_path, with_identity=False)
    with pytest.raises(SystemExit) as info:
        main(["-q", "compile", str(mlp_path), "-p", "fold,qdq{method=percentile,percentile=95}", "-o",
              str(tmp_path / "q.onnx"), "--calib", npz(tmp_path, x=mlp_data(32)), "--verify", "numeric"])
    assert info.value.code == 0, capsys.readouterr().err
    assert "method=percentile:95," in capsys.readouterr().out


def masked_linear_model() -> onnx.ModelProto:
    """x [b, 4, 6] -> MatMul(W) -> y, and the attention mask [b, 4] as a second input (zeroing y's padding)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
             helper.make_node("Mul", ["h", "m3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 6]),
                                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                                         ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 3])],
                              initializer=[numpy_helper.from_array(weight, "w"),
                                           numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_real_token_channel_ranges_leave_the_padding_out_and_survive_the_table(tmp_path):
    rng = np.random.default_rng(1)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.int64)
    feeds = []
    for _ in range(3):
        x = rng.standard_normal((3, 4, 6)).astype(np.float32)
        x[mask == 0, 2] = 50.0  # padding positions: a large value in channel 2, as a padded row may hold
        feeds.append({"x": x, "attention_mask": mask})
    table = calibrate(masked_linear_model(), feeds, ["x"], histograms=False)
    entry = table.tensors["x"]
    every = np.concatenate([f["x"].reshape(-1, 6) for f in feeds])
    real = np.concatenate([f["x"][mask == 1] for f in feeds])
    np.testing.assert_allclose(entry.channel_max, every.max(axis=0), rtol=1e-5)  # every position, as before
    np.testing.assert_allclose(entry.real_channel_max, real.max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(entry.real_channel_min, real.min(axis=0), rtol=1e-5)
    assert entry.channel_max[2] == 50.0 and entry.real_channel_max[2] < 5.0
    table.save(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert "attention mask" in data["coverage"]["real_channel_min/max"]
    loaded = CalibrationTable.load(tmp_path / "t.json").tensors["x"]
    assert loaded.real_channel_max == entry.real_channel_max and loaded.channel_max == entry.channel_max
    # A table written before the real-token ranges (no such keys) still loads, without them
    for value in data["tensors"].values():
        del value["real_channel_min"], value["real_channel_max"]
    del data["coverage"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = CalibrationTable.load(tmp_path / "old.json").tensors["x"]
    assert old.real_channel_min is None and old.channel_max == entry.channel_max
    # Without a mask there are no real-token ranges to give
    unmasked = calibrate(make_mlp(), [{"x": mlp_data()}], ["x"], histograms=False).tensors["x"]
    assert unmasked.real_channel_min is None and unmasked.channel_min is not None


def test_a_real_token_range_list_of_the_wrong_length_is_refused_in_one_line(tmp_path):
    feeds = [{"x": np.ones((1, 4, 6), np.float32), "attention_mask": np.array([[1, 1, 0, 0]], np.int64)}]
    calibrate(masked_linear_model(), feeds, ["x"], histograms=False).save(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    data["tensors"]["x"]["real_channel_max"] = [1.0]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(TqcError, match="'real_channel_min' and 'real_channel_max' must be non-empty lists of equal"):
        CalibrationTable.load(tmp_path / "bad.json")
