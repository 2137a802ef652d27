#!/usr/bin/env python3
"""Speed of ``qdq`` variants against the default placement, interleaved, on the real all-MiniLM-L6-v2 (CPU).

Every variant ``NAME=QDQ`` is compiled as ``fold,fuse,QDQ`` for each target (ort-cpu on ONNX Runtime CPU, openvino
as IR on OpenVINO CPU); then every round times every (shape, model) for about --cell-s seconds, and the table
gives the median of the round medians, each variant's speed-up over ORT FP32 measured in the same rounds and
its time relative to the first variant of its target (the median over rounds of the ratio within a round). Used
for issue 21's bound: a change of the default placement keeps speed within 5% of today's.

    python bench/bench_qdq_speed.py --variant default=qdq --variant shift=qdq{shift=true,bias_correct=true}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import cpu_name  # noqa: E402
from bench_openvino import Engine, log, timing_rounds  # noqa: E402  (interleaved rounds)

CALIB = Path(__file__).resolve().parents[1] / "models" / "data" / "calib_sentences.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=QDQ")
    parser.add_argument("--targets", default="ort-cpu,openvino")
    parser.add_argument("--workdir", default="bench_work_speed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1x128,8x128")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cell-s", type=float, default=0.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tqc

    variants = dict(item.split("=", 1) for item in (args.variant or ["default=qdq"]))
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "minilm-fp32.onnx"
    if not fp32.exists():
        tqc.export("minilm", fp32)
    calib = CALIB.read_text().splitlines()[:32]
    engines = {"ort-fp32": Engine(fp32, "ort", args.threads)}
    for target in args.targets.split(","):
        for name, qdq in variants.items():
            path = work / f"{target}-{name}.{'xml' if target == 'openvino' else 'onnx'}"
            log(f"compile {target} {name}: fold,fuse,{qdq}")
            tqc.compile(fp32, f"fold,fuse,{qdq}", target=target, calib=calib, verify="none").save(path)
            engines[f"{target} {name}"] = Engine(path, "openvino" if target == "openvino" else "ort", args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    timed = timing_rounds(engines, shapes, 30522, args.rounds, args.cell_s)
    keys = [f"{b}x{s}" for b, s in shapes]
    print(f"\nMiniLM, {cpu_name()}, {args.threads} threads, {args.rounds} interleaved rounds (median ms)\n")
    print("| model | " + " | ".join(keys) + " | vs ORT FP32 | time vs the target's first (median of per-round ratios) |")
    print("|---|" + "---|" * (len(shapes) + 2))
    rows = []
    firsts: dict[str, dict] = {}
    for name, cells in timed.items():
        first = firsts.setdefault(name.split(" ")[0], cells)
        # the median over rounds of the time ratio within each round: robust to the load moving between rounds
        relative = {k: round(float(np.median(np.array(cells[k]["round_medians_ms"]) /
                                             np.array(first[k]["round_medians_ms"]))), 3) for k in keys}
        rows.append({"model": name, **{k: cells[k] for k in keys}, "time_vs_first": relative})
        print(f"| {name} | " + " | ".join(f"{cells[k]['median_ms']:.2f}" for k in keys) + " | " +
              " / ".join(f"{cells[k]['vs_ort_fp32']:.2f}x" for k in keys) + " | " +
              " / ".join(f"{relative[k]:.3f}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds,
                                               "variants": variants, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
