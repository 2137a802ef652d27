#!/usr/bin/env python3
"""What the default numeric verification costs: ``tqc compile -p fold,fuse,qdq`` with the default ``--verify``
(numeric: every pass compared before/after on two small batches within the model's limits) against
``--verify structure`` (the opt-out: checker and shape inference only).

Each compile runs in its own process (``python -m tqc compile ...``, wall time of the process, and its peak RSS
from ru_maxrss), the two modes interleaved round by round so that load on the machine hits both alike::

    python bench/bench_verify.py --models minilm,bert --rounds 3 --json bench/results/verify_cost.json

MiniLM: the packaged all-MiniLM-L6-v2 (real weights); bert: bert-base from its config (random weights).
Calibration: the 64 packaged sentences (models/data/calib_sentences.txt) through MiniLM's tokenizer, which is
bert-base-uncased's vocabulary. Target ort-cpu. The table shows median seconds per mode and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "models" / "data" / "calib_sentences.txt"
MODES = {"default (numeric)": [], "structure": ["--verify", "structure"]}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process; its stderr on failure."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{err.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline", default="fold,fuse,qdq")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "verify_cost.json"))
    args = parser.parse_args()
    from tqc.compiler.io.packaged import packaged_minilm_path

    tokenizer = str(packaged_minilm_path())
    tqc = [sys.executable, "-m", "tqc", "-q"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tqc-bench-verify-") as work:
        work = Path(work)
        for model in args.models.split(","):
            path = work / f"{model}.onnx"
            log(f"exporting {model}")
            run(tqc + ["export", model, "-o", str(path)])
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            verify_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
            peaks: dict[str, list[float]] = {mode: [] for mode in MODES}
            for round_index in range(args.rounds):
                order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    report = work / f"{model}.report.json"
                    command = tqc + ["compile", str(path), "-p", args.pipeline, "--target", "ort-cpu", "--calib",
                                     str(CALIB), "--tokenizer", tokenizer, "-o", str(work / f"{model}.out.onnx"),
                                     "--report", str(report), *MODES[mode]]
                    seconds, peak = run(command)
                    peaks[mode].append(peak)
                    data = json.loads(report.read_text())
                    times[mode].append(seconds)
                    verify_seconds[mode].append(sum(s["verify"].get("seconds", 0.0) for s in data["stages"]))
                    log(f"  {model} round {round_index + 1} {mode}: {seconds:.2f} s "
                        f"(verification {verify_seconds[mode][-1]:.2f} s, peak {peak:.0f} MiB, verify={data['verify']})")
            medians = {mode: statistics.median(v) for mode, v in times.items()}
            rows.append({"model": model, "pipeline": args.pipeline, "rounds": args.rounds,
                         "seconds": times, "verify_seconds": verify_seconds, "peak_rss_mib": peaks,
                         "median_seconds": medians,
                         "ratio_default_vs_structure": medians["default (numeric)"] / medians["structure"]})
    print(f"{'model':<8} {'pipeline':<16} {'default (numeric) s':>20} {'structure s':>12} {'ratio':>7} "
          f"{'numeric checks s':>17} {'peak MiB default/structure':>27}")
    for r in rows:
        m, peaks = r["median_seconds"], r["peak_rss_mib"]
        checks = statistics.median(r["verify_seconds"]["default (numeric)"])
        peak = f"{max(peaks['default (numeric)']):.0f}/{max(peaks['structure']):.0f}"
        print(f"{r['model']:<8} {r['pipeline']:<16} {m['default (numeric)']:>20.2f} {m['structure']:>12.2f} "
              f"{r['ratio_default_vs_structure']:>6.2f}x {checks:>17.2f} {peak:>27}")
    result = {"machine": f"{os.cpu_count()} cores (shared), ORT CPU", "python": sys.version.split()[0],
              "what": "wall time of one `python -m tqc compile` process per run, modes interleaved", "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
