#!/usr/bin/env python3
"""Peak memory of ``tqc diff`` on XLM-R large (2.2 GB of weights, external data): issue #20.

The goal: ``tqc diff REF CAND --layerwise`` runs on a model over protobuf's 2 GB limit with its peak RSS
under 1.5x the reference's weights. Each model's weights are loaded only for its own run and lent to ONNX
Runtime (``tqc.compiler.tools.diff.Side``, ``GraphSession.from_lean``), the reference's activations wait in
.npy files while the candidate runs.

Models (in --workdir, built once and reused):
  xlmr-large.onnx        tqc export of a transformers XLM-RoBERTa config with large dims (hidden 1024,
                         24 layers, 16 heads, intermediate 4096, vocabulary 250,002, 514 positions), random weights
  xlmr-large-fp16.onnx   tqc compile xlmr-large.onnx -p fold,fuse,fp16 --verify structure
Runs, each ``tqc -q diff`` in its own process, measured with ``os.wait4`` on that child (peak RSS = its
``ru_maxrss``): layerwise and outputs-only, candidate the same model and the FP16 compile; default inputs
(2 batches of 2 x 16 random token ids). "x weights" divides the peak by the reference's weight bytes.

    .venv/bin/python bench/bench_diff_large.py --workdir /work/scratch_layerwise
    # table on stdout; bench/results/diff_large.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_large import CONFIGS, run_child  # noqa: E402  (one child runner and one XLM-R config for bench/)

GOAL = 1.5  # peak RSS / weights


def cpu_name() -> str:
    """The CPU's model name and the instruction-set extensions that change ORT's kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    extensions = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return f"{name} ({', '.join(extensions) or 'no AVX2'})"


def weight_bytes(path: Path) -> int:
    """The reference's weights: every initializer's bytes (dtype x dims, from the skeleton: nothing read)."""
    import numpy as np
    import onnx

    from tqc.compiler.io.lean import load_lean

    skeleton = load_lean(path, weights=False).skeleton
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in skeleton.graph.initializer)


def build(workdir: Path) -> tuple[Path, Path]:
    reference, fp16 = workdir / "xlmr-large.onnx", workdir / "xlmr-large-fp16.onnx"
    if not reference.exists():
        config = workdir / "xlmr-large-config.json"
        config.write_text(json.dumps({**CONFIGS["xlm-roberta-large"], "architectures": ["XLMRobertaModel"]}))
        result = run_child(["export", str(config), "-o", str(reference)], "export")
        if result["rc"]:
            raise SystemExit(f"export failed: {result}")
    if not fp16.exists():
        result = run_child(["compile", str(reference), "-p", "fold,fuse,fp16", "--verify", "structure",
                            "-o", str(fp16)], "compile fp16")
        if result["rc"]:
            raise SystemExit(f"compile failed: {result}")
    return reference, fp16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/tqc-bench-diff-large", help="Where the models are built.")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "diff_large.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reference, fp16 = build(workdir)
    weights = weight_bytes(reference)
    rows = []
    for candidate in (reference, fp16):
        for layerwise in (True, False):
            command = ["-q", "diff", str(reference), str(candidate)] + (["--layerwise"] if layerwise else [])
            result = run_child(command, f"diff {candidate.name}")
            rows.append({"candidate": candidate.name, "layerwise": layerwise, **result,
                         "x_weights": round(result["peak_rss_mib"] * 2**20 / weights, 3)})
    results = {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "reference": reference.name, "reference_weights_mib": round(weights / 2**20, 1),
               "model_file_mib": round(sum(p.stat().st_size for p in workdir.glob("xlmr-large.onnx*")) / 2**20, 1),
               "goal_x_weights": GOAL, "inputs": "default: 2 batches of 2 x 16 random token ids", "rows": rows}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"tqc diff on {reference.name} ({weights / 2**30:.2f} GiB of weights), {results['cpu']}, "
          f"{results['cpus']} CPUs")
    print(f"{'candidate':<24} {'mode':<10} {'wall s':>7} {'cpu s':>7} {'peak RSS MiB':>13} {'x weights':>10}  rc")
    for row in rows:
        print(f"{row['candidate']:<24} {'layerwise' if row['layerwise'] else 'outputs':<10} {row['wall_s']:>7.1f} "
              f"{row['cpu_s']:>7.1f} {row['peak_rss_mib']:>13.0f} {row['x_weights']:>10.2f}  {row['rc']}")
    worst = max(row["x_weights"] for row in rows)
    print(f"worst {worst:.2f}x the weights (goal < {GOAL}x)")


if __name__ == "__main__":
    main()
