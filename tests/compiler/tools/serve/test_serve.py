"""``tqc serve``: a real tritonserver (python backend, ORT inside) on free loopback ports, driven by tritonclient.

Numbers are compared with the same ONNX model run directly by ONNX Runtime (text: the model's tokenizer from
transformers, then mean pooling and L2 normalisation as sentence-transformers does); malformed requests get
error responses and the server keeps answering; stopping leaves no process, temp folder or shared memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import HELDOUT_SENTENCES
from tests.hostile.harness import child_pids, group_pids

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tokenizers")

from tqc.compiler.core.errors import TqcError  # noqa: E402
from tqc.compiler.tools.serve.repository import ServeOptions, tokenizer_env  # noqa: E402
from tqc.compiler.tools.serve.server import TritonServer  # noqa: E402
from tqc.compiler.tools.serve.triton_dist import find_triton  # noqa: E402

try:
    find_triton()
except TqcError as exc:  # pragma: no cover - the serve extra is part of dev
    pytest.skip(f"no tritonserver here: {exc}", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5


def sentences(count: int, skip: int = 0) -> list[str]:
    """Real sentences from the repository's held-out set."""
    lines = [line.strip() for line in HELDOUT_SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert skip + count <= len(lines)
    return lines[skip:skip + count]


class Reference:
    """The model run directly: ORT CPU, and the packaged MiniLM's tokenizer through transformers."""

    def __init__(self, path: Path):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from tqc.compiler.io.packaged import packaged_minilm_path

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)

    def raw(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feed)[0]

    def embed(self, texts: list[str], max_length: int = 256) -> np.ndarray:
        rows = []
        for text in texts:  # one at a time: no padding at all in the reference
            enc = self.tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = self.raw(feed)[0]
            pooled = hidden.mean(axis=0)
            rows.append(pooled / np.linalg.norm(pooled))
        return np.stack(rows)


def text_input(module, texts: list[str]):
    encoded = [t.encode("utf-8") for t in texts]
    width = max(len(e) for e in encoded)
    data = np.zeros((len(encoded), width), dtype=np.uint8)
    for row, e in enumerate(encoded):
        data[row, :len(e)] = np.frombuffer(e, dtype=np.uint8)
    tensor = module.InferInput("TEXT", list(data.shape), "UINT8")
    tensor.set_data_from_numpy(data)
    return tensor


def raw_inputs(module, feed: dict[str, np.ndarray], dtype: str = "INT64"):
    tensors = []
    for name, value in feed.items():
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def token_feed(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}


@pytest.fixture(scope="module")
def minilm(exports) -> Path:
    return exports.get("minilm")


@pytest.fixture(scope="module")
def reference(minilm) -> Reference:
    return Reference(minilm)


@pytest.fixture(scope="module")
def server(minilm):
    srv = TritonServer(ServeOptions(model=str(minilm), name="minilm", queue_delay_us=2000, preferred_batch=(4, 8),
                                    threads=1), startup_timeout=300)
    srv.start()
    yield srv
    pgid, tmp, prefix = srv.process.pid, srv.tmp, srv.shm_prefix
    srv.stop()
    assert group_pids(pgid) == [], "server or stub processes outlived stop()"
    assert not tmp.exists(), "the temporary repository was not removed"
    assert not list(Path("/dev/shm").glob(f"{prefix}*")), "shared memory regions left behind"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_embeddings_match_direct_ort(server, reference, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    texts = sentences(5) + ["Été à Zürich: naïve café ☕"]
    expected = reference.embed(texts)
    one_by_one = np.concatenate([client.infer("minilm_text", [text_input(module, [t])]).as_numpy("embeddings")
                                 for t in texts])
    together = client.infer("minilm_text", [text_input(module, texts)])  # one request of several rows: padded
    np.testing.assert_allclose(one_by_one, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(together.as_numpy("embeddings"), expected, atol=TOL, rtol=0)
    counts = together.as_numpy("token_count")[:, 0]
    assert list(counts) == [len(reference.tokenizer(t)["input_ids"]) for t in texts]
    assert np.allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_raw_tensors_match_direct_ort(server, reference, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    for batch, seq, seed in ((1, 7, 0), (3, 33, 1)):
        feed = token_feed(batch, seq, seed)
        got = client.infer("minilm", raw_inputs(module, feed)).as_numpy("last_hidden_state")
        np.testing.assert_allclose(got, reference.raw(feed), atol=TOL, rtol=0)


def test_concurrent_requests_are_batched_and_exact(server, reference):
    """Requests of different lengths arrive together; the dynamic batcher merges them (ragged); answers match."""
    texts = sentences(24, skip=100)
    expected = reference.embed(texts)
    feeds = [token_feed(1, 5 + (i % 3) * 9, 100 + i) for i in range(12)]

    def send_text(i):
        client = httpclient.InferenceServerClient(server.http_url)
        return client.infer("minilm_text", [text_input(httpclient, [texts[i]])]).as_numpy("embeddings")[0]

    def send_raw(i):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        return client.infer("minilm", raw_inputs(grpcclient, feeds[i])).as_numpy("last_hidden_state")

    with ThreadPoolExecutor(8) as pool:
        got_text = list(pool.map(send_text, range(len(texts))))
        got_raw = list(pool.map(send_raw, range(len(feeds))))
    np.testing.assert_allclose(np.stack(got_text), expected, atol=TOL, rtol=0)
    for feed, got in zip(feeds, got_raw):
        np.testing.assert_allclose(got, reference.raw(feed), atol=TOL, rtol=0)
    stats = httpclient.InferenceServerClient(server.http_url).get_inference_statistics("minilm_text")
    model_stats = stats["model_stats"][0]
    assert int(model_stats["inference_count"]) >= len(texts)


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, reference):
    client = httpclient.InferenceServerClient(server.http_url)
    bad = []
    # wrong dtype: TEXT as FP32, ids as INT32 (refused by Triton against the config)
    tensor = httpclient.InferInput("TEXT", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    bad.append(("minilm_text", [tensor], "data"))
    bad.append(("minilm", raw_inputs(httpclient, {k: v.astype(np.int32) for k, v in token_feed(1, 4, 0).items()},
                                     "INT32"), "data"))
    # wrong shape: rank 3
    tensor = httpclient.InferInput("TEXT", [1, 2, 3], "UINT8")
    tensor.set_data_from_numpy(np.ones((1, 2, 3), dtype=np.uint8))
    bad.append(("minilm_text", [tensor], "shape"))
    # inputs of different lengths in one request; a missing input; ids outside the vocabulary; empty text
    feed = token_feed(1, 6, 1)
    feed["attention_mask"] = np.ones((1, 5), dtype=np.int64)
    bad.append(("minilm", raw_inputs(httpclient, feed), "different shapes"))
    feed = token_feed(1, 6, 1)
    bad.append(("minilm", raw_inputs(httpclient, {"input_ids": feed["input_ids"]}), "attention_mask"))
    feed = token_feed(1, 6, 1)
    feed["input_ids"][0, 2] = 10**6
    bad.append(("minilm", raw_inputs(httpclient, feed), "vocabulary"))
    feed = token_feed(1, 600, 1)
    bad.append(("minilm", raw_inputs(httpclient, feed), "limit"))
    bad.append(("minilm_text", [text_input(httpclient, ["   "])], "empty"))
    tensor = httpclient.InferInput("TEXT", [1, 4], "UINT8")
    tensor.set_data_from_numpy(np.array([[0xFF, 0xFE, 0x41, 0x42]], dtype=np.uint8))
    bad.append(("minilm_text", [tensor], "UTF-8"))
    for model, inputs, words in bad:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs)
        assert words.lower() in str(info.value).lower(), str(info.value)
    # a text past the 256-token limit is truncated (stated by token_count), and the server still answers
    long_text = " ".join(sentences(40))
    result = client.infer("minilm_text", [text_input(httpclient, [long_text])])
    assert result.as_numpy("token_count")[0, 0] == 256
    np.testing.assert_allclose(result.as_numpy("embeddings"), reference.embed([long_text]), atol=TOL, rtol=0)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("minilm_text")


def test_health_readiness_and_metrics_endpoints(server):
    import urllib.request

    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/minilm/ready", "/v2/models/minilm_text/ready"):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as response:
            assert response.status == 200
    httpclient.InferenceServerClient(server.http_url).infer("minilm_text", [text_input(httpclient, ["metrics"])])
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    assert 'nv_inference_request_success{model="minilm_text"' in text
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()


def _compile(source: Path, target: Path, pipeline: str, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "tqc", "-q", "compile", str(source), "-p", pipeline, "-o", str(target),
                    *extra], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def pooled_server(minilm, tmp_path_factory):
    """The same MiniLM with mean pooling and L2 normalisation compiled into its graph (the pool pass)."""
    pooled = _compile(minilm, tmp_path_factory.mktemp("pooled") / "minilm.pool.onnx", "pool")
    with TritonServer(ServeOptions(model=str(pooled), name="pooled", endpoints=("text",), queue_delay_us=2000,
                                   threads=1), startup_timeout=300) as srv:
        yield srv


def test_a_model_pooled_in_its_graph_answers_as_host_pooling(server, pooled_server):
    """The pooled model's text endpoint requests only sentence_embedding and pools nothing on the host; its
    answers equal those of the host-pooling path (the plain model's server), alone and batched, truncated too."""
    import json

    conf = json.loads((pooled_server.tmp / "repo" / "pooled_text" / "1" / "serve.json").read_text())
    assert (conf["run_outputs"], conf["pooling"], conf["normalize"]) == (["sentence_embedding"], "graph", True)
    assert pooled_server.text["pooling"] == "mean (in the graph)"
    texts = sentences(7, skip=30) + ["Été à Zürich: naïve café ☕", " ".join(sentences(40))]
    host = httpclient.InferenceServerClient(server.http_url)
    graph = grpcclient.InferenceServerClient(pooled_server.grpc_url)
    expected = host.infer("minilm_text", [text_input(httpclient, texts)])
    together = graph.infer("pooled_text", [text_input(grpcclient, texts)])
    alone = np.concatenate([graph.infer("pooled_text", [text_input(grpcclient, [t])]).as_numpy("embeddings")
                            for t in texts])
    np.testing.assert_allclose(together.as_numpy("embeddings"), expected.as_numpy("embeddings"), atol=TOL, rtol=0)
    np.testing.assert_allclose(alone, expected.as_numpy("embeddings"), atol=TOL, rtol=0)
    assert list(together.as_numpy("token_count")[:, 0]) == list(expected.as_numpy("token_count")[:, 0])
    assert together.as_numpy("token_count")[-1, 0] == 256  # the long text was truncated on both paths


def test_max_pooling_of_a_sentence_encoder_is_max_on_the_host(minilm, reference):
    """Max pooling (a sentence encoder's pooling_mode_max_tokens) runs as max, not mean: padded positions
    excluded as sentence-transformers excludes them, in a batch padded to its longest text."""
    from tqc.passes.pool import pool_reference

    texts = sentences(5, skip=60)
    with TritonServer(ServeOptions(model=str(minilm), name="mx", endpoints=("text",), pooling="max",
                                   normalize=False, threads=1), startup_timeout=300) as srv:
        assert srv.text["pooling"] == "max" and srv.text["normalize"] is False
        got = httpclient.InferenceServerClient(srv.http_url).infer("mx_text", [text_input(httpclient, texts)])
    rows = []
    for text in texts:  # unpadded, one at a time
        enc = reference.tokenizer([text], truncation=True, max_length=256, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        rows.append(pool_reference(reference.raw(feed), feed["attention_mask"], "max", False)[0])
    np.testing.assert_allclose(got.as_numpy("embeddings"), np.stack(rows), atol=TOL, rtol=0)
    mean = reference.embed(texts)  # and it is not the mean
    assert np.abs(got.as_numpy("embeddings") - mean).max() > 0.1


def test_two_instances_and_length_groups_answer_exactly(minilm, reference, tmp_path):
    """--instances 2: two stub processes serve the text model, concurrent requests are answered exactly; with
    max_padding 0.25 a request of short and long texts runs as length groups (never as one batch padded to the
    longest text), and its answers are those of each text alone."""
    import json

    short = [" ".join(t.split()[:3]) for t in sentences(3, skip=150)]  # real text, a few words
    long_ = [" ".join(sentences(3, skip=160 + 3 * i)) for i in range(3)]  # three sentences each
    assert max(len(reference.tokenizer(t)["input_ids"]) for t in short) * 3 < min(
        len(reference.tokenizer(t)["input_ids"]) for t in long_)
    mixed = [long_[0], short[0], long_[1], short[1], short[2], long_[2]]
    longest = max(len(reference.tokenizer(t)["input_ids"]) for t in mixed)
    texts = sentences(16, skip=120)
    timings = tmp_path / "timings"
    timings.mkdir()
    with TritonServer(ServeOptions(model=str(minilm), name="two", endpoints=("text",), instances=2,
                                   max_padding=0.25, queue_delay_us=1000, timings_dir=str(timings)),
                      startup_timeout=300) as srv:
        client = httpclient.InferenceServerClient(srv.http_url)
        config = client.get_model_config("two_text")
        assert [int(g["count"]) for g in config["instance_group"]] == [2]
        stubs = [pid for pid in group_pids(srv.pgid)
                 if b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(stubs) == 2, stubs
        conf = json.loads((srv.tmp / "repo" / "two_text" / "1" / "serve.json").read_text())
        assert conf["threads"] == max(1, (os.cpu_count() or 1) // 2)  # the instances share the cores
        for pid in stubs:  # and so do their tokenizers' thread pools (one's own setting kept)
            environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if b"=" in item)
            for key, value in tokenizer_env(2).items():
                assert environ.get(key.encode()) == os.environ.get(key, value).encode(), (key, environ.get(key.encode()))
        got_mixed = client.infer("two_text", [text_input(httpclient, mixed)])

        def send(i):
            own = httpclient.InferenceServerClient(srv.http_url)
            return own.infer("two_text", [text_input(httpclient, [texts[i]])]).as_numpy("embeddings")[0]

        with ThreadPoolExecutor(8) as pool:
            got = np.stack(list(pool.map(send, range(len(texts)))))
    np.testing.assert_allclose(got_mixed.as_numpy("embeddings"), reference.embed(mixed), atol=TOL, rtol=0)
    assert list(got_mixed.as_numpy("token_count")[:, 0]) == [len(reference.tokenizer(t)["input_ids"]) for t in mixed]
    np.testing.assert_allclose(got, reference.embed(texts), atol=TOL, rtol=0)
    shapes = set()
    for file in timings.glob("two_text.*.timings.json"):  # one per instance
        shapes |= set(json.loads(file.read_text()))
    assert f"{len(mixed)}x{longest}" not in shapes, shapes
    assert any(s.endswith(f"x{longest}") and int(s.split("x")[0]) < len(mixed) for s in shapes), shapes


def _tqc(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tqc", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)



def _serve_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("tqc-serve-*")}


def test_cli_serves_until_sigterm_then_leaves_nothing(minilm, tmp_path):
    timings = tmp_path / "made" / "timings"  # --timings makes the folder
    serve_cli_until_sigterm(minilm, "--timings", str(timings))
    import json

    (shape, entry), *_ = json.loads((timings / "minilm_text.timings.json").read_text()).items()
    tokenize, run, pool, calls, decode, respond, execute = entry  # seconds summed over the calls of that shape
    assert shape.startswith("1x") and calls >= 1 and 0 < tokenize + run + pool + decode + respond <= execute


def serve_cli_until_sigterm(model: Path, *options: str) -> None:
    """``tqc serve MODEL`` (text endpoint, long texts refused) answers, stops on SIGTERM with 0, leaves nothing."""
    before = _serve_dirs()
    proc = _tqc("serve", str(model), "--port", "0", "--grpc-port", "0", "--metrics-port", "0",
                "--endpoints", "text", "--long-text", "error", "--queue-delay-us", "0", "--name", "minilm", *options)
    try:
        _check_cli_server(proc, before)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


def _check_cli_server(proc: subprocess.Popen, before: set[str]) -> None:
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving on"):
            break
    assert lines and lines[-1].startswith("serving on"), proc.communicate(timeout=30)
    http = lines[-1].split("http://")[1].split()[0]
    children = child_pids(proc.pid)
    assert children, "no tritonserver child"
    server_pgid = os.getpgid(children[0])
    client = httpclient.InferenceServerClient(http)
    assert client.infer("minilm_text", [text_input(httpclient, ["short"])]).as_numpy("embeddings").shape == (1, 384)
    with pytest.raises(InferenceServerException, match="longer than the model's limit"):
        client.infer("minilm_text", [text_input(httpclient, [" ".join(sentences(40))])])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert group_pids(server_pgid) == []
    assert _serve_dirs() <= before, "the temporary repository was not removed"


def _bad_model(path: Path) -> Path:
    """Token inputs and a float output, but an op ONNX Runtime does not have: loading fails in the stub."""
    node = helper.make_node("NoSuchOp", ["input_ids", "attention_mask"], ["last_hidden_state"], domain="tqc.bogus")
    graph = helper.make_graph([node], "bad", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("tqc.bogus", 1)])
    onnx.save(model, str(path))
    return path


def test_a_model_that_fails_to_load_gives_one_line_and_exit_2(tmp_path):
    bad = _bad_model(tmp_path / "bad.onnx")
    proc = _tqc("serve", str(bad), "--port", "0", "--grpc-port", "0", "--metrics-port", "0", "--endpoints", "raw")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("tqc: error:")]
    assert len(errors) == 1 and "failed to load" in errors[0] and "NoSuchOp" in errors[0], err
    assert "Traceback" not in err
    assert child_pids(proc.pid) == []


def test_startup_timeout_stops_everything(minilm):
    srv = TritonServer(ServeOptions(model=str(minilm), endpoints=("raw",)), startup_timeout=0.05)
    before = _serve_dirs()
    with pytest.raises(TqcError, match="startup timeout"):
        srv.start()
    assert srv.process is None and srv.tmp is None
    assert group_pids(srv.pgid) == []
    assert _serve_dirs() <= before


def test_a_port_in_use_gives_one_line_and_exit_2(minilm):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        before = _serve_dirs()
        proc = _tqc("serve", str(minilm), "--port", str(port), "--grpc-port", "0", "--metrics-port", "0",
                    "--endpoints", "raw")
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1].startswith("tqc: error: the server did not start:") and "already in use" in err
    assert child_pids(proc.pid) == [] and _serve_dirs() <= before
