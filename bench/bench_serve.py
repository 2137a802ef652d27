"""End-to-end serving benchmark: ``tqc serve`` (tritonserver, python backend, ORT) driven by tritonclient.

Every configuration (model x dynamic batching on/off) runs in its own server, all started at once; rounds are
interleaved (each round visits every configuration, protocol and concurrency once), so ratios compare numbers
taken under the same machine load. Requests are text in (UTF-8 bytes, tokenized in the server), one real
held-out sentence per request (the last 1,000 of ../shared/data/sentences.txt), or texts of an exact token
count with ``--tokens``.

    python bench/bench_serve.py                      # CPU: MiniLM FP32 vs INT8 (fold,fuse,qdq --target ort-cpu)
    python bench/bench_serve.py --soak 120           # + a 2-minute run at concurrency 16, RSS of the server sampled
    python bench/bench_serve.py --model a.onnx:fp16 --provider cuda --cuda-graph --tokens 16,128 ...  (GPU)

Per cell: throughput (requests/s), latency p50/p95/p99 (ms, client side), errors; per configuration, where
the time goes: Triton's own statistics (queue, compute) and the model's (tokenizer, ORT call, pooling).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import run_load, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT.parent / "shared" / "data" / "sentences.txt"


def held_out_sentences() -> list[str]:
    """The last 1,000 of ../shared/data/sentences.txt (beside the checkout; $TQC_BENCH_SENTENCES overrides), else
    the 64 sentences the package ships."""
    path = Path(os.environ.get("TQC_BENCH_SENTENCES", SENTENCES))
    if path.exists():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return lines[-1000:]
    from tqc.compiler.analysis.calib_data import read_sentences

    return read_sentences(ROOT / "models" / "data" / "calib_sentences.txt")


def texts_of_tokens(tokenizer_dir: str, count: int, pool: list[str]) -> list[str]:
    """Real text cut so that it tokenizes to exactly ``count`` tokens ([CLS] and [SEP] included)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    texts = []
    for start in range(0, min(len(pool), 400), 4):
        long_text = " ".join(pool[start:start + 40])
        encoding = tokenizer.encode(long_text)
        if len(encoding.ids) < count:
            continue
        end = encoding.offsets[count - 2][1]  # last word piece before [SEP]
        text = long_text[:end]
        if len(tokenizer.encode(text).ids) == count:
            texts.append(text)
        if len(texts) >= 32:
            break
    if not texts:
        raise SystemExit(f"no text of exactly {count} tokens could be cut from the sentences")
    return texts


def encode(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8)[None] for t in texts]


def process_rss_mib(pgid: int) -> float:
    """Resident memory of every process in the server's group (tritonserver and its stubs), MiB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


class Load:
    """``concurrency`` threads, each with its own client, sending one text per request for ``seconds``."""

    def __init__(self, url: str, protocol: str, model: str, payloads: list[np.ndarray], concurrency: int):
        self.url, self.protocol, self.model, self.payloads, self.concurrency = url, protocol, model, payloads, concurrency

    def _client(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module, module.InferenceServerClient(self.url)

    def run(self, seconds: float, max_requests: int = 10**9) -> dict:
        latencies: list[list[float]] = [[] for _ in range(self.concurrency)]
        errors = [0] * self.concurrency
        messages: list[str] = []
        stop_at = [0.0]
        barrier = threading.Barrier(self.concurrency + 1)

        def worker(slot: int) -> None:
            module, client = self._client()
            inputs = []
            for payload in self.payloads:
                tensor = module.InferInput("TEXT", list(payload.shape), "UINT8")
                tensor.set_data_from_numpy(payload)
                inputs.append(tensor)
            barrier.wait()
            i = slot
            while time.perf_counter() < stop_at[0] and len(latencies[slot]) < max_requests:
                start = time.perf_counter()
                try:
                    client.infer(self.model, [inputs[i % len(inputs)]])
                    latencies[slot].append(time.perf_counter() - start)
                except Exception as exc:  # counted, and the first few kept for the log
                    errors[slot] += 1
                    if len(messages) < 3:
                        messages.append(str(exc)[:200])
                i += self.concurrency

        threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in range(self.concurrency)]
        for thread in threads:
            thread.start()
        stop_at[0] = time.perf_counter() + 3600
        barrier.wait()
        began = time.perf_counter()
        stop_at[0] = began + seconds
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        return summarize(np.array([x for slot in latencies for x in slot]), sum(errors), elapsed, messages)


STAT_KEYS = ("queue", "compute_input", "compute_infer", "compute_output", "success")


def triton_counters(url: str, model: str) -> dict:
    """Triton's cumulative statistics of ``model``: ns per step, requests, executions, rows."""
    import tritonclient.http as httpclient

    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    inference = stats["inference_stats"]
    out = {f"{key}_ns": int(inference[key]["ns"]) for key in STAT_KEYS}
    out.update(requests=int(inference["success"]["count"]), executions=int(stats.get("execution_count", 0)),
               rows=int(stats.get("inference_count", 0)))
    return out


def triton_stats(url: str, model: str, since: dict | None = None) -> dict:
    """Average server-side time per request (queue, compute input/infer/output, success: the whole request in
    the server), ms, from Triton's statistics: over the whole run, or since the counters ``since``."""
    now = triton_counters(url, model)
    delta = {key: value - (since or {}).get(key, 0) for key, value in now.items()}
    count = max(delta["requests"], 1)
    out = {"requests": delta["requests"], "executions": delta["executions"]}
    for key in STAT_KEYS:
        out[f"{key}_ms"] = round(delta[f"{key}_ns"] / count / 1e6, 4)
    out["rows_per_execution"] = round(delta["rows"] / max(delta["executions"], 1), 2)
    return out


STUB_STEPS = ("tokenize", "runtime", "pool", "calls", "decode", "respond", "execute")


def stub_totals(folder: Path, since: dict | None = None) -> dict:
    """The text model's own timings as the stubs write them (``tqc serve --timings``): per padded shape, seconds
    summed over its calls of tokenizer, runtime, pooling, the count of calls, then TEXT decode, response building
    and the whole execute; all instances added up, less the totals ``since``."""
    shapes: dict = {}
    for file in folder.glob("*.timings.json"):  # one per instance
        for shape, values in json.loads(file.read_text()).items():
            entry = shapes.setdefault(shape, [0.0] * len(STUB_STEPS))
            for index, value in enumerate(values):
                entry[index] += value - ((since or {}).get(shape, [0.0] * len(values))[index])
    return shapes


def stub_timings(folder: Path, since: dict | None = None) -> dict:
    """``stub_totals`` as ms per call of each step: "all" (every shape together), then by padded shape, the most
    called first."""
    shapes = stub_totals(folder, since)
    if shapes:
        shapes = {"all": [sum(v[i] for v in shapes.values()) for i in range(len(STUB_STEPS))], **shapes}
    return {shape: {**{f"{step}_ms": round(v[i] / v[3] * 1000, 4) for i, step in enumerate(STUB_STEPS) if i != 3},
                    "calls": int(round(v[3]))}
            for shape, v in sorted(shapes.items(), key=lambda kv: -kv[1][3]) if v[3] > 0}


def flushed_totals(server, client, tensor) -> dict:
    """The stub's totals with everything so far written: it writes at most once a second, on a request, so one
    more request after a second's pause (counted in the totals like the others)."""
    time.sleep(1.1)
    client.infer("m_text", [tensor])
    return stub_totals(Path(server.opts.timings_dir))


def batch1_breakdown(server, protocol: str, client, inputs: list) -> dict:
    """Where one request's time goes at batch 1, over ``protocol``: each input sent once, one at a time. Client
    side: the wall time and this process's CPU time per request (tritonclient's request building and response
    parsing, gRPC's or HTTP's own threads). Server side: Triton's statistics over exactly these requests
    (success: from the request's arrival in Triton's core to its response; compute_infer: the python
    backend's hand-off and the stub's execute) and the stub's own split of its execute. What is left of the
    wall time after the server's success time is the front end, the transport and the client."""
    before = triton_counters(server.http_url, "m_text")
    walls = []
    cpu = time.process_time()
    for tensor in inputs:
        start = time.perf_counter()
        client.infer("m_text", [tensor])
        walls.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu) / len(inputs)
    server_side = triton_stats(server.http_url, "m_text", since=before)
    wall = float(np.mean(walls)) * 1000
    return {"protocol": protocol, "requests": len(inputs), "wall_p50_ms": round(float(np.median(walls)) * 1000, 4),
            "wall_mean_ms": round(wall, 4), "client_cpu_ms": round(cpu * 1000, 4), **server_side,
            "outside_server_ms": round(wall - server_side["success_ms"], 4)}


def transport_floor(client, protocol: str, inputs: list, count: int = 200) -> dict:
    """What the protocol costs without the model: the p50 of a health call (is_server_live: the client library,
    the transport and Triton's front end, no model), and for gRPC the p50 of the model call made with a request
    built once (grpcio's stub alone: tritonclient's request building and result wrapping left out)."""
    out = {}
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.is_server_live()
        times.append(time.perf_counter() - start)
    out["live_p50_ms"] = round(float(np.median(times)) * 1000, 4)
    if protocol == "grpc":
        from tritonclient.grpc._utils import _get_inference_request

        request = _get_inference_request(model_name="m_text", inputs=[inputs[0]], model_version="", request_id="",
                                         outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
                                         priority=0, timeout=None, parameters=None)
        wrapped, raw = [], []
        for _ in range(count // 2):
            start = time.perf_counter()
            client.infer("m_text", [inputs[0]])
            wrapped.append(time.perf_counter() - start)
            start = time.perf_counter()
            client._client_stub.ModelInfer(request=request)
            raw.append(time.perf_counter() - start)
        out["tritonclient_own_ms"] = round(float(np.median(wrapped) - np.median(raw)) * 1000, 4)
    return out


def print_breakdown(label: str, rows: list[dict], stub: dict) -> None:
    print(f"\nwhere the time goes, {label}, batch 1 (ms per request, means; Triton's statistics over the same "
          "requests; outside = wall mean - success: front end, transport, client; live p50: a health call's round "
          "trip; tritonclient: its own share of a gRPC call):")
    print(f"  {'proto':<5} {'wall p50':>8} {'mean':>7} {'client CPU':>10} {'outside':>8} {'success':>8} {'queue':>7} "
          f"{'c_input':>8} {'c_infer':>8} {'c_output':>8} {'live p50':>8} {'tritonclient':>12}")
    for row in rows:
        print(f"  {row['protocol']:<5} {row['wall_p50_ms']:>8.3f} {row['wall_mean_ms']:>7.3f} "
              f"{row['client_cpu_ms']:>10.3f} {row['outside_server_ms']:>8.3f} {row['success_ms']:>8.3f} "
              f"{row['queue_ms']:>7.3f} {row['compute_input_ms']:>8.3f} {row['compute_infer_ms']:>8.3f} "
              f"{row['compute_output_ms']:>8.3f} {row['live_p50_ms']:>8.3f} {row.get('tritonclient_own_ms', float('nan')):>12.3f}")
    for row in rows:  # the stub's own split of the same requests (a few more: the flushes)
        steps = row.get("stub", {})
        if steps:
            print(f"  stub execute, {row['protocol']} requests ({steps['calls']} calls): " + ", ".join(
                f"{step} {steps[f'{step}_ms']:.3f}" for step in STUB_STEPS if step != "calls"))
    for shape, steps in list(stub.items())[:4]:
        print(f"  stub execute {shape}, whole run ({steps['calls']} calls): " + ", ".join(
            f"{step} {steps[f'{step}_ms']:.3f}" for step in STUB_STEPS if step != "calls" and f"{step}_ms" in steps))


def build_cpu_models(workdir: Path, pool: bool = False, openvino: bool = False) -> list[tuple[str, str, str]]:
    """MiniLM FP32 (tqc export; with ``pool``: fold,fuse,pool), INT8 for ORT (fold,fuse,qdq --target ort-cpu,
    calibrated on shipped sentences; + pool) and, with ``openvino``, INT8 OpenVINO IR (fold,fuse,qdq --target
    openvino; + pool). Returns (path, label, provider)."""
    workdir.mkdir(parents=True, exist_ok=True)
    export = workdir / "minilm.onnx"
    tqc = [sys.executable, "-m", "tqc", "-q"]
    calib = ["--calib", str(ROOT / "models" / "data" / "calib_sentences.txt")]
    if not export.exists():
        subprocess.run(tqc + ["export", "minilm", "-o", str(export)], check=True)
    tail = ",pool" if pool else ""
    suffix = ".pool" if pool else ""
    plans = [("fp32", "fold,fuse" + tail if pool else "", "ort-cpu", f"minilm{suffix}.onnx", "cpu"),
             ("int8", "fold,fuse,qdq" + tail, "ort-cpu", f"minilm.int8{suffix}.onnx", "cpu")]
    if openvino:
        plans.append(("ov-int8", "fold,fuse,qdq" + tail, "openvino", f"minilm.ov-int8{suffix}.xml", "openvino"))
    models = []
    for label, pipeline, target, name, provider in plans:
        path = workdir / name
        if pipeline and not path.exists():
            subprocess.run(tqc + ["compile", str(export), "-p", pipeline, "--target", target, *calib, "-o", str(path)],
                           check=True)
        models.append((str(path if pipeline else export), label + ("-pool" if pool else ""), provider))
    return models


class InProcess:
    """The baseline of ``--overhead``: what the stub does for one text, in this process: the repository's own
    tokenizer.json through ``tokenizers``, the same runtime and options (ORT session, or OpenVINO at FP32
    precision), pooling and normalisation in numpy unless the graph pools."""

    def __init__(self, server):
        from tokenizers import Tokenizer

        version = server.tmp / "repo" / "m_text" / "1"
        self.conf = json.loads((version / "serve.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(version / self.conf["tokenizer"]))
        self.tokenizer.enable_truncation(self.conf["max_length"])
        self.names = [i["name"] for i in self.conf["inputs"]]
        threads = self.conf.get("threads")
        if self.conf["provider"] == "openvino":
            import openvino as ov

            core = ov.Core()
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            compiled = core.compile_model(core.read_model(self.conf["onnx"]), "CPU", config)
            request, port = compiled.create_infer_request(), compiled.output(self.conf["output"])
            self.run = lambda feed: request.infer(feed, share_inputs=True)[port].copy()
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
            session = ort.InferenceSession(self.conf["onnx"], options, providers=["CPUExecutionProvider"])
            wanted = [self.conf["output"]]
            self.run = lambda feed: session.run(wanted, feed)[0]

    def __call__(self, text: str) -> np.ndarray:
        encoding = self.tokenizer.encode(text)
        values = {"input_ids": np.array([encoding.ids], dtype=np.int64),
                  "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
                  "token_type_ids": np.array([encoding.type_ids], dtype=np.int64)}
        out = self.run({name: values[name] for name in self.names})
        if self.conf["pooling"] == "mean":  # one text: no padding, the mean over its tokens
            out = out.mean(axis=1)
        elif self.conf["pooling"] == "cls":
            out = out[:, 0]
        elif self.conf["pooling"] == "max":
            out = out.max(axis=1)
        if self.conf["pooling"] != "graph" and self.conf["normalize"]:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def overhead_main(args, models) -> None:
    """``--overhead``: per round, for each model, each of N texts in process, then through the server over each
    protocol, one at a time (batch 1, no dynamic batching); the overhead is the difference of the p50s of the
    same round, and the figure is its median over rounds; "paired" is the median over texts of the difference
    of the two adjacent measurements of one text, median over rounds."""
    from tqc.compiler.tools.serve.repository import ServeOptions
    from tqc.compiler.tools.serve.server import TritonServer

    protocols = [p for p in args.protocols.split(",") if p]
    texts = held_out_sentences()[:args.requests]
    servers, baselines, cells = {}, {}, {}
    breakdowns: dict[str, list[dict]] = {}
    stubs: dict[str, dict] = {}
    try:
        for path, label, provider in models:
            timings = Path(args.workdir) / "timings-overhead" / label
            timings.mkdir(parents=True, exist_ok=True)
            for old in timings.glob("*.timings.json"):
                old.unlink()
            opts = ServeOptions(model=path, name="m", endpoints=("text",), provider=provider, threads=args.threads,
                                tokenizer=args.tokenizer, queue_delay_us=0, max_batch=64, timings_dir=str(timings))
            print(f"starting {label} ({provider})", file=sys.stderr, flush=True)
            servers[label] = TritonServer(opts, startup_timeout=600).start()
            baselines[label] = InProcess(servers[label])
        clients = {}
        for label, server in servers.items():
            for protocol in protocols:
                if protocol == "grpc":
                    import tritonclient.grpc as module
                else:
                    import tritonclient.http as module
                client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
                inputs = []
                for payload in encode(texts):
                    tensor = module.InferInput("TEXT", list(payload.shape), "UINT8")
                    tensor.set_data_from_numpy(payload)
                    inputs.append(tensor)
                clients[(label, protocol)] = (client, inputs)
                served = client.infer("m_text", [inputs[0]]).as_numpy("embeddings")  # warm-up and a check
                here = baselines[label](texts[0])
                worst = float(np.abs(served - here).max())
                print(f"{label} {protocol}: served vs in-process max |diff| {worst:.2e}", file=sys.stderr)
                if worst > 1e-4:
                    raise SystemExit(f"{label}: the server's answer differs from the in-process run ({worst:.2e})")
            for text in texts[:20]:
                baselines[label](text)
        for round_index in range(args.rounds):
            for label in servers:  # interleaved per text: a change of the machine's load hits every column
                latencies: dict[str, list[float]] = {kind: [] for kind in ["in-process", *protocols]}
                for index, text in enumerate(texts):
                    start = time.perf_counter()
                    baselines[label](text)
                    latencies["in-process"].append(time.perf_counter() - start)
                    for protocol in protocols:
                        client, inputs = clients[(label, protocol)]
                        start = time.perf_counter()
                        client.infer("m_text", [inputs[index]])
                        latencies[protocol].append(time.perf_counter() - start)
                for kind, values in latencies.items():
                    cells.setdefault((label, kind), []).append(float(np.median(values)) * 1000)
                for protocol in protocols:  # text by text, adjacent in time: the least sensitive to load drift
                    paired = np.subtract(latencies[protocol], latencies["in-process"])
                    cells.setdefault((label, f"{protocol} paired"), []).append(float(np.median(paired)) * 1000)
                print(f"round {round_index} {label}: " + ", ".join(
                    f"{kind} {cells[(label, kind)][-1]:.3f} ms" for kind in ["in-process", *protocols]),
                    file=sys.stderr, flush=True)
        for label, server in servers.items():  # after the rounds: each protocol alone, with the server's split
            for protocol in protocols:
                client, inputs = clients[(label, protocol)]
                totals = flushed_totals(server, client, inputs[0])
                row = batch1_breakdown(server, protocol, client, inputs)
                flushed_totals(server, client, inputs[0])
                row["stub"] = stub_timings(Path(server.opts.timings_dir), since=totals).get("all", {})
                row.update(transport_floor(client, protocol, inputs))
                breakdowns.setdefault(label, []).append(row)
            stubs[label] = stub_timings(Path(server.opts.timings_dir))
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    print(f"\nbatch 1, p50 per round, median over {args.rounds} rounds ({len(texts)} real held-out sentences per "
          f"cell): ms")
    print(f"{'model':<14} {'in-process':>10} " + " ".join(f"{p:>8} {'overhead':>8} {'paired':>8}" for p in protocols))
    for label in servers:
        base = cells[(label, "in-process")]
        row = {"model": label, "in_process_ms": round(float(np.median(base)), 4), "rounds": args.rounds}
        line = f"{label:<14} {row['in_process_ms']:>10.3f} "
        for protocol in protocols:
            served = cells[(label, protocol)]
            row[f"{protocol}_ms"] = round(float(np.median(served)), 4)
            row[f"{protocol}_overhead_ms"] = round(float(np.median(np.subtract(served, base))), 4)
            row[f"{protocol}_rounds_ms"] = [round(x, 4) for x in served]
            row[f"{protocol}_paired_overhead_ms"] = round(float(np.median(cells[(label, f"{protocol} paired")])), 4)
            line += (f"{row[f'{protocol}_ms']:>8.3f} {row[f'{protocol}_overhead_ms']:>8.3f} "
                     f"{row[f'{protocol}_paired_overhead_ms']:>8.3f} ")
        row["in_process_rounds_ms"] = [round(x, 4) for x in base]
        row["breakdown"], row["stub_timings"] = breakdowns.get(label, []), stubs.get(label, {})
        rows.append(row)
        print(line)
    for label in servers:
        print_breakdown(label, breakdowns.get(label, []), stubs.get(label, {}))
    if args.json:
        payload = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}, "args": vars(args),
                   "models": models, "overhead": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="PATH:LABEL",
                        help="Models to serve (default: MiniLM FP32 and INT8, built in --workdir).")
    parser.add_argument("--workdir", default="/tmp/tqc-bench-serve")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the export's).")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads in the server.")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--batching", default="off,on", help="off: no dynamic batching; on: --queue-delay-us.")
    parser.add_argument("--queue-delay-us", type=int, default=500)
    parser.add_argument("--preferred-batch", default="4,8,16")
    parser.add_argument("--tokens", default="", help="Exact token counts of the texts (e.g. 16,128); "
                                                       "default: real sentences as they are.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Per cell and round.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--soak", type=float, default=0.0, help="Seconds of the soak run at --soak-concurrency.")
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--instances", type=int, default=1, help="Model instances per server (tqc serve --instances).")
    parser.add_argument("--max-batch", type=int, default=64, help="Rows per execute (tqc serve --max-batch).")
    parser.add_argument("--max-padding", type=float, default=None, help="tqc serve --max-padding (default: serve's).")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="gRPC load from this many processes (bench/loadgen.py, asyncio) at concurrency >= 16; "
                             "1: one process of threads. One Python process cannot drive thousands of requests/s.")
    parser.add_argument("--timings-dir", default=None, help="Keep the model's own timings (tokenizer/ORT/pool).")
    parser.add_argument("--pool", action="store_true", help="Built models end with the pool pass (pooled in the "
                                                             "graph).")
    parser.add_argument("--openvino", action="store_true", help="Also build and serve an OpenVINO INT8 IR.")
    parser.add_argument("--overhead", action="store_true",
                        help="Batch 1, one request at a time: tqc serve against the same tokenizer + runtime "
                             "in this process, interleaved per round (--requests each), instead of the load test.")
    parser.add_argument("--requests", type=int, default=300, help="--overhead: requests per cell and round.")
    args = parser.parse_args()

    from tqc.compiler.cli.serve import parse_sizes
    from tqc.compiler.tools.serve.repository import ServeOptions
    from tqc.compiler.tools.serve.server import TritonServer

    models = [(*(m.rsplit(":", 1) if ":" in m else (m, Path(m).stem)), args.provider) for m in args.model]
    if not models:
        models = build_cpu_models(Path(args.workdir), pool=args.pool, openvino=args.openvino)
    if args.overhead:
        return overhead_main(args, models)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    protocols = [p for p in args.protocols.split(",") if p]
    batchings = [b for b in args.batching.split(",") if b]
    token_counts = [int(t) for t in args.tokens.split(",") if t] or [0]
    timings_dir = Path(args.timings_dir or Path(args.workdir) / "timings")
    timings_dir.mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        for path, label, provider in models:
            for batching in batchings:
                opts = ServeOptions(model=path, name="m", endpoints=("text",), provider=provider,
                                    tokenizer=args.tokenizer, cuda_graph=args.cuda_graph, threads=args.threads,
                                    queue_delay_us=args.queue_delay_us if batching == "on" else 0,
                                    preferred_batch=parse_sizes(args.preferred_batch) if batching == "on" else (),
                                    max_batch=args.max_batch, instances=args.instances, max_padding=args.max_padding,
                                    timings_dir=str(timings_dir / f"{label}-{batching}"))
                Path(opts.timings_dir).mkdir(parents=True, exist_ok=True)
                print(f"starting {label} batching={batching}", file=sys.stderr, flush=True)
                servers[(label, batching)] = TritonServer(opts, startup_timeout=600).start()
        first = next(iter(servers.values()))
        pool = held_out_sentences()
        payload_sets = {tokens: encode(texts_of_tokens(first.text["tokenizer"], tokens, pool) if tokens else pool[:256])
                        for tokens in token_counts}
        rows: dict[tuple, list[dict]] = {}
        for (label, batching), server in servers.items():  # warm-up: every bucket shape once
            for tokens, payloads in payload_sets.items():
                Load(server.grpc_url, "grpc", "m_text", payloads, max(concurrencies)).run(1.0)
        for round_index in range(args.rounds):
            for tokens, payloads in payload_sets.items():
                for protocol in protocols:
                    for concurrency in concurrencies:
                        for (label, batching), server in servers.items():
                            url = server.grpc_url if protocol == "grpc" else server.http_url
                            counters = triton_counters(server.http_url, "m_text")
                            if protocol == "grpc" and args.client_procs > 1 and concurrency >= 16:
                                result = run_load(url, "m_text", payloads, concurrency, args.seconds, args.client_procs)
                            else:
                                result = Load(url, protocol, "m_text", payloads, concurrency).run(args.seconds)
                            result["server"] = triton_stats(server.http_url, "m_text", since=counters)
                            rows.setdefault((label, batching, protocol, concurrency, tokens), []).append(result)
                            print(f"round {round_index} {label:<6} batching={batching:<3} {protocol:<4} "
                                  f"c={concurrency:<3} tokens={tokens or 'real'}: {result.get('p50_ms', '-')} ms p50, "
                                  f"{result['throughput']} req/s, {result['errors']} errors", file=sys.stderr, flush=True)
        table = []
        for (label, batching, protocol, concurrency, tokens), results in rows.items():
            lat = {f"p{q}_ms": float(np.median([r.get(f"p{q}_ms", np.nan) for r in results])) for q in (50, 95, 99)}
            table.append({"model": label, "batching": batching, "protocol": protocol, "concurrency": concurrency,
                          "tokens": tokens or "real", "throughput": float(np.median([r["throughput"] for r in results])),
                          **lat, "requests": sum(r["requests"] for r in results),
                          "errors": sum(r["errors"] for r in results), "rounds": results})
        anchor = models[0][1]
        print(f"\n{'model':<8} {'batch':<5} {'proto':<5} {'conc':>4} {'tokens':>6} {'req/s':>9} {'p50 ms':>8} "
              f"{'p95':>8} {'p99':>8} {'errors':>6}  req/s vs {anchor}")
        for row in table:
            base = next(r for r in table if r["model"] == anchor and all(
                r[k] == row[k] for k in ("batching", "protocol", "concurrency", "tokens")))
            ratio = row["throughput"] / base["throughput"] if base["throughput"] else float("nan")
            print(f"{row['model']:<8} {row['batching']:<5} {row['protocol']:<5} {row['concurrency']:>4} "
                  f"{row['tokens']!s:>6} {row['throughput']:>9.1f} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} "
                  f"{row['p99_ms']:>8.2f} {row['errors']:>6}  {ratio:.2f}x")
        print("\nbatch 1 (concurrency 1), where a request's time goes: client p50 and Triton's statistics over the "
              "cell's requests (ms, means, median over rounds): success = the request inside Triton, compute_infer = "
              "the python backend's hand-off + the stub's execute; outside = client mean - success")
        for row in table:
            if row["concurrency"] != 1:
                continue
            server_side = {key: float(np.median([r["server"][key] for r in row["rounds"]]))
                           for key in ("success_ms", "queue_ms", "compute_input_ms", "compute_infer_ms",
                                       "compute_output_ms")}
            mean = float(np.median([r["mean_ms"] for r in row["rounds"] if "mean_ms" in r] or [np.nan]))
            row["server_batch1"] = dict(server_side, outside_ms=round(mean - server_side["success_ms"], 4))
            print(f"  {row['model']:<8} {row['batching']:<3} {row['protocol']:<4} tokens={row['tokens']!s:<4} "
                  f"p50 {row['p50_ms']:.3f}  mean {mean:.3f}  outside {mean - server_side['success_ms']:.3f}  "
                  f"success {server_side['success_ms']:.3f}  queue {server_side['queue_ms']:.3f}  compute_input "
                  f"{server_side['compute_input_ms']:.3f}  compute_infer {server_side['compute_infer_ms']:.3f}  "
                  f"compute_output {server_side['compute_output_ms']:.3f}")
        where = {f"{label}/{batching}": triton_stats(server.http_url, "m_text")
                 for (label, batching), server in servers.items()}
        print("\nwhere the time goes (server side, per request, ms; Triton's statistics over the whole run):")
        for key, stats in where.items():
            print(f"  {key:<14} queue {stats['queue_ms']:.3f}  compute_input {stats['compute_input_ms']:.3f}  "
                  f"compute_infer {stats['compute_infer_ms']:.3f}  compute_output {stats['compute_output_ms']:.3f}  "
                  f"total {stats['success_ms']:.3f}  rows/execution {stats['rows_per_execution']}")
        soak = None
        if args.soak > 0:
            label, batching = models[-1][1], batchings[-1]
            server = servers[(label, batching)]
            payloads = next(iter(payload_sets.values()))
            samples: list[tuple[float, float]] = []
            done = threading.Event()

            def sample() -> None:
                start = time.perf_counter()
                while not done.is_set():
                    samples.append((round(time.perf_counter() - start, 1), round(process_rss_mib(server.pgid), 1)))
                    done.wait(1.0)

            sampler = threading.Thread(target=sample, daemon=True)
            print(f"\nsoak: {label} batching={batching} grpc c={args.soak_concurrency} for {args.soak:.0f}s",
                  file=sys.stderr, flush=True)
            sampler.start()
            result = Load(server.grpc_url, "grpc", "m_text", payloads, args.soak_concurrency).run(args.soak)
            done.set()
            sampler.join()
            rss = [s[1] for s in samples]
            tenth = max(len(rss) // 10, 1)
            first_mib, last_mib = float(np.median(rss[:tenth])), float(np.median(rss[-tenth:]))
            soak = {"model": label, "batching": batching, "protocol": "grpc", "concurrency": args.soak_concurrency,
                    **{k: v for k, v in result.items()}, "rss_mib_first_tenth": first_mib,
                    "rss_mib_last_tenth": last_mib, "rss_growth_mib": round(last_mib - first_mib, 1),
                    "rss_max_mib": max(rss), "rss_samples": samples}
            print(f"soak: {result['requests']} requests in {result['seconds']}s, {result['errors']} errors, "
                  f"p50 {result.get('p50_ms')} ms p99 {result.get('p99_ms')} ms; server RSS (tritonserver + stubs) "
                  f"{first_mib:.1f} MiB (first tenth) -> {last_mib:.1f} MiB (last tenth), max {max(rss):.1f} MiB")
    finally:
        for server in servers.values():
            server.stop()
    model_timings = {f"{label}/{batching}": stub_timings(timings_dir / f"{label}-{batching}")
                     for (label, batching) in servers}
    model_timings = {key: shapes for key, shapes in model_timings.items() if shapes}
    if model_timings:
        print("\ninside the model's execute, per call by padded shape ROWSxSEQ (ms): TEXT decode / tokenizer / "
              "runtime / pooling / response (calls)")
        for key, shapes in model_timings.items():
            print(f"  {key:<14} " + "; ".join(
                f"{shape}: {v.get('decode_ms', 0):.3f} / {v['tokenize_ms']:.3f} / {v['runtime_ms']:.3f} / "
                f"{v['pool_ms']:.3f} / {v.get('respond_ms', 0):.3f} ({v['calls']})"
                for shape, v in list(shapes.items())[:6]))
    payload = {"machine": {"cpus": os.cpu_count(), "provider": args.provider, "cuda_graph": args.cuda_graph,
                           "threads": args.threads},
               "args": vars(args), "models": models, "table": table, "triton_stats": where,
               "model_timings": model_timings, "soak": soak}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
