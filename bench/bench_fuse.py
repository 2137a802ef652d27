#!/usr/bin/env python3
"""Fusion benchmark: tqc ``fuse`` (+``fp16`` on GPU) against PyTorch and ONNX Runtime's own optimizer.

One run measures every variant on the same machine, so ratios are meaningful; absolute numbers are not
comparable across machines. Prints a table of medians and writes JSON.

    python bench/bench_fuse.py --device cpu  --json out/fuse_cpu.json
    python bench/bench_fuse.py --device cuda --json out/fuse_cuda.json   (onnxruntime-gpu, torch with CUDA)

Variants (GPU: FP16; CPU: FP32, torch.compile reduce-overhead needs CUDA graphs and runs on GPU only):
  torch-eager            transformers model, the family's default attention (sdpa where it has one)
  torch-compile          torch.compile(mode="reduce-overhead"), the same attention
  ort-plain              ORT on the default export (sdpa, or eager where the family has no sdpa), no extra optimization (ORT's default session optimizations on)
  ort-opt[sdpa|eager]    onnxruntime.transformers optimizer (+fp16) on each export the family has
  ort-opt(shape_inference=False)[...]  the same optimizer with its symbolic shape inference off (its own switch),
                         run only where ort-opt did not finish in --ort-opt-timeout or failed (DeBERTa-v3 exported
                         by transformers 5.17: its If nodes; see ort_optimize)
  tqc[sdpa|eager]        tqc fold,fuse(+fp16) on the sdpa / eager export
ORT on CUDA runs with IO binding, and again with CUDA graphs (suffix +graph).
--interleave (CPU) times the ORT variants of a model round-robin, one run of each per round, so a shared
machine's load falls on all of them alike; --extra FAMILY:LABEL=PATH adds a model compiled elsewhere (tqc at
another commit: a before/after in one run).
Models have random weights built from the recipes' configs (latency does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_inputs(batch: int, seq: int, names: tuple[str, ...], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(5, min(vocab, 30000), size=(batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}
    return {n: feed[n] for n in names}


def answer(session, names: tuple[str, ...], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The first output on a 2x128 feed whose second row has 100 real tokens (right padding), and the mask."""
    feed = make_inputs(2, 128, names, vocab, seed=5)
    feed["attention_mask"][1, 100:] = 0
    if "input_ids" in feed:
        feed["input_ids"][1, 100:] = 0
    wanted = {i.name for i in session.get_inputs()}
    out = session.run(None, {k: v for k, v in feed.items() if k in wanted})[0]
    return np.asarray(out, dtype=np.float32), feed["attention_mask"]


def compare_answer(got, reference) -> dict:
    """Cosine (worst real token) and max |diff| over the real tokens only: what a padded position holds differs
    between attention implementations (eager averages a fully masked row, sdpa zeroes it) and is no answer."""
    (a, mask), (b, _) = got, reference
    if a.shape != b.shape:
        return {"error": f"output shape {list(a.shape)} vs {list(b.shape)}"}
    real = mask.astype(bool) if a.ndim == 3 else np.ones(a.shape[0], bool)
    a, b = a[real].reshape(int(real.sum()), -1), b[real].reshape(int(real.sum()), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {"cos_min": round(float(cos.min()), 6), "max_abs": float(np.abs(a - b).max()),
            "finite": bool(np.isfinite(a).all())}


def time_fn(fn, runs: int, warmup: int, budget_s: float, sync=None) -> dict:
    from tqc.compiler.tools.benchmark import time_callable

    timing = time_callable(fn, 1, runs, warmup, budget_s, sync)
    return {"median_ms": timing.median_ms, "p95_ms": timing.p95_ms, "runs": timing.runs}


def time_interleaved(fns: dict, runs: int, warmup: int, budget_s: float) -> dict[str, dict]:
    """Each of ``fns`` timed round-robin: one run of each per round, the order rotating a step each round;
    ``budget_s`` per variant."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, samples = list(fns), {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while (rounds < runs and time.perf_counter() - start < budget_s * len(names)) or rounds < 3:
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
    stats = {}
    for name, values in samples.items():
        ordered = sorted(values)
        stats[name] = {"median_ms": statistics.median(ordered), "p95_ms": ordered[round(0.95 * (len(ordered) - 1))],
                       "runs": len(ordered), "interleaved": True}
    return stats


def failure(exc: BaseException, width: int) -> dict:
    """A variant that failed, as the results record it: the exception's type and the start of its message."""
    return {"error": f"{type(exc).__name__}: {str(exc)[:width]}"}


# ---------------------------------------------------------------- model preparation

def export_models(family: str, workdir: Path, attentions: tuple[str, ...] | None = None) -> dict[str, Path]:
    from tqc.models.export import ExportSpec, export
    from tqc.models.recipes import find_recipe

    recipe = find_recipe(family)
    config = recipe.config("base")
    cfg_dir = workdir / f"{family}-config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(cfg_dir)
    paths = {}
    for attn in attentions or recipe.attentions:  # DeBERTa-v2 and MPNet have eager only
        path = workdir / f"{family}-{attn}.onnx"
        if not path.exists():
            log(f"export {family} ({attn})")
            export(ExportSpec(str(cfg_dir / "config.json"), exporter="legacy", attn=attn), path)
        paths[attn] = path
    return paths


def tqc_compile(src: Path, out: Path, target: str, fp16: bool) -> dict:
    from tqc.compiler.tools.compile import CompileOptions, compile_model

    pipeline = "fold,fuse" + (",fp16" if fp16 else "")
    start = time.perf_counter()
    report = compile_model(CompileOptions(model=str(src), pipeline=pipeline, output=str(out), target=target,
                                          verify="structure"))
    fuse = next(s for s in report["stages"] if s["pass"] == "fuse")
    return {"compile_s": round(time.perf_counter() - start, 2), "attention": fuse["stats"]["attention_summary"]}


def ort_optimize_within(seconds: float, src: Path, out: Path, family: str, fp16: bool, use_gpu: bool,
                        shape_inference: bool = True) -> dict:
    """``ort_optimize`` in a child process, stopped after ``seconds`` (on the H100 host, ORT 1.31's optimizer with
    use_gpu and FP16 had not finished DeBERTa-v3-base after 8 minutes): a tool that does not finish is a result."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        job = pool.apply_async(ort_optimize, (src, out, family, fp16, use_gpu, shape_inference))
        try:
            return job.get(timeout=seconds)
        except multiprocessing.TimeoutError:
            pool.terminate()
            out.unlink(missing_ok=True)
            raise RuntimeError(f"ORT's optimizer had not finished after {seconds:.0f} s") from None


def ort_optimize(src: Path, out: Path, family: str, fp16: bool, use_gpu: bool, shape_inference: bool = True) -> dict:
    """ONNX Runtime's transformers optimizer (model_type bert, +fp16) as a user calls it.

    ``shape_inference=False`` is ORT's own switch for a model whose symbolic shape inference does not finish
    (``FusionOptions.enable_shape_inference``, the optimizer's ``--disable_shape_inference``), kept through the fp16
    conversion (ORT's ``float16.convert_float_to_float16`` typing the graph with ONNX's shape inference, then the
    Cast clean-ups of ``OnnxModel.convert_float_to_float16``, whose ``initialize`` turns the switch back on). On
    transformers 5.17's DeBERTa-v3 export, each If (12) makes ``SymbolicShapeInference._onnx_infer_subgraph`` copy
    every initializer of the model into each branch's graph, at each of the optimizer's shape inferences: the
    default did not finish DeBERTa-v3-base in 15 minutes and took up to 19 GB."""
    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from tqc.models.recipes import find_recipe

    config = find_recipe(family).config("base")
    options = FusionOptions("bert")
    options.enable_shape_inference = shape_inference
    start = time.perf_counter()
    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size, use_gpu=use_gpu, optimization_options=options)
    if fp16 and shape_inference:
        model.convert_float_to_float16(keep_io_types=True)
    elif fp16:  # OnnxModel.convert_float_to_float16's steps with the switch kept off
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model.initialize(convert_float_to_float16(model.model, keep_io_types=True))
        model.disable_shape_inference()
        model.remove_cascaded_cast_nodes()
        model.remove_useless_cast_nodes()
    model.save_model_to_file(str(out))
    fused = sum(1 for n in onnx.load(str(out), load_external_data=False).graph.node
                if n.op_type in ("Attention", "MultiHeadAttention"))
    return {"compile_s": round(time.perf_counter() - start, 2), "attention": f"{fused}/{config.num_hidden_layers} attention fused"}


# ---------------------------------------------------------------- runners

def OrtRunner(path: Path, device: str, threads: int, cuda_graph: bool = False):
    """tqc's own runner (``tqc bench``): CPU, or CUDA with IO binding and optional CUDA graphs."""
    from tqc.compiler.tools.benchmark import OrtRunner as Runner

    return Runner(path, "cuda" if device == "cuda" else "cpu", threads if device == "cpu" else None, cuda_graph)


def torch_runners(family: str, device: str, compile_mode: bool):
    import torch
    from transformers import AutoModel

    from tqc.models.recipes import find_recipe

    recipe = find_recipe(family)
    config = recipe.config("base")
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=recipe.default_attention).eval()
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    fn = torch.compile(model, mode="reduce-overhead") if compile_mode else model

    def prepare(feed):
        tensors = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}

        def run():
            with torch.inference_mode():
                return fn(**tensors).last_hidden_state
        return run
    sync = torch.cuda.synchronize if device == "cuda" else None
    return prepare, sync


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default="bert,minilm")
    parser.add_argument("--shapes", default="1x16,1x128,8x128,32x128")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per measurement at most")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default="bench_work")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--ort-opt-timeout", type=float, default=240.0, help="seconds ORT's optimizer may take")
    parser.add_argument("--ort-opt-fallback-timeout", type=float, default=180.0,
                        help="seconds the retry without symbolic shape inference may take, after ORT's optimizer "
                             "did not finish or failed")
    parser.add_argument("--deadline", type=float, default=540.0, help="stop starting new work after this many s")
    parser.add_argument("--interleave", action="store_true", help="CPU: time a model's ORT variants round-robin")
    parser.add_argument("--extra", action="append", default=[], metavar="FAMILY:LABEL=PATH",
                        help="one more ORT variant of FAMILY: a model compiled elsewhere (repeatable)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    target = "ort-cuda" if cuda else "ort-cpu"
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results: dict = {"device": args.device, "threads": args.threads, "shapes": args.shapes, "rows": [],
                     "compile": {}, "env": environment(cuda)}

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))

    for family in args.models.split(","):
        from tqc.models.recipes import find_recipe

        recipe = find_recipe(family)
        vocab = recipe.config("base").vocab_size
        paths = export_models(family, workdir)
        sessions: dict[str, Path] = {"ort-plain": paths[recipe.default_attention]}
        for attn in paths:
            for tool, make in (("ort-opt", lambda src, out: ort_optimize_within(args.ort_opt_timeout, src, out, family,
                                                                                cuda, cuda)),
                               ("tqc", lambda src, out: tqc_compile(src, out, target, cuda))):
                out = workdir / f"{family}-{attn}-{tool.replace('-', '')}.onnx"
                try:  # a tool that fails on a family is reported in the results, not fatal to the run
                    results["compile"][f"{family}/{tool}[{attn}]"] = make(paths[attn], out)
                    sessions[f"{tool}[{attn}]"] = out
                except Exception as exc:
                    results["compile"][f"{family}/{tool}[{attn}]"] = failure(exc, 300)
                    if tool == "ort-opt":  # ORT's optimizer again with its own switch that turns its symbolic
                        # shape inference off (that inference did not finish on the If nodes of transformers 5.17's
                        # DeBERTa-v3 export; see ort_optimize), labelled as such
                        out = workdir / f"{family}-{attn}-ortopt-noshape.onnx"
                        label = f"ort-opt(shape_inference=False)[{attn}]"
                        try:
                            results["compile"][f"{family}/{label}"] = ort_optimize_within(
                                args.ort_opt_fallback_timeout, paths[attn], out, family, cuda, cuda,
                                shape_inference=False)
                            sessions[label] = out
                        except Exception as retry:
                            results["compile"][f"{family}/{label}"] = failure(retry, 300)
        for extra in args.extra:
            extra_family, _, rest = extra.partition(":")
            label, _, extra_path = rest.partition("=")
            if extra_family == family:
                sessions[label] = Path(extra_path)
        log(f"{family}: compiled " + json.dumps(results["compile"]))
        save()
        if args.interleave and not cuda:
            runners = {name: OrtRunner(path, args.device, args.threads) for name, path in sessions.items()}
            for batch, seq in shapes:
                feed = make_inputs(batch, seq, recipe.inputs, vocab)
                timed = time_interleaved({name: r.prepare(feed) for name, r in runners.items()}, args.runs,
                                         args.warmup, args.budget)
                for label, stats in timed.items():
                    results["rows"].append({"model": family, "shape": f"{batch}x{seq}", "variant": label, **stats})
                    log(f"{family} {batch}x{seq} {label}: {stats}")
                save()
            del runners
            sessions = {}
        reference = None
        for name, path in sessions.items():
            graphs = (False, True) if cuda else (False,)
            for graph in graphs:
                label = name + ("+graph" if graph else "")
                runner = None if graph else OrtRunner(path, args.device, args.threads)
                if runner is not None:  # the answer first: ort-plain (FP32, the export as it is) is the reference
                    try:
                        hidden = answer(runner.session, recipe.inputs, vocab)
                        reference = hidden if reference is None else reference
                        results.setdefault("answers", {})[f"{family}/{name}"] = compare_answer(hidden, reference)
                    except Exception as exc:
                        results.setdefault("answers", {})[f"{family}/{name}"] = failure(exc, 160)
                    log(f"{family} {name} answer vs ort-plain: {results['answers'][f'{family}/{name}']}")
                for batch, seq in shapes:
                    if time.perf_counter() - t_start > args.deadline:
                        log("deadline reached; stopping")
                        save()
                        print_table(results)
                        return
                    feed = make_inputs(batch, seq, recipe.inputs, vocab)
                    try:
                        r = OrtRunner(path, args.device, args.threads, cuda_graph=True) if graph else runner
                        stats = time_fn(r.prepare(feed), args.runs, args.warmup, args.budget)
                    except Exception as exc:  # a variant that cannot run is reported, not fatal
                        stats = failure(exc, 160)
                    results["rows"].append({"model": family, "shape": f"{batch}x{seq}", "variant": label, **stats})
                    log(f"{family} {batch}x{seq} {label}: {stats}")
                    save()
        torch_variants = [("torch-eager", False)] + ([("torch-compile", True)] if cuda and not args.no_torch_compile else [])
        for label, compiled in torch_variants:
            try:
                prepare, sync = torch_runners(family, args.device, compiled)
            except Exception as exc:
                log(f"{label} unavailable: {exc}")
                continue
            for batch, seq in shapes:
                if time.perf_counter() - t_start > args.deadline:
                    break
                feed = make_inputs(batch, seq, recipe.inputs, vocab)
                try:
                    t0 = time.perf_counter()
                    run = prepare(feed)
                    run()
                    if sync:
                        sync()
                    warm_s = time.perf_counter() - t0
                    stats = time_fn(run, args.runs, args.warmup, args.budget, sync=sync)
                    stats["first_call_s"] = round(warm_s, 2)
                except Exception as exc:
                    stats = failure(exc, 160)
                results["rows"].append({"model": family, "shape": f"{batch}x{seq}", "variant": label, **stats})
                log(f"{family} {batch}x{seq} {label}: {stats}")
                save()
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print_table(results)


def environment(cuda: bool) -> dict:
    import onnxruntime

    env = {"onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    try:
        import torch

        env["torch"] = torch.__version__
        if cuda and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return env


def print_table(results: dict) -> None:
    rows = results["rows"]
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (not v.startswith("tqc"), v))
    keys = sorted({(r["model"], r["shape"]) for r in rows}, key=lambda k: (k[0], int(k[1].split("x")[0]), int(k[1].split("x")[1])))
    table = {(r["model"], r["shape"], r["variant"]): r.get("median_ms") for r in rows}
    print(f"\nmedian latency, ms ({results['device']}, {results['env']})")
    header = f"{'model':<8} {'shape':<7} " + " ".join(f"{v:>17}" for v in variants)
    print(header)
    for model, shape in keys:
        cells = []
        for v in variants:
            value = table.get((model, shape, v))
            cells.append(f"{value:>17.3f}" if value is not None else f"{'-':>17}")
        print(f"{model:<8} {shape:<7} " + " ".join(cells))
    print("\nratios (anchor / the fastest tqc variant of that model and shape; >1 means tqc is faster)")
    anchors = [v for v in variants if not v.startswith("tqc")]
    print(f"{'model':<8} {'shape':<7} {'tqc variant':>17} " + " ".join(f"{v:>17}" for v in anchors))
    for model, shape in keys:
        ours = {v: table.get((model, shape, v)) for v in variants if v.startswith("tqc")}
        ours = {v: t for v, t in ours.items() if t}
        best = min(ours, key=ours.get) if ours else "-"
        cells = []
        for v in anchors:
            other = table.get((model, shape, v))
            cells.append(f"{other / ours[best]:>17.2f}" if ours and other else f"{'-':>17}")
        print(f"{model:<8} {shape:<7} {best:>17} " + " ".join(cells))
    print("\ncompile: " + json.dumps(results["compile"]))
    if results.get("answers"):
        print("answers vs ort-plain (real tokens of a padded 2x128 feed): " + json.dumps(results["answers"]))


if __name__ == "__main__":
    main()
