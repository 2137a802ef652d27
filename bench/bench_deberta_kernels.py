#!/usr/bin/env python3
"""DeBERTa-v3-base's graph for ort-cuda, counted: nodes a layer by op, the launching ones (Reshape, Flatten,
Squeeze, Unsqueeze and Identity are aliases on ORT CUDA), as tqc writes it and after ONNX Runtime's own
graph optimizations at session load (basic level, CPU build: what ORT removes by itself, e.g. an Add of 0);
with ``--compare DIR`` (the same script's models from another revision), ORT CPU latency of both, interleaved.
No GPU needed: it counts kernels, it does not time them on a GPU (``gpu_kernel_profile.py`` does).

    python bench/bench_deberta_kernels.py --workdir /tmp/dk_after --json bench/results/deberta_kernels_cpu.json
    PYTHONPATH=<other revision> python bench/bench_deberta_kernels.py --workdir /tmp/dk_before --no-time
    python bench/bench_deberta_kernels.py --workdir /tmp/dk_after --compare /tmp/dk_before --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fuse import export_models, log  # noqa: E402

ALIASES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
VARIANTS = {"ort-cuda fold,fuse,fp16": ("ort-cuda", "fold,fuse,fp16"), "ort-cuda fold,fuse": ("ort-cuda", "fold,fuse"),
            "ort-cpu fold,fuse": ("ort-cpu", "fold,fuse")}


def counts(path: Path, layers: int) -> dict:
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    launching = sum(v for k, v in ops.items() if k not in ALIASES)
    return {"nodes": sum(ops.values()), "launching": launching, "launching_per_layer": round(launching / layers, 2),
            "ops": dict(ops.most_common())}


def ort_basic(src: Path, out: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--compare", default=None, help="another run's --workdir: time both, interleaved")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", default="1x128,4x128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20, help="runs a round (median of them)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from tqc.compiler.tools.benchmark import OrtRunner, time_callable
    from tqc.compiler.tools.compile import CompileOptions, compile_model
    from tqc.models.recipes import find_recipe

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe("deberta-v3")
    layers = recipe.config("base").num_hidden_layers
    export = export_models("deberta-v3", work.parent / "deberta_kernels_export", ("eager",))["eager"]
    result: dict = {"load": os.getloadavg(), "variants": {}}
    for name, (target, pipeline) in VARIANTS.items():
        out = work / (name.replace(" ", "_").replace(",", "-") + ".onnx")
        if not out.exists():
            compile_model(CompileOptions(model=str(export), pipeline=pipeline, output=str(out), target=target,
                                         verify="structure"))
        cell = {"tqc": counts(out, layers)}
        if "fp16" not in pipeline:  # the CPU build has no float16 kernels for the contrib ops
            ort_basic(out, work / f"{out.stem}.ort_basic.onnx")
            cell["after ORT basic"] = counts(work / f"{out.stem}.ort_basic.onnx", layers)
        result["variants"][name] = cell
        log(f"{name}: " + "; ".join(f"{k} {v['launching']} launching ({v['launching_per_layer']} a layer)"
                                   for k, v in cell.items()))
    if args.compare and not args.no_time:
        from bench_fuse import make_inputs

        vocab = recipe.config("base").vocab_size
        for name, (target, pipeline) in VARIANTS.items():
            if "fp16" in pipeline:
                continue
            file = name.replace(" ", "_").replace(",", "-") + ".onnx"
            pair = {"before": Path(args.compare) / file, "after": work / file}
            for shape in args.shapes.split(","):
                batch, seq = (int(x) for x in shape.split("x"))
                feed = make_inputs(batch, seq, recipe.inputs, vocab)
                runners = {k: OrtRunner(p, "cpu", args.threads).prepare(feed) for k, p in pair.items()}
                rounds: dict = {k: [] for k in pair}
                for _ in range(args.rounds):
                    for key, fn in runners.items():
                        rounds[key].append(time_callable(fn, batch, args.runs, 3, 20.0).median_ms)
                medians = {k: statistics.median(v) for k, v in rounds.items()}
                # each round's after / before, adjacent in time: less moved by a shared machine's drift
                paired = statistics.median(a / b for a, b in zip(rounds["after"], rounds["before"]))
                result["variants"][name].setdefault("ort_cpu_ms", {})[shape] = {
                    "rounds": rounds, "median": medians, "paired_after_over_before": paired}
                log(f"{name} {shape}: before {medians['before']:.2f} ms, after {medians['after']:.2f} ms, "
                    f"paired after/before {paired:.3f}x")
        result["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=lambda o: np.asarray(o).tolist()))


if __name__ == "__main__":
    main()
