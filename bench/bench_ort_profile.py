#!/usr/bin/env python3
"""Where the time goes on ONNX Runtime CPU: per-op kernel times of several models of the same export, run
interleaved (one run of each per round), so a before/after or a tqc/plain comparison shares the machine's load.

Each node's kernel time is the median over the runs (ORT's ``enable_profiling`` events), which a neighbour's
burst on a shared machine moves much less than a run's wall time; an op type's time is the sum of its nodes'
medians. Profiling slows a run: compare models with each other, not with a latency benchmark. Nodes every
model has (by name: the projections and FFN tqc keeps) are summed apart from each model's own nodes, where
the models differ; the common sum says how much the machine moved the rest. The JSON keeps the own nodes.

    python bench/bench_ort_profile.py plain=bench_work/deberta-v3-eager.onnx \\
        tqc=bench_work/deberta-v3-eager-tqc.onnx --threads 1 --runs 30 --json bench/results/x.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fuse import make_inputs  # noqa: E402


def profile(models: dict[str, str], batch: int, seq: int, threads: int, runs: int, warmup: int,
            vocab: int = 30000) -> dict:
    """{label: {"per_op": {op: [ms per run, nodes]}, "per_node": {name: [op, ms]}, "kernel_ms": total}}."""
    import onnxruntime as ort

    sessions = {}
    folder = tempfile.mkdtemp(prefix="tqc_ort_profile_")
    for label, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, label.replace("/", "_"))
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in session.get_inputs())
        sessions[label] = (session, make_inputs(batch, seq, names, vocab))
    for session, feed in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    labels = list(sessions)
    for round_ in range(runs):
        for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
            session, feed = sessions[label]
            session.run(None, feed)
    results = {}
    for label, (session, _) in sessions.items():
        path = session.end_profiling()
        events = json.loads(Path(path).read_text())
        os.remove(path)
        times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                times[(event["name"][:-len("_kernel_time")], event["args"]["op_name"])].append(event["dur"] / 1000)
        per_node = {name: [op, statistics.median(values[-runs:])] for (name, op), values in times.items()}
        per_op: dict[str, list] = {}
        for op, ms in per_node.values():
            entry = per_op.setdefault(op, [0.0, 0])
            entry[0] += ms
            entry[1] += 1
        results[label] = {"per_op": per_op, "per_node": per_node,
                          "kernel_ms": sum(ms for _, ms in per_node.values())}
    return results


def split_common(results: dict) -> dict:
    """Each model's time in the nodes every model has (``common_ms``) and in its own (``own_ms``,
    ``own_per_op``); ``per_node`` keeps the own nodes of 0.05 ms or more."""
    common = set.intersection(*(set(r["per_node"]) for r in results.values()))
    for r in results.values():
        own = {name: entry for name, entry in r["per_node"].items() if name not in common}
        r["common_nodes"], r["common_ms"] = len(common), sum(r["per_node"][name][1] for name in common)
        r["own_ms"] = sum(ms for _, ms in own.values())
        r["own_per_op"] = dict(collections.Counter({op: 0.0 for op, _ in own.values()}))
        for op, ms in own.values():
            r["own_per_op"][op] += ms
        r["per_node"] = {name: entry for name, entry in own.items() if entry[1] >= 0.05}
    return results


def print_table(results: dict) -> None:
    labels = list(results)
    ops = sorted({op for r in results.values() for op in r["per_op"]},
                 key=lambda op: -max(r["per_op"].get(op, [0.0])[0] for r in results.values()))
    print(f"{'op (ms a run, nodes)':26}" + "".join(f"{label:>24}" for label in labels))
    for op in ops:
        cells = [results[label]["per_op"].get(op, [0.0, 0]) for label in labels]
        if max(ms for ms, _ in cells) >= 0.05:
            print(f"{op:26}" + "".join(f"{ms:>17.2f} ({n:>4})" for ms, n in cells))
    print(f"{'kernels, total':26}" + "".join(f"{results[label]['kernel_ms']:>24.2f}" for label in labels))
    print(f"{'  in common nodes':26}" + "".join(f"{results[label]['common_ms']:>24.2f}" for label in labels))
    print(f"{'  in own nodes':26}" + "".join(f"{results[label]['own_ms']:>24.2f}" for label in labels))
    for label in labels:
        ops = sorted(results[label]["own_per_op"].items(), key=lambda item: -item[1])
        print(f"own nodes of {label}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in ops if ms >= 0.2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--shape", default="1x128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--vocab", type=int, default=30000, help="token ids drawn below this")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    batch, seq = (int(x) for x in args.shape.split("x"))
    start = time.perf_counter()
    results = split_common(profile(models, batch, seq, args.threads, args.runs, args.warmup, args.vocab))
    print_table(results)
    if args.json:
        import onnxruntime

        out = {"shape": args.shape, "threads": args.threads, "runs": args.runs, "models": models,
               "onnxruntime": onnxruntime.__version__, "total_s": round(time.perf_counter() - start, 1),
               "results": results}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
