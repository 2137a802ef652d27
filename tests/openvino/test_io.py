"""OpenVINO IR output (``-o model.xml``), the runner behind ``bench``/``diff``/``--verify``, and the real MiniLM
compiled for OpenVINO judged on held-out sentences."""

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest

from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
from tqc.compiler.io.model import load_model

from ..conftest import CALIB_SENTENCES, HELDOUT_SENTENCES
from .test_placement import compile_cli, token_npz


def run_cli(args: list[str]) -> int:
    from tqc.compiler.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code


def test_missing_openvino_is_one_line_and_exit_2(mlp_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    out = tmp_path / "m.xml"
    assert run_cli(["-q", "compile", str(mlp_path), "-p", "fold", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tqc: error: OpenVINO is not installed")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
    assert run_cli(["-q", "bench", str(mlp_path), "--provider", "openvino", "--shapes", "1x4"]) == 2


ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tqc[openvino]')")


@pytest.fixture(scope="module")
def tiny_ir(exports, tmp_path_factory):
    source = exports.get("bert", size="tiny")
    folder = tmp_path_factory.mktemp("ir")
    xml = folder / "tiny.xml"
    compile_cli([str(source), "-p", "fold,fuse,qdq", "--target", "openvino", "--calib",
                 str(token_npz(source, folder / "calib.npz")), "-o", str(xml)])
    return source, folder, xml


def test_ir_written_atomically_with_metadata_reloaded_and_run(tiny_ir):
    from tqc.compiler.runtime.feeds import synthesize_feeds
    from tqc.compiler.io.openvino_ir import OvRunner

    source, folder, xml = tiny_ir
    assert sorted(p.name for p in folder.iterdir()) == ["calib.npz", "tiny.bin", "tiny.xml", "tiny.xml.json"]
    meta = json.loads((folder / "tiny.xml.json").read_text())
    assert meta["int8_matmuls"] == "12/16" and meta["source_model_hash"].startswith("sha256:")
    # the 8 linear layers (the packed QKV projection as three: qdq/openvino.unpack_qkv) run as u8 FullyConnected
    # on any x86-64 CPU; the 4 attention MatMuls in float, in OpenVINO's fused attention (a Subgraph on AMX CPUs)
    # at the engine's float precision
    nodes = meta["matmul_runtime_nodes"]
    assert nodes.pop("FullyConnected u8", 0) + nodes.pop("FullyConnected i8", 0) == 12 and sum(nodes.values()) == 4
    assert {node.split()[-1] for node in nodes} <= {"f32", "bf16"}
    assert [p["name"] for p in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    # reloaded by OpenVINO from disk and run: close to the FP32 export on ONNX Runtime
    feed = synthesize_feeds(load_model(source), count=1)[0]
    ref = ort.InferenceSession(str(source)).run(None, feed)[0]
    got = OvRunner(xml, threads=1).run(feed)[meta["outputs"][0]["name"]]
    assert got.shape == ref.shape
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.98


def test_bench_and_diff_run_on_openvino(tiny_ir, tmp_path, capsys):
    source, _, xml = tiny_ir
    report = tmp_path / "bench.json"
    assert run_cli(["-q", "bench", str(source), str(xml), "--provider", "openvino", "--shapes", "1x8", "--runs", "3",
                    "--warmup", "1", "--threads", "1", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["openvino", "openvino"] and all(r["median_ms"] > 0 for r in rows)
    # the precision column: what OpenVINO ran; the FP32 model at the engine's default float precision (bf16 on
    # CPUs with AMX / AVX512-BF16, f32 elsewhere), the INT8 IR's integer MatMuls and the rest at that precision
    default = ov.Core().compile_model(str(source), "CPU").get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert default in ("f32", "bf16", "f16")
    assert [r["precision"] for r in rows] == [default, f"int8 12/16 + {default}"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "shape", "precision"]
    assert table[1].split()[2] == default and table[2].split()[2:5] == ["int8", "12/16", "+"]
    # an IR without --provider openvino is refused, not run on something else
    assert run_cli(["-q", "bench", str(xml), "--shapes", "1x8"]) == 2
    # diff: the FP32 export itself on OpenVINO against the ORT reference is near exact
    out = tmp_path / "diff.json"
    assert run_cli(["-q", "diff", str(source), str(source), "--runtime", "openvino", "--json", str(out),
                    "--save-dir", str(tmp_path / "pg")]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["outputs"] and all(r["cosine"] > 0.99999 for r in result["outputs"])


def embeddings(run, feeds):
    out = []
    for feed in feeds:
        hidden = np.asarray(run(feed), np.float64)
        mask = feed["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


@pytest.mark.slow
def test_minilm_openvino_int8_ir_on_held_out_sentences(exports, tmp_path):
    """The real MiniLM: fold,fuse,qdq --target openvino -o .xml, run by OpenVINO, close to FP32 on held-out text,
    every MatMul in INT8 on OpenVINO's CPU plugin."""
    from tqc.compiler.io.openvino_ir import OvRunner

    path = exports.get("minilm")
    xml = tmp_path / "q.xml"  # calibrated on the first 32 packaged sentences
    compile_cli([str(path), "-p", "fold,fuse,qdq", "--target", "openvino", "--calib", str(CALIB_SENTENCES),
                 "--calib-samples", "32", "-o", str(xml)])
    meta = json.loads((tmp_path / "q.xml.json").read_text())
    # 24 linear layers (36 MatMuls: each QKV projection unpacked into three) in integer FullyConnected nodes (u8; i8
    # where a UINT8 input's zero point is 128); the 12 attention MatMuls in float (OpenVINO's fused attention), and
    # the split's float parts (qdq{split}, on by default: the [CLS] channels of the FFN output layers 0-3
    # recomputed from the FFN input layer's columns, 4 MatMuls, and layer 2's two channels times their rows)
    nodes = meta["matmul_runtime_nodes"]
    assert meta["int8_matmuls"] == "36/53"
    assert nodes.get("FullyConnected u8", 0) + nodes.get("FullyConnected i8", 0) == 36
    feeds = list(FeedSource(DataSpec(str(HELDOUT_SENTENCES), samples=256, batch_size=32),
                            load_model(path)))
    session = ort.InferenceSession(str(path))
    runner = OvRunner(xml, threads=2)
    ref = embeddings(lambda f: session.run(None, f)[0], feeds)
    got = embeddings(lambda f: runner.run(f)["last_hidden_state"], feeds)
    cosine = (ref * got).sum(1)
    assert cosine.mean() >= 0.993 and cosine.min() >= 0.97


def test_ir_output_refuses_ort_targets(mlp_path, tmp_path, capsys):
    out = tmp_path / "m.xml"
    assert run_cli(["-q", "compile", str(mlp_path), "-p", "fold", "--target", "ort-cpu", "-o", str(out)]) == 2
    assert "needs --target openvino" in capsys.readouterr().err and not out.exists()
