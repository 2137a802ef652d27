#!/usr/bin/env python3
"""Which tqc graph form and ORT CUDA provider options give the lowest bert-base 1x128 latency (CUDA graph)?

One run on the GPU machine, with torch.compile(reduce-overhead) FP16 measured in the same run as the anchor.
    bash bench/gpu_run.sh bench/gpu_ort_options.py --json $OUT/ort_options.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fuse import export_models, make_inputs, torch_runners  # noqa: E402

from tqc.compiler.benchmark import OrtRunner, time_callable  # noqa: E402
from tqc.compiler.compile import CompileOptions, compile_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", default="1x128")
    args = parser.parse_args()
    batch, seq = (int(x) for x in args.shape.split("x"))
    work = Path("/tmp/ort_options")
    work.mkdir(exist_ok=True)
    paths = export_models("bert", work)
    feed = make_inputs(batch, seq, ("input_ids", "attention_mask", "token_type_ids"), 30522)
    variants = {
        "default": "fold,fuse,fp16",
        "no-embed-ln": "fold,fuse{embed_layernorm=false},fp16",
        "raw-mask": "fold,fuse{mask=raw},fp16",
    }
    results = {}
    for name, pipeline in variants.items():
        out = work / f"{name}.onnx"
        compile_model(CompileOptions(model=str(paths["sdpa"]), pipeline=pipeline, output=str(out), target="ort-cuda"))
        for kernel in (None, "1", "2", "4", "8", "16"):
            label = f"{name}/sdpa_kernel={kernel or 'default'}"
            try:
                runner = OrtRunner(out, "cuda", None, cuda_graph=True)
                if kernel is not None:
                    import onnxruntime as ort

                    options = ort.SessionOptions()
                    options.log_severity_level = 3
                    runner.session = ort.InferenceSession(str(out), options, providers=[
                        ("CUDAExecutionProvider", {"enable_cuda_graph": "1", "sdpa_kernel": kernel}),
                        "CPUExecutionProvider"])
                timing = time_callable(runner.prepare(feed), batch, 300, 10, 4.0)
                results[label] = round(timing.median_ms, 4)
            except Exception as exc:
                results[label] = f"error: {str(exc)[:120]}"
            print(label, results[label], flush=True)
    prepare, sync = torch_runners("bert", "cuda", True)
    run = prepare(feed)
    run()
    sync()
    results["torch.compile reduce-overhead fp16"] = round(time_callable(run, batch, 300, 10, 4.0, sync).median_ms, 4)
    print("torch.compile", results["torch.compile reduce-overhead fp16"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
