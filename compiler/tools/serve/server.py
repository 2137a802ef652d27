"""Runs ``tritonserver`` on a temporary python-backend repository; waits for readiness; stops it cleanly.

    TritonServer(opts).start()
      tmp/ (tqc-serve-*)  repo/ (repository.py), backends/python/ (links, triton_dist.py), server.log
      tritonserver --model-repository tmp/repo --backend-directory tmp/backends --http/grpc/metrics ports
                   (own process group: the python-backend stubs it forks stay in it)
      -> polls /v2/health/ready; the server exiting (a model failed to load) or the startup timeout ends the
         wait with one line taken from the server's log, and nothing is left running; the environment holds
         the tokenizer's threads per stub (repository.tokenizer_env) unless one's own is set
    .stop()   SIGTERM to the server (it unloads the models, the stubs exit), SIGKILL to the group after the
              grace period, then the temporary folder is removed
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.serve.repository import ServeOptions, tokenizer_env, write_repository
from tqc.compiler.tools.serve.triton_dist import find_triton, make_backend_dir, site_folders


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Ports:
    http: int = 0
    grpc: int = 0
    metrics: int = 0

    def resolved(self) -> "Ports":
        chosen: set[int] = set()

        def pick(port: int) -> int:
            while not port or port in chosen:
                port = free_port()
            chosen.add(port)
            return port

        return Ports(pick(self.http), pick(self.grpc), pick(self.metrics))


LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*)")


def _load_failure(log: str) -> str | None:
    for line in log.splitlines():
        match = LOAD_FAILURE.search(line)
        if match:
            reason = match.group(2).replace("\\n", "\n").strip().strip('"')
            lines = [part.strip() for part in reason.splitlines() if part.strip() and not part.strip().startswith("At:")]
            # The python backend puts the exception first; its traceback lines ("  file(n): fn") follow.
            return f"model '{match.group(1)}' failed to load: {lines[0] if lines else reason}"[:400]
    for line in log.splitlines():  # the server's own fatal line ("error: creating server: ..."), else its errors
        if line.startswith("error:"):
            return line.strip()[:400]
    for line in reversed(log.splitlines()):  # the last error; a CPU-only host always logs the CUDA one
        if re.match(r"E\d{4} ", line) and "CudaDriverHelper" not in line:
            return line.split("]", 1)[-1].strip().strip('"').strip()[:400]
    return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class TritonServer:
    def __init__(self, opts: ServeOptions, ports: Ports | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 120.0, grace: float = 10.0, log_verbose: int = 0):
        self.opts = opts
        self.ports = (ports or Ports()).resolved()
        self.host = host
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.log_verbose = log_verbose
        self.process: subprocess.Popen | None = None
        self.pgid: int | None = None  # the server's process group (kept after stop, for checks)
        self.tmp: Path | None = None
        self.models: dict[str, str] = {}
        self.text: dict = {}

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def log_path(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "server.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def command(self) -> list[str]:
        assert self.tmp is not None
        return [str(self.dist.server), f"--model-repository={self.tmp / 'repo'}",
                f"--backend-directory={self.tmp / 'backends'}",
                f"--http-address={self.host}", f"--http-port={self.ports.http}",
                f"--grpc-address={self.host}", f"--grpc-port={self.ports.grpc}",
                "--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.ports.metrics}",
                "--allow-gpu-metrics=false", "--disable-auto-complete-config", "--strict-readiness=true",
                f"--exit-timeout-secs={max(1, int(self.grace) - 2)}", f"--log-verbose={self.log_verbose}",
                # own shared-memory names, so leftovers of this server are recognisable (and none are expected)
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--backend-config=python,shm-default-byte-size=4194304"]

    @property
    def shm_prefix(self) -> str:
        return f"tqc_serve_{os.getpid()}_{self.ports.http}_"

    def start(self) -> "TritonServer":
        self.dist = find_triton()
        # the name is known before the folder exists, so a signal at any point leaves nothing that stop() misses
        # (mkdtemp's folder, made before its name was stored, could be left behind by a signal in between)
        self.tmp = Path(tempfile.gettempdir()) / f"tqc-serve-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            try:
                self.tmp.mkdir(mode=0o700)
            except FileExistsError:  # not ours (a 48-bit name clash): leave it alone
                self.tmp = None
                raise TqcError("could not make the server's temporary folder: its random name exists") from None
            written = write_repository(self.opts, self.tmp / "repo", site_folders())
            self.models, self.text = written["models"], written["text"]
            make_backend_dir(self.dist, self.tmp / "backends")
            env = self.dist.env()
            for key, value in tokenizer_env(self.opts.instances).items():  # one's own setting is kept
                env.setdefault(key, value)
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self.pgid = self.process.pid
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                reason = _load_failure(self.log()) or f"tritonserver exited with code {self.process.returncode}"
                raise TqcError(f"the server did not start: {reason}")
            if self._get("/v2/health/ready") == 200:
                return
            failure = _load_failure(self.log())
            if failure and "failed to load" in failure:
                raise TqcError(f"the server did not start: {failure}")
            time.sleep(0.1)
        raise TqcError(f"the server was not ready after {self.startup_timeout:.0f}s (startup timeout); "
                       f"last log line: {(self.log().strip().splitlines() or [''])[-1][:200]}")

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=self.grace)
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:  # hung past the grace period
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            # any stub that outlived the server (same process group): a moment to exit, then SIGKILL
            started, killed = time.monotonic(), False
            while _group_alive(process.pid) and time.monotonic() - started < 10.0:
                if not killed and time.monotonic() - started > 2.0:
                    os.killpg(process.pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.05)
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
