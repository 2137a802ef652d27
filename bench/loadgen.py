"""Load generator for serving benchmarks: several client processes, each an asyncio loop of gRPC requests.

A Python client in one process (threads and the blocking tritonclient) tops out at a few thousand requests/s:
at high concurrency it measures the client, not the server. Here the concurrency is split over ``procs``
processes; each runs ``tritonclient.grpc.aio`` with its share of requests in flight, and all start at one
moment (a shared start time set once every process has connected and sent a warm-up request).

    from loadgen import run_load
    run_load("localhost:8001", "m_text", payloads, concurrency=256, seconds=3.0, procs=8)
    -> {"requests": ..., "errors": ..., "seconds": ..., "throughput": ..., "p50_ms": ..., "p95_ms": ..., "p99_ms": ...,
        "mean_ms": ..., "client_procs": 8}

The result has the keys of ``bench_serve.Load.run``, so the two are interchangeable in its tables.

    python bench/loadgen.py URL MODEL --concurrency 256 --procs 8 --seconds 3 --text "a sentence"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import time

import numpy as np


def _child(url: str, model: str, payloads: list[np.ndarray], concurrency: int, ready, start_at, seconds: float,
           results) -> None:
    """One client process: ``concurrency`` coroutines sending requests from the shared start time on."""
    import tritonclient.grpc.aio as grpcaio

    async def main() -> None:
        client = grpcaio.InferenceServerClient(url)
        inputs = []
        for payload in payloads:
            tensor = grpcaio.InferInput("TEXT", list(payload.shape), "UINT8")
            tensor.set_data_from_numpy(payload)
            inputs.append(tensor)
        latencies: list[float] = []
        errors, messages = 0, []
        try:
            await client.infer(model, [inputs[0]])
        except Exception as exc:  # reported; the run goes on so the parent is never left waiting
            errors += 1
            messages.append(str(exc)[:200])
        ready.put(1)
        while start_at.value == 0.0:
            await asyncio.sleep(0.001)
        begin = start_at.value
        delay = begin - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stop = begin + seconds

        async def worker(slot: int) -> None:
            nonlocal errors
            i = slot
            while time.time() < stop:
                t0 = time.perf_counter()
                try:
                    await client.infer(model, [inputs[i % len(inputs)]])
                    latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # counted, the first few kept for the log
                    errors += 1
                    if len(messages) < 3:
                        messages.append(str(exc)[:200])
                i += concurrency

        await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
        await client.close()
        results.put({"latencies": np.asarray(latencies, np.float64), "errors": errors, "messages": messages,
                     "end": time.time()})

    asyncio.run(main())


def split(concurrency: int, procs: int) -> list[int]:
    """``concurrency`` in-flight requests over at most ``procs`` processes, as evenly as possible."""
    procs = max(1, min(procs, concurrency))
    return [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]


def run_load(url: str, model: str, payloads: list[np.ndarray], concurrency: int, seconds: float,
             procs: int = 4) -> dict:
    """Requests/s and client-side latency percentiles of ``concurrency`` requests kept in flight for ``seconds``."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    start_at = ctx.Value("d", 0.0)
    shares = split(concurrency, procs)
    children = [ctx.Process(target=_child, args=(url, model, payloads, share, ready, start_at, seconds, results),
                            daemon=True) for share in shares]
    for child in children:
        child.start()
    for _ in children:
        ready.get(timeout=120)
    begin = time.time() + 0.2
    start_at.value = begin
    parts = [results.get(timeout=seconds + 120) for _ in children]
    for child in children:
        child.join(timeout=30)
    elapsed = max(part["end"] for part in parts) - begin
    out = summarize(np.concatenate([part["latencies"] for part in parts]), sum(part["errors"] for part in parts),
                    elapsed, [m for part in parts for m in part["messages"]])
    out["client_procs"] = len(shares)
    return out


def summarize(latencies_s: np.ndarray, errors: int, elapsed: float, messages: list[str]) -> dict:
    """One load cell: requests, errors, seconds, requests/s, client-side p50/p95/p99 and mean (ms), the first
    few error messages (``bench_serve.Load`` reports the same way)."""
    flat = np.asarray(latencies_s, np.float64) * 1000
    out = {"requests": int(flat.size), "errors": int(errors), "seconds": round(elapsed, 3),
           "throughput": round(flat.size / elapsed, 2) if elapsed > 0 else 0.0}
    if flat.size:
        out.update({f"p{q}_ms": round(float(np.percentile(flat, q)), 3) for q in (50, 95, 99)})
        out["mean_ms"] = round(float(flat.mean()), 3)
    if messages:
        out["error_messages"] = messages[:3]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--text", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    texts = args.text or ["a short sentence about fast transformer inference."]
    payloads = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8)[None].copy() for t in texts]
    print(json.dumps(run_load(args.url, args.model, payloads, args.concurrency, args.seconds, args.procs)))


if __name__ == "__main__":
    main()
