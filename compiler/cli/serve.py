"""``tqc serve`` in the foreground: start the server, say where it listens, stop it on SIGTERM/SIGINT.

Exit codes: a signal is the normal end of a server that is serving: it stops cleanly and exits 0. A signal
that arrives while the server is still starting interrupts the command like any other: 130 (SIGINT) or 143
(SIGTERM), the server stopped and its temporary folder removed. A server that dies on its own exits 1; one that
cannot start (a port in use, a model that fails to load) exits 2.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Callable

import click

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.openvino_ir import is_ir
from tqc.compiler.io.output_guard import Interrupted
from tqc.compiler.tools.serve.repository import ServeOptions
from tqc.compiler.tools.serve.server import Ports, TritonServer


class ServerDied(TqcError):
    exit_code = 1


class _Stop(Exception):
    pass


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TqcError(f"--preferred-batch: '{text}' is not a comma-separated list of integers") from None
    return sizes


def run_serve(model: str, host: str, ports: tuple[int, int, int], name: str | None, endpoints: str,
              provider: str | None, cuda_graph: bool, tokenizer: str | None, max_length: int | None,
              long_text: str, max_batch: int, preferred_batch: str, queue_delay_us: int, instances: int,
              threads: int | None, startup_timeout: float, progress: Callable[[str], None],
              max_padding: float | None = None, timings_dir: str | None = None) -> None:
    provider = provider or ("openvino" if is_ir(model) else "cpu")
    if timings_dir is not None:  # the stubs write into it; they cannot create it
        try:
            Path(timings_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TqcError(f"--timings: cannot make the folder '{timings_dir}': {exc.strerror}") from None
    opts = ServeOptions(model=model, name=name, provider=provider,
                        endpoints=("raw", "text") if endpoints == "both" else (endpoints,), tokenizer=tokenizer,
                        max_length=max_length, long_text=long_text, max_batch=max_batch,
                        preferred_batch=parse_sizes(preferred_batch), queue_delay_us=queue_delay_us,
                        instances=instances, threads=threads, cuda_graph=cuda_graph, max_padding=max_padding,
                        timings_dir=timings_dir)
    if cuda_graph and provider != "cuda":
        raise TqcError("--cuda-graph needs --provider cuda")
    server = TritonServer(opts, Ports(*ports), host=host, startup_timeout=startup_timeout)

    stopping: list[int] = []
    serving = False

    def stop(signum, frame):
        if stopping:  # a second signal while the server stops: finish stopping (nothing may be left behind)
            return
        stopping.append(signum)
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        progress(f"starting tritonserver for {model} ({provider})")
        server.start()
        for model_name, kind in server.models.items():
            what = ("UINT8 TEXT (UTF-8) -> embeddings" if kind == "text" else "the model's own tensors")
            click.echo(f"model '{model_name}' ({kind}): {what}")
        if endpoints == "both" and "text" not in server.models.values():
            click.echo("no text endpoint: the export records no tokenizer (give --tokenizer DIR)")
        for note in server.text.get("notes", []):
            click.echo(f"note: {note}", err=True)
        if server.text:
            click.echo(f"text: tokenizer {server.text['tokenizer']}, limit {server.text['max_length']} tokens "
                       f"({server.text['long_text']}), pooling {server.text['pooling']}, "
                       f"normalized {str(server.text['normalize']).lower()}")
        batching = (f"dynamic batching (queue delay {queue_delay_us} us, preferred {list(opts.preferred_batch)})"
                    if queue_delay_us or opts.preferred_batch else "no dynamic batching")
        batching += f"; {instances} instance{'s' if instances > 1 else ''}"
        if server.text:
            batching += f", text in length groups of at most {opts.max_padding:g} padding"
        click.echo(f"serving on http://{server.http_url} grpc {server.grpc_url} metrics {server.metrics_url}; "
                   f"{batching}; max batch {max_batch}. SIGTERM or Ctrl-C stops it.", nl=True)
        serving = True
        while server.running():
            time.sleep(0.2)
        raise ServerDied(f"tritonserver exited on its own; its log's last line: "
                         f"{(server.log().strip().splitlines() or [''])[-1][:300]}")
    except _Stop as stop_signal:
        progress(f"{stop_signal}: stopping the server")
        if not serving:  # interrupted while starting: the command did not do what it was asked (130/143)
            raise Interrupted(stopping[0]) from None
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
