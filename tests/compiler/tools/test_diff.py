"""tqc diff: metrics against hand computations, name alignment across passes, first divergence, polygraphy."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tqc.compiler.runtime import compare
from tqc.compiler.cli.main import main
from tqc.compiler.analysis.sensitivity import op_class
from tqc.compiler.tools.diff import DiffResult, TensorRow, diff, drawn_inputs_note, sensitivity, shared_tensors
from tqc.compiler.tools.diff_plot import draw
from tqc.compiler.runtime.feeds import synthesize_feeds
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import load_model, save_model
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.passes.base import PassContext


def test_metrics_match_hand_computation():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    cand = np.array([1.0, 2.5, 3.0, 3.0])
    m = compare.tensor_metrics("t", ref, cand)  # cand - ref = [0, 0.5, 0, -1]
    assert m.max_abs == pytest.approx(1.0) and m.mean_abs == pytest.approx(1.5 / 4)
    assert m.rel_l2 == pytest.approx(math.sqrt(1.25) / math.sqrt(30))
    assert m.cosine == pytest.approx(float(ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))))
    assert m.sqnr_db == pytest.approx(10 * math.log10(30 / 1.25))
    same = compare.tensor_metrics("t", ref, ref)
    assert same.max_abs == 0 and math.isinf(same.sqnr_db) and same.as_dict()["sqnr_db"] == "inf"


def test_padding_rows_are_left_out():
    mask = np.array([[1, 1, 0]])
    ref = np.ones((1, 3, 2))
    cand = ref.copy()
    cand[0, 2] = 100.0  # garbage at the padded position
    assert compare.mask_padding(cand, mask)[0, 2].tolist() == [0, 0]
    m = compare.tensor_metrics("t", compare.mask_padding(ref, mask), compare.mask_padding(cand, mask))
    assert m.max_abs == 0


def compiled(model, pipeline, target, feeds):
    ctx = PassContext(target=target)
    ctx.calibration_source = feeds
    return PassManager(parse_pipeline(pipeline), ctx).run(model)


def test_names_line_up_across_fold_fuse_qdq(exports):
    path = exports.get("bert", size="tiny")
    reference = load_model(path)
    feeds = synthesize_feeds(reference, count=1)
    boundaries = [o.name for o in reference.graph.output]
    for pipeline, target in (("fold", "trt"), ("fold,fuse", "trt"), ("fold,fuse", "ort-cpu"),
                             ("fold,fuse,qdq", "trt"), ("fold,fuse,qdq", "ort-cpu")):
        candidate = compiled(load_model(path), pipeline, target, feeds)
        shared = shared_tensors(reference, candidate)
        assert set(boundaries) <= set(shared)
        # every layer's attention context and FFN output survive fusion by name
        contexts = [n for n in shared if n.endswith("attention/self/Reshape_4_output_0")]  # sdpa export
        ffn = [n for n in shared if n.endswith("output/dense/MatMul_output_0") and "attention" not in n]
        if pipeline != "fold,fuse,qdq":
            assert len(contexts) == 2 and len(ffn) == 2, (pipeline, target)
            continue
        # qdq changes what these hold, under new names the layerwise diff does not pair with the float ones: the
        # shift leaves the FFN output MatMul (x - z) W (its bias Add gives x W + b back); trt equalizes V
        # ((context - z) / e, value_equalize), ort-cpu folds the next layer's smoothing into QAttention
        # (context f + c, shift_fold)
        names = {o for n in candidate.graph.node for o in n.output}
        assert not contexts and not ffn, (pipeline, target)
        assert len([n for n in names if n.endswith("output/dense/MatMul_output_0_tqc_shifted") and
                    "attention" not in n]) == 2, (pipeline, target)
        suffix = "_tqc_veq" if target == "trt" else "_tqc_smoothed"
        assert len([n for n in names if n.endswith("Reshape_4_output_0" + suffix)]) == 2, (pipeline, target)


def test_first_divergence_names_the_corrupted_weight(exports, tmp_path):
    path = exports.get("bert", size="tiny")
    reference = compiled(load_model(path), "fold", "trt", None)
    broken = onnx.ModelProto()
    broken.CopyFrom(reference)
    target = next(n for n in broken.graph.node if n.op_type == "MatMul" and "layer.1/intermediate/dense" in n.name)
    weight = next(t for t in broken.graph.initializer if t.name == target.input[1])
    values = numpy_helper.to_array(weight).copy()
    values[3, :] *= 8.0  # one corrupted row
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    feeds = synthesize_feeds(reference, count=1)
    result, _, _ = diff(reference, broken, feeds, layerwise=True, threshold=0.01)
    assert result.first_divergence is not None
    assert result.first_divergence.producer == target.name
    before = [r for r in result.layers if r.index < result.first_divergence.index]
    assert before and all(r.metrics.max_abs == 0 for r in before)


def test_cli_diff_json_plot_and_polygraphy_agree(exports, tmp_path, capsys):
    path = exports.get("bert", size="tiny")
    fused, quant = tmp_path / "fused.onnx", tmp_path / "int8.onnx"
    feeds = synthesize_feeds(load_model(path), count=2)
    save_model(compiled(load_model(path), "fold,fuse", "trt", feeds), fused)
    # shift=false: with ort-cpu's default shift the INT8 graph, calibrated on these very 2 batches, comes within
    # 0.0011 of the reference on them, inside polygraphy's 1e-3 (abs or rel) below
    save_model(compiled(load_model(path), "fold,fuse,qdq{shift=false}", "ort-cpu", feeds), quant)
    with pytest.raises(SystemExit) as info:
        main(["-q", "diff", str(path), str(fused), str(quant), "--layerwise", "--threshold", "0.001",
              "--json", str(tmp_path / "d.json"),
              "--plot", str(tmp_path / "d.png"), "--save-dir", str(tmp_path / "pg")])
    out = capsys.readouterr().out
    assert info.value.code == 0
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["candidate"] for r in data["results"]] == [str(fused), str(quant)]
    fused_row = data["results"][0]["outputs"][0]
    assert set(fused_row) >= {"name", "max_abs", "mean_abs", "rel_l2", "cosine", "sqnr_db", "producer"}
    assert fused_row["max_abs"] < 1e-4 and data["results"][0]["first_divergence"] is None
    assert data["results"][1]["first_divergence"] is not None
    assert (tmp_path / "d.png").stat().st_size > 10_000
    # The printed polygraphy commands run, and agree: the fused graph passes at atol 1e-3, the INT8 one fails.
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("polygraphy run")]
    polygraphy = str(Path(sys.executable).parent / "polygraphy")
    subprocess.run([polygraphy] + shlex.split(commands[0])[1:], check=True, capture_output=True)
    check = shlex.split(commands[1])
    fused_run = subprocess.run([polygraphy] + [str(fused) if a == str(fused) else a for a in check[1:]],
                               capture_output=True, text=True)
    assert fused_run.returncode == 0, fused_run.stdout[-1500:]
    int8_args = [str(quant) if a == str(fused) else a for a in check[1:]]
    assert subprocess.run([polygraphy] + int8_args, capture_output=True).returncode != 0


def test_sensitivity_ranks_and_its_exclude_option_works(exports, tmp_path):
    path = exports.get("bert", size="tiny")
    reference = load_model(path)
    feeds = synthesize_feeds(reference, count=2)
    quant = compiled(load_model(path), "fold,fuse,qdq{smooth=0}", "ort-cpu", feeds)
    ranking = sensitivity(reference, quant, feeds)
    # 6 MatMuls (attention output, FFN up and down) and 2 QAttention (INT8 QKV), ranked by their Attention's name
    assert len(ranking["nodes"]) == 8 and ranking["classes"]
    assert sum(1 for r in ranking["nodes"] if r["node"].startswith("tqc_attn")) == 2
    removed = [r["error_removed"] for r in ranking["nodes"]]
    assert removed == sorted(removed, reverse=True)
    assert {op_class(n) for n in ranking["exclude"]} == {r["class"] for r in ranking["classes"]}
    # The option string goes straight into a pipeline and keeps those MatMuls in float.
    option = ranking["qdq_option"].replace("qdq{", "qdq{smooth=0,")
    ctx = PassContext(target="ort-cpu")
    ctx.calibration_source = feeds
    manager = PassManager(parse_pipeline(f"fold,fuse,{option}"), ctx)
    manager.run(load_model(path))
    stats = manager.records[-1].stats
    assert stats["quantized_matmuls"] + stats["qattention"] == 8 - 3  # quantized sites: MatMuls and QAttention


# ---------------------------------------------------------------- inputs note, plot, models over 2 GB

def test_cli_says_when_it_compares_on_random_token_ids(exports, tmp_path, capsys):
    path = exports.get("bert", size="tiny")
    with pytest.raises(SystemExit) as info:
        main(["-q", "diff", str(path), str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 0
    notes = [line for line in err.splitlines() if line.startswith("tqc: note: ")]
    assert len(notes) == 1
    assert "no --data: compared on 2 batches of random token ids, not text" in notes[0] and "input_ids 2x16" in notes[0]
    assert "--data sentences.txt --tokenizer FOLDER" in notes[0]  # this export records no tokenizer
    # Real inputs given: nothing to say.
    feeds = synthesize_feeds(load_model(path), count=1)
    np.savez(tmp_path / "inputs.npz", **feeds[0])
    with pytest.raises(SystemExit) as info:
        main(["-q", "diff", str(path), str(path), "--data", str(tmp_path / "inputs.npz")])
    assert info.value.code == 0 and "tqc: note" not in capsys.readouterr().err
    # A model that records its tokenizer needs only the text file.
    model = load_model(path)
    model.metadata_props.append(onnx.StringStringEntryProto(key="tqc.tokenizer", value="packaged:minilm"))
    note = drawn_inputs_note(model, synthesize_feeds(model, count=2))
    assert "--data sentences.txt (one text per line; the model records its tokenizer)" in note


def _row(name: str, index: int, sqnr: float) -> TensorRow:
    metrics = compare.TensorMetrics(name, [1], 0.0, 0.0, 10 ** (-sqnr / 20), 1.0, sqnr)
    return TensorRow(name, index, name, "MatMul", metrics)


def test_plot_names_the_tensors_and_keeps_outliers_on_the_edge():
    parts = ("attention/self/Reshape_4", "attention/output/dense/MatMul", "output/LayerNorm/LayerNormalization")
    names = ["/model/embeddings/LayerNorm/LayerNormalization_output_0"] + [
        f"/model/encoder/layer.{layer}/{part}_output_0" for layer in range(6) for part in parts] + ["last_hidden_state"]
    values = [135.3] + [16.0 + (i * 7) % 20 for i in range(18)] + [math.inf]  # 16..35 dB, one 135 dB, one exact
    result = DiffResult("int8.onnx", outputs=[], layers=[_row(n, 3 * i, v) for i, (n, v) in enumerate(zip(names, values))])
    fig = draw([result])
    import matplotlib.pyplot as plt

    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:3] == ["emb LayerNorm", "L0 attn/self/Reshape_4", "L0 attn/output/dense/MatMul"]
    assert labels[-1] == "last_hidden_state" and len(labels) == len(names)  # few tensors: every one named
    low, high = ax.get_ylim()
    assert low < 16.0 and 35.0 < high < 135.3  # the 135 dB point does not set the scale:
    assert (35.0 - 16.0) / (high - low) > 0.3  # the bulk fills a good part of the axis
    edge = [line for line in ax.lines if line.get_label() == "off scale (value written)"]
    assert len(edge) == 1 and list(edge[0].get_xdata()) == [0, len(names) - 1]
    assert all(y == high for y in edge[0].get_ydata())
    assert {"135 dB", "inf dB"} <= {t.get_text() for t in ax.texts}
    plt.close(fig)
    # A real model's hundreds of tensors: one tick per layer, named after it.
    many = [f"/model/encoder/layer.{layer}/{part}_{k}_output_0" for layer in range(24) for part in parts
            for k in range(2)]
    result = DiffResult("fp16.onnx", outputs=[], layers=[_row(n, i, 50.0 + i % 7) for i, n in enumerate(many)])
    fig = draw([result])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [f"L{layer}" for layer in range(24)]
    plt.close(fig)


def _model_over_2gb(folder: Path) -> tuple[Path, Path, int]:
    """Two models over protobuf's 2 GB sharing one external data file: y = sum_i(x @ W_i) + b, four
    [4096, 32768] float32 weights (zeros but their first 16 rows, so the file is sparse on disk); the
    candidate's bias differs by 1 %."""
    rows, cols, count = 4096, 32768, 4
    nbytes = rows * cols * 4
    rng = np.random.default_rng(0)
    with open(folder / "big.onnx.data", "wb") as data:
        for i in range(count):
            data.seek(i * nbytes)
            data.write(rng.standard_normal((16, cols)).astype(np.float32).tobytes())
        data.truncate(count * nbytes)
    weights = []
    for i in range(count):
        w = onnx.TensorProto(name=f"W{i}", data_type=onnx.TensorProto.FLOAT, dims=[rows, cols])
        w.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "big.onnx.data"), ("offset", str(i * nbytes)), ("length", str(nbytes))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        weights.append(w)
    bias = rng.standard_normal(cols).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"], name=f"mm{i}") for i in range(count)]
    nodes += [onnx.helper.make_node("Sum", [f"h{i}" for i in range(count)], ["s"], name="sum"),
              onnx.helper.make_node("Add", ["s", "b"], ["y"], name="add")]
    paths = []
    for name, b in (("big.onnx", bias), ("big_candidate.onnx", bias * 1.01)):
        graph = onnx.helper.make_graph(
            nodes, "big", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence", rows])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", cols])],
            initializer=weights + [numpy_helper.from_array(b, "b")])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        (folder / name).write_bytes(model.SerializeToString())
        paths.append(folder / name)
    return paths[0], paths[1], count * nbytes + cols * 4


@pytest.mark.slow  # about 15 s of CPU (2 GiB read twice, zeros from a sparse file), over 30 s on a busy machine
def test_layerwise_diff_of_a_model_over_2gb_holds_one_model_at_a_time(tmp_path):
    reference, candidate, weight_bytes = _model_over_2gb(tmp_path)
    assert weight_bytes > 2**31
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    tqc = [sys.executable, "-c", "import sys; from tqc.compiler.cli.main import main; sys.exit(main())"]
    try:
        run = subprocess.run([sys.executable, "-c", measure, *tqc, "-q", "diff", str(reference), str(candidate),
                              "--layerwise", "--json", str(tmp_path / "d.json")], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        peak = int(run.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss: KiB
        data = json.loads((tmp_path / "d.json").read_text())
    finally:
        for name in ("big.onnx", "big_candidate.onnx", "big.onnx.data"):
            (tmp_path / name).unlink(missing_ok=True)
    layers = {row["name"]: row for row in data["results"][0]["layers"]}
    assert set(layers) == {"h0", "h1", "h2", "h3", "s", "y"}
    assert all(layers[n]["max_abs"] == 0 for n in ("h0", "h1", "h2", "h3", "s"))  # the weights are shared
    assert 0 < layers["y"]["rel_l2"] < 0.05 and data["results"][0]["outputs"][0]["name"] == "y"
    # Both models' weights at once would be 4 GiB: one at a time, plus the interpreter and ORT.
    assert peak < 1.5 * weight_bytes, f"peak RSS {peak / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of weights"
