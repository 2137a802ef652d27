"""``tqc export-triton --text``: the model, a python-backend tokenizer and an ensemble, for stock Triton containers.

What runs here: every config parsed by Triton's own protobuf schema (tritonclient's model_config_pb2) and by
tritonserver (``check-triton``); the ensemble's wiring checked; and the exported tokenizer step and ensemble
served by a real tritonserver, text in over HTTP, with one stand-in: this machine's tritonserver has no
onnxruntime backend, so the model's step runs the same ``model.onnx`` under ONNX Runtime in a python-backend
model (``ort_standin_model.py``). Embeddings are compared with the model run directly (transformers' tokenizer,
ONNX Runtime, sentence-transformers' pooling).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HELDOUT_SENTENCES, make_mlp
from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.triton import parse_pbtxt, to_pbtxt
from tqc.compiler.tools.triton_text import check_ensemble, export_triton_text

STANDIN = Path(__file__).with_name("ort_standin_model.py")
TOL = 1e-5


def sentences(count: int, skip: int = 0) -> list[str]:
    lines = [line.strip() for line in HELDOUT_SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[skip:skip + count]


@pytest.fixture(scope="module")
def minilm(exports) -> Path:
    return exports.get("minilm")


@pytest.fixture(scope="module")
def pooled(minilm, tmp_path_factory) -> Path:
    import tqc

    path = tmp_path_factory.mktemp("pooled") / "minilm.pool.onnx"
    tqc.compile(str(minilm), "fold,pool", target="ort-cpu").save(str(path))
    return path


@pytest.fixture(scope="module")
def repo(pooled, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("text") / "repo"
    export_triton_text(pooled, repo, name="minilm", kind="KIND_CPU", max_batch=16)
    return repo


def token_states(minilm: Path, texts: list[str], max_length: int = 256) -> list[np.ndarray]:
    """Each text's token states, run alone (no padding): transformers' tokenizer and ORT CPU."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from tqc.compiler.io.packaged import packaged_minilm_path

    session = ort.InferenceSession(str(minilm), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)
    states = []
    for text in texts:
        enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        states.append(session.run(None, feed)[0][0])
    return states


def reference(minilm: Path, texts: list[str]) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: each text alone, mean over its tokens, L2 norm."""
    from tqc.passes.pool import pool_reference

    return np.stack([pool_reference(states[None], None, "mean", True)[0] for states in token_states(minilm, texts)])


def test_the_repository_holds_three_models_that_tritons_schema_parses(repo):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    configs = {}
    for folder in sorted(p for p in repo.iterdir()):
        configs[folder.name] = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert sorted(configs) == ["minilm", "minilm_text", "minilm_tokenizer"]
    assert configs["minilm"].platform == "onnxruntime_onnx" and (repo / "minilm" / "1" / "model.onnx").is_file()
    tok = configs["minilm_tokenizer"]
    assert tok.backend == "python" and tok.parameters["max_length"].string_value == "256"  # MiniLM's max_seq_length
    assert [o.name for o in tok.output] == ["input_ids", "attention_mask", "token_type_ids"]
    assert (repo / "minilm_tokenizer" / "1" / "model.py").is_file()
    text = configs["minilm_text"]
    assert text.platform == "ensemble" and (repo / "minilm_text" / "1").is_dir()
    assert [s.model_name for s in text.ensemble_scheduling.step] == ["minilm_tokenizer", "minilm"]
    assert [(o.name, list(o.dims)) for o in text.output] == [("sentence_embedding", [384])]
    assert text.input[0].data_type == model_config_pb2.TYPE_STRING


def test_check_triton_accepts_every_model_of_the_text_repository(repo):
    from tqc.compiler.tools.serve.repo_check import check_triton_repository

    rows = {row["model"]: row for row in check_triton_repository(repo)}
    assert all(row["ok"] for row in rows.values()), rows
    assert "config accepted" in rows["minilm_text"]["triton"] and "onnxruntime" in rows["minilm_text"]["triton"]
    assert "tokenizer.json loaded" in rows["minilm_tokenizer"]["files"]


def test_a_miswired_ensemble_is_found_by_tqc_and_by_triton(repo, tmp_path):
    from tqc.compiler.tools.serve.repo_check import check_triton_repository

    configs = {p.name: parse_pbtxt((p / "config.pbtxt").read_text()) for p in repo.iterdir()}
    text = configs["minilm_text"]
    assert check_ensemble(text, configs) == []
    wrong_type = dict(configs["minilm"], input=[dict(p, data_type="TYPE_INT32") for p in configs["minilm"]["input"]])
    problems = check_ensemble(text, dict(configs, minilm=wrong_type))
    assert len(problems) == 3 and "'input_ids' is TYPE_INT64 [-1], input 'input_ids' wants TYPE_INT32" in problems[0]
    assert check_ensemble(text, {k: v for k, v in configs.items() if k != "minilm"}) == [
        "step 2 names model 'minilm', which the repository lacks",
        "ensemble output 'sentence_embedding' is produced by no step"]
    small = dict(configs["minilm"], max_batch_size=8)
    assert check_ensemble(text, dict(configs, minilm=small)) == [
        "step 2 (minilm): max_batch_size 8 is below the ensemble's 16"]

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    step = text["ensemble_scheduling"]["step"][1]
    step["input_map"][0]["value"] = "input_idz"
    (broken / "minilm_text" / "config.pbtxt").write_text(to_pbtxt(text))
    rows = {row["model"]: row for row in check_triton_repository(broken)}
    assert not rows["minilm_text"]["ok"]
    assert "not connected" in rows["minilm_text"]["triton"]  # tritonserver's own verdict
    assert "reads ['input_idz'], which no input or step gives" in rows["minilm_text"]["files"]


@contextmanager
def tritonserver(repo: Path, tmp: Path):
    """The real tritonserver on ``repo`` with its python backend; yields the HTTP address when ready."""
    from tqc.compiler.tools.serve.server import Ports
    from tqc.compiler.tools.serve.triton_dist import find_triton, make_backend_dir, site_folders

    dist = find_triton()
    ports = Ports().resolved()
    prefix = f"tqc_text_test_{os.getpid()}_{ports.http}_"
    env = dist.env()
    env["TQC_SERVE_STUB_PATH"] = os.pathsep.join(site_folders())
    command = [str(dist.server), f"--model-repository={repo}",
               f"--backend-directory={make_backend_dir(dist, tmp / 'backends')}",
               "--http-address=127.0.0.1", f"--http-port={ports.http}", "--grpc-address=127.0.0.1",
               f"--grpc-port={ports.grpc}", "--allow-metrics=false", "--strict-readiness=true",
               f"--backend-config=python,shm-region-prefix-name={prefix}"]
    with open(tmp / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp / "server.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "not ready after 300 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        yield f"127.0.0.1:{ports.http}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        for leftover in Path("/dev/shm").glob(f"{prefix}*"):
            leftover.unlink(missing_ok=True)


def text_request(httpclient, texts: list[str]):
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    tensor = httpclient.InferInput("TEXT", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def test_the_exported_ensemble_answers_text_in_tritonserver(repo, minilm, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http")
    pytest.importorskip("tokenizers")
    from tritonclient.utils import InferenceServerException

    served = tmp_path / "repo"
    shutil.copytree(repo, served)
    export_triton_text(minilm, served, name="tokens", kind="KIND_CPU", max_batch=16)  # per token, unpooled
    for model in ("minilm", "tokens"):
        config = served / model / "config.pbtxt"
        config.write_text(config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
        shutil.copyfile(STANDIN, served / model / "1" / "model.py")
    # a second tokenizer step and ensemble, as --long-text error writes them
    shutil.copytree(served / "minilm_tokenizer", served / "strict_tokenizer")
    shutil.copytree(served / "minilm_text", served / "strict_text")
    for path, old, new in ((served / "strict_tokenizer" / "config.pbtxt", '"minilm_tokenizer"', '"strict_tokenizer"'),
                           (served / "strict_tokenizer" / "config.pbtxt", '"truncate"', '"error"'),
                           (served / "strict_text" / "config.pbtxt", '"minilm_text"', '"strict_text"'),
                           (served / "strict_text" / "config.pbtxt", '"minilm_tokenizer"', '"strict_tokenizer"')):
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    texts = sentences(6) + ["Été à Zürich: naïve café ☕"]
    long_text = " ".join(sentences(30, skip=10))
    expected = reference(minilm, texts + [long_text])
    with tritonserver(served, tmp_path) as url:
        client = httpclient.InferenceServerClient(url)
        assert client.is_model_ready("minilm_text") and client.is_model_ready("minilm_tokenizer")
        one_by_one = np.concatenate([client.infer("minilm_text", text_request(httpclient, [t]))
                                     .as_numpy("sentence_embedding") for t in texts + [long_text]])
        together = client.infer("minilm_text", text_request(httpclient, texts)).as_numpy("sentence_embedding")

        def send(i):
            own = httpclient.InferenceServerClient(url)
            return own.infer("minilm_text", text_request(httpclient, [texts[i % len(texts)]])).as_numpy(
                "sentence_embedding")[0]

        with ThreadPoolExecutor(6) as pool:
            concurrent = np.stack(list(pool.map(send, range(18))))
        for bad, words in (([" "], "empty"), (["x" * 70000], "exceeds the limit")):
            with pytest.raises(InferenceServerException) as info:
                client.infer("minilm_text", text_request(httpclient, bad))
            assert words in str(info.value), str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.infer("strict_text", text_request(httpclient, [long_text]))
        assert "longer than the model's limit of 256 tokens" in str(info.value)
        strict = client.infer("strict_text", text_request(httpclient, texts[:2])).as_numpy("sentence_embedding")
        tokens = client.infer("tokens_text", text_request(httpclient, texts[:3]))
        assert client.is_server_ready()  # still serving after the refused requests
    np.testing.assert_allclose(one_by_one, expected, atol=TOL, rtol=0)  # the long text: truncated at 256 tokens
    np.testing.assert_allclose(together, expected[:len(texts)], atol=TOL, rtol=0)  # padded to the longest
    np.testing.assert_allclose(concurrent, expected[[i % len(texts) for i in range(18)]], atol=TOL, rtol=0)
    np.testing.assert_allclose(strict, expected[:2], atol=TOL, rtol=0)
    # per token: three texts padded to the longest; the mask marks each text's own tokens, whose states are its own
    states, mask = tokens.as_numpy("last_hidden_state"), tokens.as_numpy("attention_mask")
    alone = token_states(minilm, texts[:3])
    assert [int(m.sum()) for m in mask] == [len(a) for a in alone] and states.shape[1] == max(len(a) for a in alone)
    for row, own in enumerate(alone):
        assert not mask[row, len(own):].any()
        np.testing.assert_allclose(states[row, :len(own)], own, atol=TOL, rtol=0)


def test_text_export_refusals_write_nothing(minilm, tmp_path):
    make_mlp(tmp_path / "mlp.onnx")
    with pytest.raises(TqcError, match="needs a token model"):
        export_triton_text(tmp_path / "mlp.onnx", tmp_path / "r1", tokenizer="minilm")
    (tmp_path / "r2" / "minilm_text").mkdir(parents=True)
    with pytest.raises(TqcError, match="minilm_text' exists"):
        export_triton_text(minilm, tmp_path / "r2", name="minilm")
    assert [p.name for p in (tmp_path / "r2").iterdir()] == ["minilm_text"]  # no half repository
    with pytest.raises(TqcError, match="exceeds the model's 512 positions"):
        export_triton_text(minilm, tmp_path / "r3", max_length=1024)
    with pytest.raises(TqcError, match="needs the ONNX model"):
        export_triton_text(tmp_path / "m.plan", tmp_path / "r4")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists() and not (tmp_path / "r4").exists()


@pytest.mark.parametrize("max_batch", [8, 0])
def test_a_model_without_token_type_ids_gets_the_two_tensors_it_takes(max_batch):
    from tqc.compiler.tools.triton import model_config
    from tqc.compiler.tools.triton_text import ensemble_config, tokenizer_config, token_inputs

    ports = [{"name": n, "data_type": "TYPE_INT64", "dims": [-1, -1]} for n in ("input_ids", "attention_mask")]
    model = model_config("m", "onnxruntime_onnx", ports, [{"name": "e", "data_type": "TYPE_FP32", "dims": [-1, 8]}],
                         max_batch, 1, "KIND_GPU", 100)
    tok = tokenizer_config("m_tokenizer", token_inputs(model), max_batch, 1, 100,
                           {"max_length": 128, "pad_id": 1, "long_text": "truncate"})
    text = ensemble_config("m_text", tok, model)
    assert [(p["name"], p["dims"]) for p in tok["output"]] == [
        ("input_ids", [-1] if max_batch else [-1, -1]), ("attention_mask", [-1] if max_batch else [-1, -1])]
    assert text["input"][0]["dims"] == ([1] if max_batch else [-1]) and text["max_batch_size"] == max_batch
    assert check_ensemble(text, {"m": model, "m_tokenizer": tok}) == []
    assert check_ensemble(text, {"m": model, "m_tokenizer": dict(tok, output=tok["output"][:1])}) == [
        "step 1 (m_tokenizer): output 'attention_mask' is not an output of the model",
        "step 2 (m) reads ['attention_mask'], which no input or step gives",
        "ensemble output 'e' is produced by no step"]
    wrong = dict(model, input=[dict(ports[0], name="input_ids", data_type="TYPE_INT32", dims=[-1])])
    with pytest.raises(TqcError, match="input 'input_ids' is not one"):
        token_inputs(dict(wrong, max_batch_size=8))


def test_an_unbatched_text_repository_is_accepted_by_triton(pooled, tmp_path):
    from tqc.compiler.tools.serve.repo_check import check_triton_repository

    export_triton_text(pooled, tmp_path / "repo", name="m", max_batch=0, long_text="error", max_length=64)
    rows = check_triton_repository(tmp_path / "repo")
    assert [row["model"] for row in rows] == ["m", "m_text", "m_tokenizer"] and all(row["ok"] for row in rows), rows
    config = parse_pbtxt((tmp_path / "repo" / "m_tokenizer" / "config.pbtxt").read_text())
    assert {p["key"]: p["value"]["string_value"] for p in config["parameters"]}["max_length"] == "64"


def test_the_cli_writes_the_three_models_and_notes_a_per_token_output(minilm, tmp_path, capsys):
    from tests.hostile.harness import run_inprocess

    outcome = run_inprocess(["export-triton", minilm, "-o", tmp_path / "repo", "--name", "tokens", "--text",
                             "--long-text", "error", "--instances", "2"], capsys)
    assert outcome.code == 0, outcome.err
    assert "tokens_tokenizer" in outcome.out and "token limit 256" in outcome.out
    assert "answers per token" in outcome.err and "attention_mask" in outcome.err and "pool pass" in outcome.err
    configs = {p.name: parse_pbtxt((p / "config.pbtxt").read_text()) for p in (tmp_path / "repo").iterdir()}
    assert configs["tokens_text"]["output"] == [
        {"name": "last_hidden_state", "data_type": "TYPE_FP32", "dims": [-1, 384]},
        {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1]}]  # which positions are padding
    assert configs["tokens_tokenizer"]["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert configs["tokens"]["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    assert check_ensemble(configs["tokens_text"], configs) == []


def test_the_tokenizer_step_encodes_printable_ascii_by_cached_words_with_the_tokenizers_ids(repo, monkeypatch):
    """The exported tokenizer step loads ``wordpiece_words.py`` from beside its model.py (both written into the
    repository) and, for MiniLM's WordPiece tokenizer, encodes printable ASCII texts word by word: the same ids,
    type ids and truncation as the tokenizer; other texts go to the tokenizer."""
    import importlib.util
    import json
    import sys
    import types

    pytest.importorskip("tokenizers")
    folder = repo / "minilm_tokenizer" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["model.py", "tokenizer.json", "wordpiece_words.py"]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("exported_tokenizer_step", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = parse_pbtxt((repo / "minilm_tokenizer" / "config.pbtxt").read_text())
    config["parameters"] = {p["key"]: p["value"] for p in config["parameters"]}  # as Triton hands it to the model
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    assert model.words is not None
    long_text = " ".join(sentences(30, skip=10))
    ascii_texts = [t for t in sentences(40) if t.isascii() and t.isprintable()] + [long_text]
    assert len(ascii_texts) > 20
    fast = model._encode(ascii_texts)
    assert all(type(e).__name__ == "Ids" for e in fast)
    for text, mine in zip(ascii_texts, fast):
        theirs = model.tokenizer.encode(text)
        assert mine.ids == theirs.ids and mine.type_ids == theirs.type_ids, text
        assert bool(mine.overflowing) == bool(theirs.overflowing), text
    assert fast[-1].overflowing and len(fast[-1].ids) == model.max_length
    mixed = model._encode(["Été à Zürich", "plain words"])  # one text not ASCII: the tokenizer for all
    assert [e.ids for e in mixed] == [model.tokenizer.encode(t).ids for t in ("Été à Zürich", "plain words")]
    assert all(type(e).__name__ == "Encoding" for e in mixed)
