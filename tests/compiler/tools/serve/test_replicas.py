"""Two ``tqc serve`` replicas, as a load balancer sees them (docs/scale-out.md): two real tritonservers on free
loopback ports. Each is live and ready, its models are ready, it answers the same text with the same numbers,
and its metrics count what it served; requests spread over the ready replicas are all answered; behind a real
HAProxy (when installed) that probes readiness, every request is answered while one replica stops; a stopped
replica fails its probes while the other keeps answering.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import HELDOUT_SENTENCES

pytest.importorskip("tritonclient.http")
pytest.importorskip("tokenizers")

from tqc.compiler.core.errors import TqcError  # noqa: E402
from tqc.compiler.tools.serve.repository import ServeOptions  # noqa: E402
from tqc.compiler.tools.serve.server import TritonServer, free_port  # noqa: E402
from tqc.compiler.tools.serve.triton_dist import find_triton  # noqa: E402

try:
    find_triton()
except TqcError as exc:  # pragma: no cover - the serve extra is part of dev
    pytest.skip(f"no tritonserver here: {exc}", allow_module_level=True)

import tritonclient.http as httpclient  # noqa: E402

PROBES = ("/v2/health/live", "/v2/health/ready", "/v2/models/minilm_text/ready")


def status(url: str, path: str) -> int:
    """The HTTP status of a probe; 0 when nothing answers (what a balancer's health check sees)."""
    try:
        with urllib.request.urlopen(f"http://{url}{path}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def embed(url: str, text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[None]
    tensor = httpclient.InferInput("TEXT", list(data.shape), "UINT8")
    tensor.set_data_from_numpy(data)
    return httpclient.InferenceServerClient(url).infer("minilm_text", [tensor]).as_numpy("embeddings")[0]


def served(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'nv_inference_request_success\{model="minilm_text",version="1"\} (\d+)', text)
    assert match, text[:2000]
    return int(match.group(1))


def served_since(metrics_url: str, before: int, expected: int, wait_s: float = 5.0) -> int:
    """Requests served since ``before``, read again until ``expected`` show (Triton counts a request just after
    its response leaves, so a read right after the client's last answer can miss it) or ``wait_s`` pass."""
    deadline = time.monotonic() + wait_s
    while (count := served(metrics_url) - before) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.fixture(scope="module")
def replicas(exports):
    minilm = exports.get("minilm")
    servers = []
    try:
        for _ in range(2):
            servers.append(TritonServer(ServeOptions(model=str(minilm), name="minilm", endpoints=("text",),
                                                     threads=1), startup_timeout=300).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_each_replica_is_live_ready_and_answers_the_same(replicas):
    texts = [line for line in HELDOUT_SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()][:4]
    assert replicas[0].http_url != replicas[1].http_url
    for server in replicas:
        assert [status(server.http_url, p) for p in PROBES] == [200, 200, 200]
        assert status(server.http_url, "/v2/models/no_such_model/ready") != 200
    first = np.stack([embed(replicas[0].http_url, t) for t in texts])
    second = np.stack([embed(replicas[1].http_url, t) for t in texts])
    np.testing.assert_allclose(first, second, atol=1e-6, rtol=0)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)


def test_requests_spread_over_ready_replicas_are_counted_by_each(replicas):
    before = [served(s.metrics_url) for s in replicas]
    text = "A load balancer sends this sentence to whichever replica is ready."
    answers = []
    for i in range(8):  # round robin over the replicas whose readiness probe answers 200, as a balancer does
        ready = [s for s in replicas if status(s.http_url, "/v2/health/ready") == 200]
        answers.append(embed(ready[i % len(ready)].http_url, text))
    np.testing.assert_allclose(np.stack(answers), np.stack([answers[0]] * 8), atol=1e-6, rtol=0)
    assert [served_since(s.metrics_url, b, 4) for s, b in zip(replicas, before)] == [4, 4]  # each replica's own count


def test_behind_haproxy_every_request_is_answered_while_a_replica_stops(replicas, tmp_path):
    """HAProxy probing /v2/health/ready (docs/scale-out.md's configuration): requests through it reach both
    replicas; one replica stops, HAProxy takes it out, and every request is still answered, by the other."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY.format(port=port, r0=replicas[0].http_url, r1=replicas[1].http_url,
                                     socket=tmp_path / "admin.sock"))
    proxy = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    front = f"127.0.0.1:{port}"
    text = "Through the balancer."
    try:
        deadline = time.monotonic() + 20
        while status(front, "/v2/health/ready") != 200:
            assert proxy.poll() is None, proxy.stderr.read()
            assert time.monotonic() < deadline, "haproxy did not become ready"
            time.sleep(0.1)
        before = [served(s.metrics_url) for s in replicas]
        answers = [embed(front, text) for _ in range(12)]
        deadline = time.monotonic() + 5  # the counts settle just after the answers (served_since)
        while sum(spread := [served(s.metrics_url) - b for s, b in zip(replicas, before)]) < 12 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(spread) == 12 and min(spread) > 0, spread

        assert server_states(tmp_path / "admin.sock") == {"r0": "UP", "r1": "UP"}
        replicas[0].stop()
        assert status(replicas[0].http_url, "/v2/health/ready") == 0
        deadline = time.monotonic() + 20
        while server_states(tmp_path / "admin.sock")["r0"] != "DOWN":  # its readiness check failed
            assert time.monotonic() < deadline, server_states(tmp_path / "admin.sock")
            time.sleep(0.1)
        before = served(replicas[1].metrics_url)
        answers += [embed(front, text) for _ in range(12)]
        assert served_since(replicas[1].metrics_url, before, 12) == 12
        np.testing.assert_allclose(np.stack(answers), np.stack([answers[0]] * 24), atol=1e-6, rtol=0)
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def test_a_stopped_replica_fails_its_probes_and_the_other_answers(replicas):
    replicas[0].stop()  # already stopped by the HAProxy test when it ran: stop() is idempotent
    assert [status(replicas[0].http_url, p) for p in PROBES] == [0, 0, 0]
    ready = [s for s in replicas if status(s.http_url, "/v2/health/ready") == 200]
    assert ready == [replicas[1]]
    assert np.allclose(np.linalg.norm(embed(ready[0].http_url, "Still answering.")), 1.0, atol=1e-5)


def server_states(socket_path) -> dict[str, str]:
    """HAProxy's view of each replica (its stats socket, ``show stat``): UP or DOWN by the readiness check."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
    header = data.decode().splitlines()[0].lstrip("# ").split(",")
    return {row[1]: row[header.index("status")] for row in rows if row[0] == "replicas" and row[1] in ("r0", "r1")}


HAPROXY = """global
  maxconn 256
  stats socket {socket} mode 600 level admin
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  retries 2
  option redispatch
frontend triton
  bind 127.0.0.1:{port}
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /v2/health/ready
  http-check expect status 200
  server r0 {r0} check inter 200ms fall 1 rise 1
  server r1 {r1} check inter 200ms fall 1 rise 1
"""
