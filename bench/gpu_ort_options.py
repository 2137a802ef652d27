#!/usr/bin/env python3
"""Which ORT CUDA provider options give tqc's bert-base 1x128 FP16 graph the lowest latency (CUDA graph)?

One run on the GPU machine, interleaved over rounds with torch.compile(reduce-overhead) FP16 measured in the
same run as the anchor; medians of the per-round medians.
    bash bench/gpu_run.sh bench/gpu_ort_options.py --json $OUT/ort_options.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fuse import export_models, make_inputs, torch_runners  # noqa: E402
from gpu_kernel_profile import fp16_outputs  # noqa: E402

from tqc.compiler.tools.benchmark import OrtRunner, time_callable  # noqa: E402
from tqc.compiler.tools.compile import CompileOptions, compile_model  # noqa: E402

OPTION_SETS = {
    "default": {},
    "tunable-op": {"tunable_op_enable": "1", "tunable_op_tuning_enable": "1"},
    "unified-stream": {"use_ep_level_unified_stream": "1"},
    **{f"sdpa_kernel={k}": {"sdpa_kernel": k} for k in ("1", "2", "4", "8", "16")},
}
# bench/results/ort_options_h100.json (sdpa_kernel sweep, raw vs end masks, without EmbedLayerNorm) came from an
# earlier form of this script; ort_options_h100_run2.json from this one with the sets above ("sdpa-cudnn" there
# is sdpa_kernel=8).


def runner(path: Path, options: dict, feed: dict):
    import onnxruntime as ort

    r = OrtRunner(path, "cuda", None, cuda_graph=True)
    if options:
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        r.session = ort.InferenceSession(str(path), session_options, providers=[
            ("CUDAExecutionProvider", {"enable_cuda_graph": "1", **options}), "CPUExecutionProvider"])
    fn = r.prepare(feed)
    for _ in range(30):  # TunableOp tunes during the first runs
        fn()
    return fn


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path("/tmp/ort_options")
    work.mkdir(exist_ok=True)
    paths = export_models("bert", work)
    feed = make_inputs(1, 128, ("input_ids", "attention_mask", "token_type_ids"), 30522)
    model = work / "tqc.onnx"
    compile_model(CompileOptions(model=str(paths["sdpa"]), pipeline="fold,fuse,fp16", output=str(model), target="ort-cuda"))
    fp16_out = work / "tqc_fp16_out.onnx"
    fp16_outputs(model, fp16_out)
    fns = {}
    for name, options in OPTION_SETS.items():
        for label, path in (("", model), (" fp16-out", fp16_out)):
            try:
                fns[name + label] = runner(path, options, feed)
            except Exception as exc:
                print(name + label, "error", str(exc)[:200], flush=True)
    prepare, _ = torch_runners("bert", "cuda", True)
    torch_fn = prepare(feed)
    torch_fn()
    fns["torch.compile"] = torch_fn
    rounds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, fn in fns.items():
            rounds.setdefault(name, []).append(round(time_callable(fn, 1, 300, 10, 4.0, torch.cuda.synchronize).median_ms, 4))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rounds.items()), flush=True)
    medians = {k: round(statistics.median(v), 4) for k, v in rounds.items()}
    anchor = medians["torch.compile"]
    results = {"rounds": rounds, "median_ms": medians,
               "speedup_vs_torch_compile": {k: round(anchor / v, 3) for k, v in medians.items()}}
    for k, v in medians.items():
        print(f"{k:28s} {v:.4f} ms  {anchor / v:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
