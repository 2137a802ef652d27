#!/usr/bin/env python3
"""Where does tqc's FP16 time go on ORT CUDA against torch.compile (bert-base 1x128 by default; --model, --shapes)?

One run on the GPU machine:
  * latency, CUDA graph + IO binding, of tqc graph variants on the sdpa export, interleaved over several
    rounds with torch.compile(mode="reduce-overhead") FP16 (the anchor), medians of medians;
  * a kernel-level profile of each (CUPTI through torch.profiler: it records every kernel in the process,
    ORT's included), run without CUDA graphs so every kernel is visible: kernels per run, GPU time per run,
    the top kernels. GPU time against wall time says how much is kernel work and how much is launch and
    host overhead.

    bash bench/gpu_run.sh bench/gpu_kernel_profile.py --json $OUT/kernel_profile.json
    bash bench/gpu_run.sh bench/gpu_kernel_profile.py --model modernbert --shapes 1x128,32x128 --json ...
    python bench/gpu_kernel_profile.py --model deberta-v3 --shapes 1x128 --dry-run     (CPU: compile + answers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fuse import export_models, make_inputs, torch_runners  # noqa: E402

from tqc.compiler.tools.benchmark import OrtRunner, time_callable  # noqa: E402
from tqc.compiler.tools.compile import CompileOptions, compile_model  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fp16_outputs(src: Path, out: Path) -> None:
    """The same graph with FP16 outputs: the final Cast to FP32 removed (what a FP16 consumer would take)."""
    import onnx

    model = onnx.load(str(src))
    outputs = {o.name: o for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type == "Cast" and node.output[0] in outputs:
            source = node.input[0]
            for other in model.graph.node:
                other.output[:] = [node.output[0] if o == source else o for o in other.output]
                if other is not node:
                    other.input[:] = [node.output[0] if i == source else i for i in other.input]
            model.graph.node.remove(node)
            outputs[node.output[0]].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, str(out))


def kernel_profile(fn, sync, iterations: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            fn()
        sync()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time if hasattr(event, "device_time")
                                                      else event.cuda_time)
    per_run = sum(sum(v) for v in kernels.values()) / iterations
    count = sum(len(v) for v in kernels.values()) / iterations
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {"gpu_us_per_run": round(per_run, 1), "kernels_per_run": round(count, 1),
            "top": [{"kernel": name[:140], "per_run": round(len(v) / iterations, 2),
                     "us_per_run": round(sum(v) / iterations, 2), "us_each": round(statistics.median(v), 2)}
                    for name, v in top]}


def session_answer(session, feed: dict) -> np.ndarray:
    """The session's first output on the feed's inputs it takes, float32 [tokens, hidden]."""
    names = {i.name for i in session.get_inputs()}
    out = np.asarray(session.run(None, {k: v for k, v in feed.items() if k in names})[0], np.float32)
    return out.reshape(-1, out.shape[-1])


def worst_cosine(mine: np.ndarray, reference: np.ndarray) -> float:
    """The lowest cosine over tokens between two [tokens, hidden] answers (all tokens real)."""
    cos = (mine * reference).sum(1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(reference, axis=1))
    return float(cos.min())


def dry_run(models: dict[str, Path], export: Path, recipe, vocab: int, shapes: str) -> None:
    """The GPU run's answer check on ORT CPU: each variant's worst token cosine to the export's answer."""
    import onnxruntime as ort

    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in {"export": export, **models}.items()}
    for shape in shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        feed = make_inputs(batch, seq, recipe.inputs, vocab)
        answers = {name: session_answer(session, feed) for name, session in sessions.items()}
        reference = answers.pop("export")
        for name, mine in answers.items():
            log(f"dry run {shape} {name}: cos_min {worst_cosine(mine, reference):.6f}, "
                f"finite {bool(np.isfinite(mine).all())}, max |diff| {np.abs(mine - reference).max():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--model", default="bert", help="a tqc export recipe (bert, modernbert, deberta-v3, ...)")
    parser.add_argument("--attn", default=None, help="which export: sdpa for bert, eager for the others")
    parser.add_argument("--shapes", default="1x128", help="BATCHxSEQ,...")
    parser.add_argument("--no-profile", action="store_true", help="latency rounds and the answer check only")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: export, compile the variants and check "
                        "their answers against the export on ORT CPU (what the GPU run does first), then stop")
    args = parser.parse_args()
    import torch

    from tqc.models.recipes import find_recipe

    sync = torch.cuda.synchronize
    work = Path("/tmp/kernel_profile")
    work.mkdir(exist_ok=True)
    recipe = find_recipe(args.model)
    vocab = recipe.config("base").vocab_size
    attn = args.attn or ("sdpa" if args.model == "bert" else "eager")
    paths = export_models(args.model, work, (attn,))
    variants = {"tqc": ("fold,fuse,fp16", None)}
    if args.model == "bert":
        variants.update({"tqc fp16-out": ("fold,fuse,fp16", "fp16-out"),
                         "tqc sum-ln": ("fold,fuse{skip_layernorm=sum},fp16", None)})
    models = {}
    for name, (pipeline, edit) in variants.items():
        out = work / f"{args.model}-{name.replace(' ', '_')}.onnx"
        compile_model(CompileOptions(model=str(paths[attn]), pipeline=pipeline, output=str(out), target="ort-cuda"))
        if edit == "fp16-out":
            fp16_outputs(out, out)
        models[name] = out
    if args.dry_run:
        return dry_run(models, paths[attn], recipe, vocab, args.shapes)
    prepare, _ = torch_runners(args.model, "cuda", True)
    results: dict = {"model": args.model, "export": attn, "gpu": torch.cuda.get_device_name(0), "shapes": {}}
    import onnxruntime as ort

    sessions: dict[Path, object] = {}
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        feed = make_inputs(batch, seq, recipe.inputs, vocab)
        cell: dict = {"rounds": {}, "profiles": {}, "errors": {}, "answers": {}}
        runners = {}
        for name, path in models.items():
            try:
                runners[name] = OrtRunner(path, "cuda", None, cuda_graph=True).prepare(feed)
                runners[name]()  # capture happens on the first run
            except Exception as error:  # e.g. a graph ORT cannot capture: say so, time without graphs
                cell["errors"][name] = str(error)[:300]
                log(f"{shape} {name} +graph: {cell['errors'][name]}")
                runners[name + " (no graph)"] = OrtRunner(path, "cuda", None, cuda_graph=False).prepare(feed)
        torch_fn = prepare(feed)
        torch_fn()
        sync()
        def ort_answer(path: Path) -> np.ndarray:
            if path not in sessions:  # one plain CUDA session per model, over every shape
                sessions[path] = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            return session_answer(sessions[path], feed)

        reference = ort_answer(paths[attn])  # the export itself, FP32 on ORT CUDA
        for name, path in models.items():  # worst token's cosine to the export's answer (all tokens real)
            mine = ort_answer(path)
            cell["answers"][name] = {"cos_min": round(worst_cosine(mine, reference), 6),
                                     "finite": bool(np.isfinite(mine).all())}
        log(f"{shape} answers vs the export on ORT CUDA: {cell['answers']}")
        everything = {**runners, "torch.compile": torch_fn}
        for r in range(args.rounds):
            for name, fn in everything.items():
                median = time_callable(fn, 1, args.runs, 10, 4.0, sync).median_ms
                cell["rounds"].setdefault(name, []).append(round(median, 4))
            log(f"{shape} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in cell["rounds"].items()))
        cell["median_ms"] = {k: round(statistics.median(v), 4) for k, v in cell["rounds"].items()}
        anchor = cell["median_ms"]["torch.compile"]
        cell["speedup_vs_torch_compile"] = {k: round(anchor / v, 3) for k, v in cell["median_ms"].items()}
        log(f"{shape} medians {cell['median_ms']}; speed-up {cell['speedup_vs_torch_compile']}")
        for name, path in ([] if args.no_profile else models.items()):
            fn = OrtRunner(path, "cuda", None, cuda_graph=False).prepare(feed)
            cell["profiles"][name] = kernel_profile(fn, sync, 50)
        if not args.no_profile:
            cell["profiles"]["torch.compile"] = kernel_profile(torch_fn, sync, 50)
        for name, profile in cell["profiles"].items():
            print(f"\n{args.model} {shape} {name}: {profile['kernels_per_run']} kernels, "
                  f"{profile['gpu_us_per_run']} us GPU per run")
            for row in profile["top"][:15]:
                print(f"  {row['us_per_run']:8.1f} us  x{row['per_run']:<5} {row['kernel'][:100]}")
        results["shapes"][shape] = cell
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
