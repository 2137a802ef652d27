#!/usr/bin/env python3
"""OpenVINO CPU benchmark: tqc ``--target openvino`` INT8 against NNCF INT8, OpenVINO FP32 and ONNX Runtime.

One run, same machine, interleaved rounds (every variant and shape once per round; the median of the round
medians is reported, with ratios against ORT FP32 measured in the same rounds):

  ort-fp32      the exported FP32 model on ONNX Runtime CPU (the anchor of every ratio)
  ov-fp32       the same model on OpenVINO CPU
  nncf-int8     ``nncf.quantize(ov.convert_model(fp32), ModelType.TRANSFORMER)`` on the same calibration
                sentences, on OpenVINO
  tqc-ov-int8   ``tqc compile -p fold,fuse,qdq --target openvino`` on OpenVINO
  tqc-ort-int8  ``tqc compile -p fold,fuse,qdq --target ort-cpu`` on ONNX Runtime

Also: fidelity on held-out real sentences (the last --eval-sentences of ../shared/data/sentences.txt; the
calibration uses the first --calib-sentences): mean/min cosine of mean-pooled embeddings to FP32 and
nearest-neighbour agreement; compile time and peak memory (each quantizer in its own process, its own
ru_maxrss); what ran in INT8 (OpenVINO's runtime graph).

    python bench/bench_openvino.py --models minilm,bert --json bench/results/openvino_cpu.json

MiniLM has its real weights; bert-base has random weights (``tqc export bert``), so its fidelity only shows
that quantization error stays bounded. bert-base is tokenized with MiniLM's (bert-base-uncased) vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SENTENCES = next((p for p in (REPO.parent / "shared" / "data" / "sentences.txt",
                               REPO.parent.parent / "shared" / "data" / "sentences.txt") if p.is_file()),
                 REPO.parent / "shared" / "data" / "sentences.txt")
VARIANTS = ("ort-fp32", "ov-fp32", "nncf-int8", "tqc-ov-int8", "tqc-ort-int8")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_measured(code: str) -> dict:
    """Run python ``code`` in a fresh process; its last stdout line is JSON (with the child's own peak RSS,
    see ``PEAK``). Adds the wall time of the whole process (imports included)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(err[-2000:])
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 2)
    return result


PEAK = ("\nimport resource, json as _j\nprint(_j.dumps({**RESULT, 'peak_rss_mib': "
        "round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))\n")


def tokenizer():
    from transformers import AutoTokenizer

    from tqc.compiler.io.packaged import packaged_minilm_path

    return AutoTokenizer.from_pretrained(str(packaged_minilm_path()), local_files_only=True)


def encode(tok, sentences: list[str], names: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    enc = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {n: (enc[n] if n in enc else np.zeros_like(enc["input_ids"])).astype(np.int64) for n in names}


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    cos = (reference * candidate).sum(1)

    def neighbours(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
            "nn_agreement": round(float((neighbours(reference) == neighbours(candidate)).mean()), 4)}


class Engine:
    """One model on one engine: ``run(feed) -> last_hidden_state``."""

    def __init__(self, path: Path, engine: str, threads: int):
        self.engine = engine
        if engine == "ort":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()]
            self.run = lambda feed: self.session.run(None, {k: feed[k] for k in self.names})[0]
        else:
            from tqc.compiler.io.openvino_ir import OvRunner, runtime_precisions

            self.runner = OvRunner(path, threads)
            self.names = self.runner.input_names
            self.precisions = runtime_precisions(self.runner.compiled)
            port = self.runner.compiled.outputs[0]
            request = self.runner.request
            self.run = lambda feed: request.infer({k: feed[k] for k in self.names})[port]


def embed(engine: Engine, feeds: list[dict]) -> np.ndarray:
    out = []
    for feed in feeds:
        hidden = np.asarray(engine.run(feed), np.float64)
        mask = feed["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def timing_rounds(engines: dict[str, Engine], shapes, vocab: int, rounds: int, cell_s: float) -> dict:
    """Interleaved: each round runs every (shape, variant) for about ``cell_s`` seconds (at least 2 runs)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for batch, seq in shapes:
        ids = rng.integers(1000, min(vocab, 30000), (batch, seq)).astype(np.int64)
        feeds[(batch, seq)] = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                               "token_type_ids": np.zeros_like(ids)}
    medians = {(name, shape): [] for name in engines for shape in shapes}
    for engine in engines.values():  # warm-up
        for feed in feeds.values():
            engine.run(feed)
    for r in range(rounds):
        for shape in shapes:
            for name, engine in engines.items():
                samples, start = [], time.perf_counter()
                while len(samples) < 2 or time.perf_counter() - start < cell_s:
                    t0 = time.perf_counter()
                    engine.run(feeds[shape])
                    samples.append((time.perf_counter() - t0) * 1000)
                medians[(name, shape)].append(statistics.median(samples))
        log(f"  round {r + 1}/{rounds} done")
    out: dict = {}
    for shape in shapes:
        key = f"{shape[0]}x{shape[1]}"
        base = statistics.median(medians[("ort-fp32", shape)])
        for name in engines:
            median = statistics.median(medians[(name, shape)])
            out.setdefault(name, {})[key] = {"median_ms": round(median, 3), "vs_ort_fp32": round(base / median, 3),
                                             "round_medians_ms": [round(m, 3) for m in medians[(name, shape)]]}
    return out


def compile_jobs(family: str, fp32: Path, work: Path, calib_txt: Path, calib_count: int) -> dict[str, tuple[Path, str]]:
    tok_dir = "from tqc.compiler.io.packaged import packaged_minilm_path; TOK = str(packaged_minilm_path())\n"
    tqc = """
{tok}import time
t0 = time.perf_counter()
from tqc.compiler.tools.compile import CompileOptions, compile_model
report = compile_model(CompileOptions(model={fp32!r}, pipeline="fold,fuse,qdq", output={out!r}, target={target!r},
                       verify="none", calib={calib!r}, tokenizer=TOK, calib_samples={n}))
RESULT = {{"seconds": round(time.perf_counter() - t0, 2), "compile_seconds": report["total_seconds"],
          "stats": report["stages"][-1]["stats"]}}
"""
    nncf = """
{tok}import time
t0 = time.perf_counter()
import onnx, nncf, openvino as ov
from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
model = ov.convert_model({fp32!r})
feeds = list(FeedSource(DataSpec({calib!r}, tokenizer=TOK, samples={n}, batch_size=1, max_length=128),
                        onnx.load({fp32!r}, load_external_data=False)))
t1 = time.perf_counter()
quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
t2 = time.perf_counter()
ov.save_model(quantized, {out!r})
RESULT = {{"seconds": round(time.perf_counter() - t0, 2), "quantize_seconds": round(t2 - t1, 2),
          "nncf_version": nncf.__version__}}
"""
    jobs = {}
    for name, target in (("tqc-ov-int8", "openvino"), ("tqc-ort-int8", "ort-cpu")):
        out = work / f"{family}-{name}.onnx"
        jobs[name] = (out, tqc.format(tok=tok_dir, fp32=str(fp32), out=str(out), target=target, calib=str(calib_txt),
                                      n=calib_count) + PEAK)
    out = work / f"{family}-nncf-int8.xml"
    jobs["nncf-int8"] = (out, nncf.format(tok=tok_dir, fp32=str(fp32), out=str(out), calib=str(calib_txt),
                                          n=calib_count) + PEAK)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert")
    parser.add_argument("--workdir", default="/tmp/tqc_bench_openvino")
    parser.add_argument("--calib-sentences", type=int, default=32)
    parser.add_argument("--eval-sentences", type=int, default=1000, help="held-out sentences for MiniLM")
    parser.add_argument("--bert-eval-sentences", type=int, default=200, help="held-out sentences for bert-base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1x16,1x128,8x128")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bert-rounds", type=int, default=3)
    parser.add_argument("--cell-s", type=float, default=0.4, help="seconds per variant and shape in a round")
    parser.add_argument("--sentences", default=str(SENTENCES), help="one sentence a line")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import onnxruntime
    import openvino

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sentences = [s.strip() for s in Path(args.sentences).read_text().splitlines() if s.strip()]
    calib = sentences[: args.calib_sentences]
    calib_txt = work / "calib.txt"
    calib_txt.write_text("\n".join(calib) + "\n")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "isa": isa, "load_average_at_start": os.getloadavg()},
                     "threads": args.threads, "onnxruntime": onnxruntime.__version__,
                     "openvino": openvino.get_version(), "calib_sentences": len(calib), "models": {}}
    tok = tokenizer()
    for family in args.models.split(","):
        eval_count = args.eval_sentences if family == "minilm" else args.bert_eval_sentences
        held_out = sentences[-eval_count:]
        assert not set(calib) & set(held_out)
        fp32 = work / f"{family}-fp32.onnx"
        if not fp32.exists():
            log(f"export {family}")
            subprocess.run([sys.executable, "-m", "tqc", "-q", "export", family, "-o", str(fp32)], check=True)
        row: dict = {"eval_sentences": eval_count}
        paths = {"ort-fp32": fp32, "ov-fp32": fp32}
        for name, (out, code) in compile_jobs(family, fp32, work, calib_txt, len(calib)).items():
            log(f"{family}: compile {name}")
            row.setdefault("compile", {})[name] = run_measured(code)
            log(f"  {row['compile'][name]}")
            paths[name] = out
        engines = {name: Engine(paths[name], "ort" if name.startswith("ort") or name == "tqc-ort-int8" else "ov",
                                args.threads) for name in VARIANTS}
        row["runtime_precisions"] = {n: e.precisions for n, e in engines.items() if e.engine == "ov"}
        names = engines["ort-fp32"].names
        feeds = [encode(tok, held_out[i:i + 32], names) for i in range(0, len(held_out), 32)]
        log(f"{family}: fidelity on {len(held_out)} held-out sentences")
        reference = embed(engines["ort-fp32"], feeds)
        row["fidelity"] = {n: fidelity(reference, embed(e, feeds)) for n, e in engines.items() if n != "ort-fp32"}
        log(f"  {row['fidelity']}")
        rounds = args.rounds if family == "minilm" else args.bert_rounds
        log(f"{family}: latency, {rounds} interleaved rounds")
        row["latency"] = timing_rounds(engines, shapes, 30522, rounds, args.cell_s)
        results["models"][family] = row
        print_table(family, row)
        del engines
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def print_table(family: str, row: dict) -> None:
    print(f"\n{family}: latency median ms (x vs ORT FP32, same rounds); fidelity on {row['eval_sentences']} held-out "
          "sentences vs ORT FP32")
    shapes = list(row["latency"]["ort-fp32"])
    print(f"{'variant':<14} " + " ".join(f"{s:>17}" for s in shapes) +
          f" {'mean cos':>9} {'min cos':>8} {'NN':>6} {'compile s':>10} {'peak MiB':>9}")
    for name, lat in row["latency"].items():
        cells = " ".join(f"{lat[s]['median_ms']:>9.2f} ({lat[s]['vs_ort_fp32']:.2f}x)" for s in shapes)
        f = row["fidelity"].get(name, {"mean_cosine": 1.0, "min_cosine": 1.0, "nn_agreement": 1.0})
        c = row.get("compile", {}).get(name, {})
        compile_s = c.get("quantize_seconds", c.get("compile_seconds"))
        print(f"{name:<14} {cells} {f['mean_cosine']:>9.5f} {f['min_cosine']:>8.4f} {f['nn_agreement']:>6.3f} "
              f"{(f'{compile_s:.2f}' if compile_s is not None else '-'):>10} {c.get('peak_rss_mib', 0):>9.0f}")
    c = row.get("compile", {})
    if "nncf-int8" in c and "tqc-ov-int8" in c:
        print(f"compile: tqc openvino {c['tqc-ov-int8']['wall_s']:.1f} s process ({c['tqc-ov-int8']['compile_seconds']:.1f} s "
              f"compile), nncf {c['nncf-int8']['wall_s']:.1f} s process ({c['nncf-int8']['quantize_seconds']:.1f} s "
              f"nncf.quantize): {c['nncf-int8']['quantize_seconds'] / c['tqc-ov-int8']['compile_seconds']:.1f}x")


if __name__ == "__main__":
    main()
