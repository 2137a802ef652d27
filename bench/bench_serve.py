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


def triton_stats(url: str, model: str) -> dict:
    """Average server-side time per request (queue, compute input/infer/output), ms, from Triton's statistics."""
    import tritonclient.http as httpclient

    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    inference = stats["inference_stats"]
    count = max(int(inference["success"]["count"]), 1)
    out = {"requests": count, "executions": int(stats.get("execution_count", 0))}
    for key in ("queue", "compute_input", "compute_infer", "compute_output", "success"):
        out[f"{key}_ms"] = round(int(inference[key]["ns"]) / count / 1e6, 4)
    out["rows_per_execution"] = round(int(stats.get("inference_count", 0)) / max(out["executions"], 1), 2)
    return out


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
    try:
        for path, label, provider in models:
            opts = ServeOptions(model=path, name="m", endpoints=("text",), provider=provider, threads=args.threads,
                                tokenizer=args.tokenizer, queue_delay_us=0, max_batch=64)
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
        rows.append(row)
        print(line)
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
                            if protocol == "grpc" and args.client_procs > 1 and concurrency >= 16:
                                result = run_load(url, "m_text", payloads, concurrency, args.seconds, args.client_procs)
                            else:
                                result = Load(url, protocol, "m_text", payloads, concurrency).run(args.seconds)
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
    model_timings = {}
    for (label, batching) in servers:
        for file in (timings_dir / f"{label}-{batching}").glob("*.timings.json"):
            shapes = json.loads(file.read_text())
            model_timings[f"{label}/{batching}"] = {
                shape: {"tokenize_ms": round(v[0] / v[3] * 1000, 4), "ort_ms": round(v[1] / v[3] * 1000, 4),
                        "pool_ms": round(v[2] / v[3] * 1000, 4), "calls": v[3]}
                for shape, v in sorted(shapes.items(), key=lambda kv: -kv[1][3])}
    if model_timings:
        print("\ninside the model's execute, per call by padded shape ROWSxSEQ (ms): tokenizer / ORT / pooling (calls)")
        for key, shapes in model_timings.items():
            print(f"  {key:<14} " + "; ".join(f"{shape}: {v['tokenize_ms']:.3f} / {v['ort_ms']:.3f} / "
                                             f"{v['pool_ms']:.3f} ({v['calls']})" for shape, v in list(shapes.items())[:6]))
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
