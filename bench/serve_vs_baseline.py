"""Batch-1 text-in latency of ``tqc serve`` against the hand-written Triton python-backend baseline, one client.

The baseline is ``../shared/gpu/baseline_pyback`` (``model.py``: tokenizer + ORT CUDA with IO binding and one CUDA
graph per shape + mean pooling + L2 norm, all in the stub; or any folder with its ``config.pbtxt`` and
``model.py``). Both servers run at once on this host, each started the way its own script starts it, and one
client measures both with the same loop (the baseline's: sequential gRPC requests, 200 warm-up, then timed),
alternating which server goes first each round, so every figure is a ratio taken under the same conditions.

Texts: the baseline's own two (11 and 128 tokens after its truncation at 128) and one of exactly 16 tokens;
``tqc serve`` runs with ``--max-length 128`` so the long text is truncated alike.

    python bench/serve_vs_baseline.py --tqc-model minilm.pooled.fp16.onnx --baseline-model minilm.fp16.onnx \
        --tokenizer TOKENIZER_DIR --baseline-dir BASELINE_DIR [--rounds 3] [--json out.json] [-- tqc serve options]
    python bench/serve_vs_baseline.py --tqc-model bert.pooled.fp16.onnx --tokenizer DIR --texts 16,128 ...
        (tqc alone: no baseline server; answers checked against the model run in this process)

Needs the GPU machine's serving setup (../shared/gpu/README.md: the carried wheels in /tmp/site); ``--device cpu``
tries it on a CPU (the baseline's ``model.py`` copied with ORT CPU).

Before any timing, tqc's embedding of each text is compared with the baseline's (or the in-process model's):
an answer that cannot be read, or a cosine below 0.999, stops the run (exit 1, no timings).

For both servers it also prints where a batch-1 request's time goes, per protocol and text: Triton's statistics
over each cell's requests (queue, compute_input, compute_infer, compute_output; success: the whole request inside
Triton), for tqc the stub's own split of its execute (``tqc serve --timings``: TEXT decode, tokenizer, runtime,
pooling, response building), what is outside the server (client mean minus success), and each server's transport
floor (a health call's round trip per protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import STUB_STEPS, stub_timings, stub_totals, triton_counters, triton_stats  # noqa: E402

TQC_TIMINGS = Path("/tmp/svb_tqc_timings")
S11 = "a short sentence about fast transformer inference."
S128 = " ".join(["the compiler fuses attention and quantizes matrix products for deployment"] * 12)


def pytriton_site() -> Path:
    """The folder holding the nvidia-pytriton wheel's ``pytriton`` and ``nvidia_pytriton.libs``."""
    import importlib.util  # found, not imported: importing pytriton needs pyzmq, which the stub setup lacks

    return Path(importlib.util.find_spec("pytriton").origin).resolve().parent.parent


def wait_ready(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {seconds:.0f}s; log {log}:\n{log.read_text()[-3000:]}")


PTH_FILES: list[Path] = []
# the baseline's stub (a system Python reading these dist-packages) gets its package folders from the server's
# environment, which only the baseline's server has: any other Python on the machine is left as it was
BASELINE_PTH = ("import os, sys; sys.path[0:0] = [p for p in os.environ.get('SVB_BASELINE_FIRST', '').split(os.pathsep) "
                "if p]; sys.path.extend(p for p in os.environ.get('SVB_BASELINE_LAST', '').split(os.pathsep) if p)\n")
# numpy < 2 first on the stub's sys.path, and scikit-learn and SciPy hidden from transformers (the GPU image's
# need numpy 2, and transformers imports sklearn when it finds it; the baseline uses neither)
STUB_NUMPY_FIRST = ("import os as _o, sys as _s; _s.path[0:0] = [p for p in _o.environ.get('SVB_BASELINE_FIRST', '')"
                    ".split(_o.pathsep) if p]; _s.modules.update(sklearn=None, scipy=None)\n")
COSINE_MIN = 0.999  # the two servers' embeddings of one text (same export, FP16 graph, pooled in or after it)


def cpu_baseline(folder: Path, work: Path) -> Path:
    """A copy of the baseline folder whose ``model.py`` runs ONNX Runtime on the CPU (IO binding on the host, no
    CUDA graph), to try this script without a GPU; everything else as written."""
    source = (folder / "model.py").read_text()
    cpu = source.replace('("CUDAExecutionProvider", {"enable_cuda_graph": "1"})', '"CPUExecutionProvider"')
    cpu = cpu.replace('"cuda", 0', '"cpu", 0')
    if cpu.count('"cpu", 0') != source.count('"cuda", 0') or "CUDAExecutionProvider" in cpu or cpu == source:
        raise SystemExit(f"cannot make a CPU copy of {folder / 'model.py'}: not the model.py this script knows")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(folder / "config.pbtxt", work)
    (work / "model.py").write_text(cpu)
    return work


def start_baseline(model: Path, tokenizer: Path, folder: Path, ports: tuple[int, int, int]) -> subprocess.Popen:
    """As ``run.sh`` does: a one-model repository, the wheel's python backend and 3.12 stub, LD_LIBRARY_PATH."""
    site = pytriton_site()
    server = site / "pytriton" / "tritonserver"
    repo, backend = Path("/tmp/svb_baseline_repo"), Path("/tmp/svb_baseline_backend")
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(backend, ignore_errors=True)
    (repo / "minilm" / "1").mkdir(parents=True)
    (backend / "python").mkdir(parents=True)
    shutil.copy(folder / "config.pbtxt", repo / "minilm")
    # the model.py as written, after one line that puts numpy < 2 first on the stub's sys.path, as tqc's own
    # stub_model.py does (the .pth below alone left the baseline on the image's numpy 2.5.2 on 2026-12-07), and
    # hides sklearn and scipy from transformers (under numpy < 2 the image's SciPy fails AutoTokenizer's import)
    (repo / "minilm" / "1" / "model.py").write_text(STUB_NUMPY_FIRST + (folder / "model.py").read_text())
    for item in (server / "backends" / "python").iterdir():  # cp backends/python/* (files; run.sh's glob)
        if item.is_file():
            shutil.copy(item, backend / "python")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(server / "python_backend_stubs" / version / "triton_python_backend_stub", backend / "python")
    venv_site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True).stdout.strip()
    for d in (f"/usr/local/lib/python{version}/dist-packages", "/usr/lib/python3/dist-packages"):
        if Path(d).is_dir():  # removed again when the run ends (PTH_FILES)
            Path(d, "zz_tmpsite.pth").write_text(BASELINE_PTH)
            PTH_FILES.append(Path(d, "zz_tmpsite.pth"))
    # run.sh's .pth puts /tmp/site and the venv's packages after the system's; the stub's interpreter ignores
    # PYTHONPATH, so numpy < 2 (TQC_SERVE_STUB_PATH, as tqc's stub gets it; gpu_serve.sh) goes first the same way:
    # under numpy 2 the baseline's stub returns empty tensors, and its answers cannot be compared
    stub_numpy = os.environ.get("TQC_SERVE_STUB_PATH", "")
    env = dict(os.environ, PROBE_TOK=str(tokenizer), PROBE_MODEL=str(model), SVB_BASELINE_FIRST=stub_numpy,
               SVB_BASELINE_LAST=os.pathsep.join((str(site), venv_site)),
               LD_LIBRARY_PATH=f"{site}/nvidia_pytriton.libs:/usr/lib/x86_64-linux-gnu:" + os.environ.get("LD_LIBRARY_PATH", ""))
    log = Path("/tmp/svb_baseline_server.log")
    proc = subprocess.Popen([str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={backend}", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
                             f"--metrics-port={ports[2]}"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    wait_ready(f"http://localhost:{ports[0]}/v2/models/minilm/ready", 180, proc, log)
    return proc


def start_tqc(model: Path, tokenizer: Path, ports: tuple[int, int, int], device: str, extra: list[str]) -> subprocess.Popen:
    log = Path("/tmp/svb_tqc_server.log")
    runtime = ["--provider", "cuda", "--cuda-graph"] if device == "cuda" else ["--provider", "cpu"]
    shutil.rmtree(TQC_TIMINGS, ignore_errors=True)
    cmd = [sys.executable, "-m", "tqc", "serve", str(model), *runtime, "--endpoints", "text",
           "--tokenizer", str(tokenizer), "--max-length", "128", "--name", "m", "--port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--timings", str(TQC_TIMINGS), *extra]
    print("tqc:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(f"http://localhost:{ports[0]}/v2/models/m_text/ready", 300, proc, log)
    return proc


def text_of_tokens(tokenizer: Path, count: int) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    words = S128.split()
    for n in range(1, len(words)):
        text = " ".join(words[:n])
        if len(tok.encode(text).ids) == count:
            return text
    raise SystemExit(f"no prefix of the long text has exactly {count} tokens")


def measure(url: str, model: str, input_name: str, text: str, requests: int, warmup: int,
            protocol: str = "grpc") -> list[float]:
    if protocol == "grpc":
        from tritonclient.grpc import InferenceServerClient, InferInput
    else:
        from tritonclient.http import InferenceServerClient, InferInput

    client = InferenceServerClient(url)
    x = np.frombuffer(text.encode(), dtype=np.uint8)[None, :].copy()
    times = []
    for i in range(warmup + requests):
        tensor = InferInput(input_name, list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        start = time.perf_counter()
        client.infer(model, [tensor])
        times.append(time.perf_counter() - start)
    return [t * 1e3 for t in times[warmup:]]


def live_p50(url: str, protocol: str, count: int = 300) -> float:
    """A health call's round trip (client library, transport, front end; no model), ms."""
    if protocol == "grpc":
        from tritonclient.grpc import InferenceServerClient
    else:
        from tritonclient.http import InferenceServerClient
    client = InferenceServerClient(url)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.is_server_live()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def answer(url: str, model: str, input_name: str, output: str, text: str) -> np.ndarray:
    """One text's embedding from a server over gRPC, read from the reply's raw bytes (tritonclient's as_numpy
    fails under the GPU image's numpy 2); ValueError when the reply holds no embedding."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    x = np.frombuffer(text.encode(), dtype=np.uint8)[None, :].copy()
    tensor = InferInput(input_name, list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    reply = InferenceServerClient(url).infer(model, [tensor]).get_response()
    index = next((i for i, o in enumerate(reply.outputs) if o.name == output), None)
    if index is None:
        raise ValueError(f"{model}'s reply has no output '{output}' (it has {[o.name for o in reply.outputs]})")
    shape = list(reply.outputs[index].shape)
    raw = reply.raw_output_contents[index]
    if len(raw) != 4 * int(np.prod(shape)):
        raise ValueError(f"{model}'s '{output}' {shape} came with {len(raw)} bytes of data (an empty tensor: a "
                         "python-backend stub under numpy 2 sends those)")
    value = np.frombuffer(raw, np.float32).reshape(shape)
    if value.size == 0 or not np.isfinite(value).all():
        raise ValueError(f"{model}'s '{output}' {shape} is empty or not finite")
    return value


def in_process(model: Path, tokenizer: Path, device: str):
    """The reference when no baseline runs: the served (pooled) model in ONNX Runtime in this process, on the
    tokenizer's own truncated encoding of the text (128 tokens), its first output."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model), providers=providers)
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    names = {i.name for i in session.get_inputs()}

    def run(text: str) -> np.ndarray:
        enc = tok([text], truncation=True, max_length=128, return_tensors="np")
        out = session.run([session.get_outputs()[0].name], {k: v.astype(np.int64) for k, v in enc.items() if k in names})
        return np.asarray(out[0], dtype=np.float32)
    return run


def compare_answers(texts: dict[str, str], reference, reference_name: str = "the baseline") -> dict:
    """tqc's embedding of each text against ``reference(text)`` (the baseline server's, or ``in_process``), compared
    (cosine, max |diff|); SystemExit when an answer cannot be read or the two differ (cosine below COSINE_MIN):
    the timings of servers that answer differently, or that answer nothing, compare nothing."""
    agreement, failures = {}, []
    for label, text in texts.items():
        try:
            a = reference(text)
            b = answer("localhost:18201", "m_text", "TEXT", "embeddings", text)
            if a.shape != b.shape:
                raise ValueError(f"{reference_name} answers {list(a.shape)}, tqc {list(b.shape)}")
        except ValueError as exc:
            failures.append(f"{label}: {exc}")
            continue
        cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        agreement[label] = {"max_abs_diff": float(np.abs(a - b).max()), "cosine": cosine}
        print(f"answers, {label}: max |diff| {agreement[label]['max_abs_diff']:.2e}, cosine {cosine:.6f}",
              file=sys.stderr, flush=True)
        if not cosine >= COSINE_MIN:
            failures.append(f"{label}: cosine {cosine:.6f} < {COSINE_MIN}")
    if failures:
        raise SystemExit(f"serve_vs_baseline: tqc's answers and {reference_name}'s were not compared or differ, so "
                         "no timing is reported: " + "; ".join(failures))
    return agreement


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tqc-model", required=True, type=Path)
    parser.add_argument("--baseline-model", type=Path, default=None, help="omit (with --baseline-dir): tqc alone, its "
                        "answers checked against the model run in this process")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--baseline-dir", type=Path, default=None)
    parser.add_argument("--texts", default="11,16,128", help="token counts of the texts sent, of 11, 16, 128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--protocols", default="grpc,http", help="grpc, http or both (both servers over each)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: to try this script without a GPU (tqc on ORT CPU, the baseline's model.py copied "
                             "with ORT CPU for ORT CUDA)")
    parser.add_argument("tqc_options", nargs="*", help="extra `tqc serve` options (after --)")
    args = parser.parse_args()
    protocols = [p for p in args.protocols.split(",") if p]
    every = {"11": ("11 tokens", S11), "16": ("16 tokens", None), "128": ("128 tokens", S128)}
    wanted = [t for t in args.texts.split(",") if t]
    if not wanted or any(t not in every for t in wanted):
        parser.error(f"--texts takes token counts among {', '.join(every)}, not '{args.texts}'")
    texts = {every[t][0]: every[t][1] or text_of_tokens(args.tokenizer, 16) for t in wanted}
    if (args.baseline_model is None) != (args.baseline_dir is None):
        parser.error("--baseline-model and --baseline-dir go together (neither: tqc alone)")
    servers = {}
    try:
        if args.baseline_model is not None:
            baseline_dir = args.baseline_dir.resolve()
            if args.device == "cpu":
                baseline_dir = cpu_baseline(baseline_dir, Path("/tmp/svb_baseline_cpu"))
            servers["baseline"] = (start_baseline(args.baseline_model.resolve(), args.tokenizer.resolve(),
                                                  baseline_dir, (18100, 18101, 18102)),
                                   {"grpc": "localhost:18101", "http": "localhost:18100"}, "minilm", "text")
        servers["tqc"] = (start_tqc(args.tqc_model.resolve(), args.tokenizer.resolve(), (18200, 18201, 18202),
                                    args.device, args.tqc_options),
                           {"grpc": "localhost:18201", "http": "localhost:18200"}, "m_text", "TEXT")
        if "baseline" in servers:  # the two servers answer the same texts alike (same export)
            agreement = compare_answers(texts, lambda text: answer("localhost:18101", "minilm", "text", "embedding",
                                                                   text))
        else:
            agreement = compare_answers(texts, in_process(args.tqc_model, args.tokenizer, args.device),
                                        "the model run in this process")
        rows: dict[tuple[str, str, str], list[dict]] = {}
        where: dict[tuple[str, str, str], list[dict]] = {}  # per server, protocol and text: Triton's split per round
        floors: dict[tuple[str, str], list[float]] = {}
        totals = stub_totals(TQC_TIMINGS)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for protocol in protocols:
                for name in order:
                    floors.setdefault((name, protocol), []).append(live_p50(servers[name][1][protocol], protocol))
                for label, text in texts.items():
                    for name in order:
                        _, urls, model, input_name = servers[name]
                        counters = triton_counters(urls["http"], model)
                        t = measure(urls[protocol], model, input_name, text, args.requests, args.warmup, protocol)
                        cell = {"p50_ms": statistics.median(t), "p99_ms": float(np.percentile(t, 99)),
                                "mean_ms": float(np.mean(t))}
                        split = triton_stats(urls["http"], model, since=counters)  # Triton's split of these requests
                        if name == "tqc":  # then the stub's own (flushed)
                            time.sleep(1.1)  # the stub writes its timings at most once a second, on a request
                            measure(urls[protocol], model, input_name, text, 1, 0, protocol)
                            now = stub_totals(TQC_TIMINGS)
                            split["stub"] = stub_timings(TQC_TIMINGS, since=totals).get("all", {})
                            totals = now
                        where.setdefault((name, protocol, label), []).append(split)
                        rows.setdefault((name, protocol, label), []).append(cell)
                        print(f"round {r} {name:<8} {protocol:<4} {label:<10}: p50 {cell['p50_ms']:.3f} ms, "
                              f"p99 {cell['p99_ms']:.3f} ms", file=sys.stderr, flush=True)
    finally:
        for proc, *_ in servers.values():
            stop(proc)
        for pth in PTH_FILES:
            pth.unlink(missing_ok=True)
    table = []
    print(f"\n{'server':<9} {'proto':<5} {'text':<11} {'p50 ms':>8} {'p99 ms':>8}  (medians of {args.rounds} rounds; "
          "p50 ratio to the baseline over the same protocol)")
    for protocol in protocols:
        for label in texts:
            med = {name: {q: statistics.median(c[q] for c in rows[(name, protocol, label)]) for q in ("p50_ms", "p99_ms")}
                   for name in servers}
            for name in servers:
                table.append({"server": name, "protocol": protocol, "text": label, **med[name],
                              "rounds": rows[(name, protocol, label)]})
                ratio = f"{med[name]['p50_ms'] / med['baseline']['p50_ms']:.2f}x" if "baseline" in med else "-"
                print(f"{name:<9} {protocol:<5} {label:<11} {med[name]['p50_ms']:>8.3f} {med[name]['p99_ms']:>8.3f}  "
                      f"{ratio}")
    print("\ntransport floor, a health call's round trip p50 (ms, median of rounds): " + ", ".join(
        f"{name} {protocol} {statistics.median(v):.3f}" for (name, protocol), v in floors.items()))
    print("\nat batch 1, where a request's time goes (ms per request, medians of rounds; Triton's statistics over "
          "the cell's requests, warm-up included: success = the request inside Triton, compute_infer = the python "
          "backend's hand-off + the stub's execute; outside = client mean - success: front end, transport, client; "
          "stub: tqc's own split of execute; the baseline's execute is not split)")
    steps = [step for step in STUB_STEPS if step != "calls"]
    print(f"{'server':<9} {'proto':<5} {'text':<11} {'mean':>6} {'outside':>7} {'success':>7} {'queue':>6} "
          f"{'c_input':>7} {'c_infer':>7} {'c_output':>8} | " + " ".join(f"{step:>8}" for step in steps))
    breakdown = []
    for (name, protocol, label), splits in sorted(where.items(), key=lambda kv: (kv[0][1], kv[0][0] != "baseline")):
        mean = statistics.median(c["mean_ms"] for c in rows[(name, protocol, label)])
        med = {key: statistics.median(s[key] for s in splits) for key in
               ("success_ms", "queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms")}
        stub = {step: statistics.median(s.get("stub", {}).get(f"{step}_ms", float("nan")) for s in splits)
                for step in steps}
        breakdown.append({"server": name, "protocol": protocol, "text": label, "mean_ms": mean, **med,
                          "stub_ms": stub if name == "tqc" else None, "outside_ms": mean - med["success_ms"],
                          "rounds": splits})
        print(f"{name:<9} {protocol:<5} {label:<11} {mean:>6.3f} {mean - med['success_ms']:>7.3f} "
              f"{med['success_ms']:>7.3f} {med['queue_ms']:>6.3f} {med['compute_input_ms']:>7.3f} "
              f"{med['compute_infer_ms']:>7.3f} {med['compute_output_ms']:>8.3f} | "
              + (" ".join(f"{stub[step]:>8.3f}" for step in steps) if name == "tqc" else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"texts": texts, "agreement": agreement, "tqc_options": args.tqc_options,
                                         "table": table, "tqc_breakdown": breakdown,
                                         "live_p50_ms": {f"{n} {p}": v for (n, p), v in floors.items()}}, indent=1))


if __name__ == "__main__":
    main()
