"""Cost of load-time model validation (compiler/io/model_check.py) against the load it guards.

For each model: ``load_model_lean`` (what compile and calibrate use) and ``load_model`` (inspect, diff, ...),
each with validation and with validation switched off, in interleaved rounds; the table prints medians and the
share validation adds (process CPU seconds: wall time on a shared machine measures the neighbours), and the
peak RSS of the process (validation works on a skeleton: it must not add a copy of the weights).

    python bench/bench_model_check.py [--rounds 8] [--models minilm,bert]   (bert: bert-base, random weights)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tqc.compiler.io import model_check
    from tqc.compiler.io import model as model_io
    from tqc.models.export import ExportSpec, export

    real_validate = model_check.validate_model
    folder = Path(tempfile.mkdtemp(prefix="tqc-bench-check-"))
    rows = []
    for source in args.models.split(","):
        path = folder / f"{source}.onnx"
        export(ExportSpec(source), path)
        times: dict[str, list[float]] = {k: [] for k in ("lean", "lean+check", "full", "full+check")}
        keys = list(times)
        for round_index in range(args.rounds):
            # rotated each round: the first load of a round pays for freeing the last one's model
            for key in keys[round_index % len(keys):] + keys[:round_index % len(keys)]:
                model_check.validate_model = real_validate if key.endswith("+check") else (lambda *a, **k: None)
                loader = model_io.load_model_lean if key.startswith("lean") else model_io.load_model
                start = time.process_time()  # CPU time: wall time on a shared 2-core machine is mostly others'
                loaded = loader(path)
                times[key].append(time.process_time() - start)
                del loaded
        model_check.validate_model = real_validate
        start = time.process_time()
        lean = model_io.load_model_lean(path)
        load_s = time.process_time() - start
        start = time.process_time()
        real_validate(lean.skeleton, path)
        check_s = time.process_time() - start
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": source, "bytes": path.stat().st_size,
                     **{f"{k}_s": round(v, 4) for k, v in medians.items()},
                     "validate_alone_s": round(check_s, 4), "lean_load_alone_s": round(load_s, 4)})
    print("process CPU seconds, medians")
    print(f"{'model':<10} {'MB':>6} {'lean s':>10} {'+check':>8} {'ratio':>6} {'full s':>8} {'+check':>8} "
          f"{'ratio':>6} {'check alone s':>14}")
    for r in rows:
        print(f"{r['model']:<10} {r['bytes'] / 1e6:>6.0f} {r['lean_s']:>10.3f} {r['lean+check_s']:>8.3f} "
              f"{r['lean+check_s'] / r['lean_s']:>6.2f} {r['full_s']:>8.3f} {r['full+check_s']:>8.3f} "
              f"{r['full+check_s'] / r['full_s']:>6.2f} {r['validate_alone_s']:>14.4f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_mib:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peak_rss_mib": round(peak_mib)}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
