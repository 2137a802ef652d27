"""``tqc serve`` on OpenVINO: an IR written by ``tqc compile --target openvino`` (``tqc serve model.xml``), and an
ONNX file with ``--provider openvino``; a real tritonserver answering real text and raw tensors.

The IR's answers are compared with the same IR run in this process by OpenVINO (FP32 inference precision, as the
server runs it) and pooled in numpy; the ONNX file's with ONNX Runtime on the same file (two runtimes, FP32).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

# test_serve skips this module too where tritonserver, tritonclient or tokenizers are missing
from tests.compiler.tools.serve.test_serve import (  # noqa: E402
    Reference, _tqc, raw_inputs, sentences, serve_cli_until_sigterm, text_input, token_feed)
from tqc.compiler.tools.serve.repository import ServeOptions  # noqa: E402
from tqc.compiler.tools.serve.server import TritonServer  # noqa: E402
from tqc.passes.pool import pool_reference  # noqa: E402

import tritonclient.http as httpclient  # noqa: E402

OV_TOL = 1e-5   # the server and this process run the same IR on the same OpenVINO build
ORT_TOL = 1e-4  # OpenVINO FP32 against ONNX Runtime FP32 on the same ONNX file


@pytest.fixture(scope="module")
def minilm(exports) -> Path:
    return exports.get("minilm")


@pytest.fixture(scope="module")
def ir(minilm, tmp_path_factory) -> Path:
    """MiniLM fused for OpenVINO, written as IR (FP16-compressed weights, OpenVINO's default)."""
    out = tmp_path_factory.mktemp("ir") / "minilm.xml"
    subprocess.run([sys.executable, "-m", "tqc", "-q", "compile", str(minilm), "-p", "fold,fuse", "--target",
                    "openvino", "-o", str(out)], check=True, capture_output=True)
    return out


class OvReference:
    """The IR run in this process: OpenVINO CPU with FP32 inference precision, one text at a time, no padding."""

    def __init__(self, xml: Path, tokenizer):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.tokenizer = tokenizer

    def raw(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self.compiled(feed)[self.compiled.output(0)])

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            enc = self.tokenizer([text], truncation=True, max_length=256, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            rows.append(pool_reference(self.raw(feed), feed["attention_mask"], "mean", True)[0])
        return np.stack(rows)


def test_ir_served_answers_text_and_raw_as_openvino_in_process(ir, minilm):
    reference = OvReference(ir, Reference(minilm).tokenizer)
    texts = sentences(6, skip=10) + ["Été à Zürich: naïve café ☕"]
    with TritonServer(ServeOptions(model=str(ir), name="ov", provider="openvino", queue_delay_us=2000, threads=1),
                      startup_timeout=300) as srv:
        assert srv.models == {"ov": "raw", "ov_text": "text"}  # the tokenizer comes from model.xml.json
        assert srv.text["pooling"] == "mean" and srv.text["normalize"] is True
        client = httpclient.InferenceServerClient(srv.http_url)
        together = client.infer("ov_text", [text_input(httpclient, texts)]).as_numpy("embeddings")
        alone = np.concatenate([client.infer("ov_text", [text_input(httpclient, [t])]).as_numpy("embeddings")
                                for t in texts])
        feed = token_feed(2, 19, 5)
        got_raw = client.infer("ov", raw_inputs(httpclient, feed)).as_numpy("last_hidden_state")
        log = srv.log()
    expected = reference.embed(texts)
    np.testing.assert_allclose(together, expected, atol=OV_TOL, rtol=0)
    np.testing.assert_allclose(alone, expected, atol=OV_TOL, rtol=0)
    np.testing.assert_allclose(got_raw, reference.raw(feed), atol=OV_TOL, rtol=0)
    assert "openvino" in log and "CPU" in log  # the stub's ready line names its runtime


def test_onnx_with_provider_openvino_matches_onnx_runtime(minilm):
    reference = Reference(minilm)
    texts = sentences(5, skip=50)
    with TritonServer(ServeOptions(model=str(minilm), name="ovx", provider="openvino", endpoints=("text",),
                                   threads=1), startup_timeout=300) as srv:
        got = httpclient.InferenceServerClient(srv.http_url).infer("ovx_text", [text_input(httpclient, texts)])
    np.testing.assert_allclose(got.as_numpy("embeddings"), reference.embed(texts), atol=ORT_TOL, rtol=0)


def test_cli_serves_an_ir_until_sigterm(ir):
    serve_cli_until_sigterm(ir)


@pytest.mark.parametrize("provider, words", [("cpu", "served with --provider openvino"),
                                             ("cuda", "served with --provider openvino")])
def test_an_ir_on_another_provider_is_one_line_and_exit_2(ir, provider, words):
    proc = _tqc("serve", str(ir), "--provider", provider, "--port", "0", "--grpc-port", "0", "--metrics-port", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1].startswith("tqc: error:") and words in err and "Traceback" not in err


def test_an_ir_without_its_weights_is_one_line_and_exit_2(ir, tmp_path):
    lone = tmp_path / "lone.xml"
    lone.write_bytes(ir.read_bytes())
    proc = _tqc("serve", str(lone), "--port", "0", "--grpc-port", "0", "--metrics-port", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no weights file 'lone.bin'" in err, (out, err)
