#!/usr/bin/env python3
"""Where OpenVINO's CPU time goes: the FP32 model on OpenVINO's default precision (bf16 on AMX) against tqc's and
NNCF's INT8, from OpenVINO's own performance counters and runtime model. One run, one machine.

Variants (all on OpenVINO CPU, latency hint, --threads inference threads):

  fp32            the exported FP32 model (.onnx) with OpenVINO's defaults: bf16 on CPUs with AMX/AVX512-BF16
  fp32-fused      tqc ``fold,fuse`` written as IR (float; OpenVINO's fused attention), same defaults
  tqc-int8        tqc ``fold,fuse,qdq --target openvino`` as it is now (float attention, zero points in the bias,
                  SmoothQuant's Muls after a LayerNorm folded into a second LayerNorm: qdq/openvino.fold_smoothing,
                  and each packed QKV projection unpacked into three MatMuls: qdq/openvino.unpack_qkv)
  tqc-int8-nofold the same with SmoothQuant's Muls (and shift Adds) left before every quantized linear input
  tqc-int8-packed the same with the QKV projections left packed (a Split after each)
  tqc-int8-round1 both: the default placement of the first round of this analysis
  tqc-int8-attn   the same with ``qdq{attention=true}`` (attention's MatMuls in INT8; q, k, v share one Q/DQ
                  before the QKV Split, fused into the projection: passes/qdq/shared_qkv.py)
  tqc-int8-attn-sep  ``qdq{attention=true}`` with a Q/DQ each on q, k and v (before shared_qkv: 48 reorders)
  tqc-int8-old    the placement before this analysis: INT8 attention, UINT8 zero points left in the
                  DequantizeLinear (run through OpenVINO's zero-point compensation)
  nncf-int8       ``nncf.quantize(..., ModelType.TRANSFORMER)`` on the same calibration sentences
  ...-f32         a variant compiled with INFERENCE_PRECISION_HINT=f32 (the rest in f32 instead of bf16)
  ...-nopin       a variant compiled with ENABLE_CPU_PINNING=False (threads not pinned to cores; OpenVINO pins
                  them by default under the latency hint)

For each variant and shape: per-node time from ``ov::enable_profiling`` (``PERF_COUNT``), the mean over
--profile-runs interleaved rounds (every variant and shape once a round) of each node's real time, summed per
(layer type, kernel) and as shares (MatMul work: FullyConnected,
MatMul, the attention Subgraph; the rest: LayerNorm (MVN), Eltwise, Softmax, FakeQuantize, Reorder, Convert,
Transpose, Split...); the runtime model's precisions (``runtime_precisions``) and where each MatMul runs
(``matmul_placement``); latency from interleaved rounds (each round runs every variant and shape; median of the
round medians, speed-up over ``fp32`` measured in the same rounds; also the process CPU time an inference and
the fastest run of all rounds, the measures least moved by other load on a shared machine); fidelity of mean-pooled embeddings on held-out
sentences against ORT FP32 (mean/min cosine, nearest-neighbour agreement).

    python bench/bench_openvino_profile.py --json bench/results/openvino_profile_amx.json
    python bench/bench_openvino_profile.py --fc-chain 1024 --threads 1 --json bench/results/openvino_fc_chain_amx.json

The sentences default to ../shared/data/sentences.txt (first --calib-sentences calibrate, last
--eval-sentences judge). Non-AMX behaviour on an AMX machine: ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI with
--precision f32 (OpenVINO still picks bf16 by its own CPU check unless told f32).
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
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_openvino import SENTENCES, encode, fidelity, log, tokenizer  # noqa: E402

MATMUL_WORK = ("FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul", "Subgraph", "ScaledDotProductAttention")

# earlier placements, rebuilt by switching the openvino target's newer facts off in the compiling process: before
# the first analysis (INT8 attention, zero points left in the DequantizeLinear), q, k, v quantized apart,
# SmoothQuant's Muls not folded, the QKV projections packed
FACTS = {"old": "int8_attention_by_default=True, zero_points_in_bias=False, shared_qkv_scale=False, "
                "smoothing_folded=False, qkv_unpacked=False",
         "sep": "shared_qkv_scale=False, qkv_unpacked=False", "nofold": "smoothing_folded=False", "packed": "qkv_unpacked=False",
         "round1": "smoothing_folded=False, qkv_unpacked=False"}


def with_facts(facts: str) -> str:
    return ("import dataclasses; import tqc.compiler.core.target as T; "
            f"T.BY_NAME['openvino'] = dataclasses.replace(T.OPENVINO, {facts}); "
            "from tqc.compiler.cli.main import main; main()")


def tqc_compile(fp32: Path, out: Path, pipeline: str, calib: Path, samples: int, facts: str | None = None) -> float:
    cmd = [sys.executable] + (["-c", with_facts(FACTS[facts])] if facts else ["-m", "tqc"])
    cmd += ["-q", "compile", str(fp32), "-p", pipeline, "--target", "openvino", "-o", str(out), "--verify", "none"]
    if "qdq" in pipeline:
        cmd += ["--calib", str(calib), "--calib-samples", str(samples)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 1)


def nncf_compile(fp32: Path, out: Path, calib: Path, samples: int) -> float:
    code = f"""
import onnx, nncf, openvino as ov
from tqc.compiler.analysis.calib_data import DataSpec, FeedSource
from tqc.compiler.io.packaged import packaged_minilm_path
feeds = list(FeedSource(DataSpec({str(calib)!r}, tokenizer=str(packaged_minilm_path()), samples={samples},
                                 batch_size=1, max_length=128), onnx.load({str(fp32)!r}, load_external_data=False)))
model = nncf.quantize(ov.convert_model({str(fp32)!r}), nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(feeds))
ov.save_model(model, {str(out)!r})
"""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 1)


def compile_variant(core, path: Path, threads: int, precision: str | None, profiling: bool = False,
                    pinning: bool = True):
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if not pinning:
        config["ENABLE_CPU_PINNING"] = False
    if profiling:
        config["PERF_COUNT"] = True
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def token_feed(batch: int, seq: int, names) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1000, 30000, (batch, seq)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feed.items() if k in names}


def profile_counters(request) -> dict:
    """Per (layer type, kernel): count of nodes, ms a run (OpenVINO's counters: the mean over every run of the
    compiled model so far); the share of MatMul work, the reorders."""
    groups: dict[str, dict] = {}
    for info in request.profiling_info:
        if info.status != info.Status.EXECUTED:
            continue
        group = groups.setdefault(f"{info.node_type} {info.exec_type}", {"nodes": 0, "ms": 0.0})
        group["nodes"] += 1
        group["ms"] += info.real_time.total_seconds() * 1e3
    total = sum(g["ms"] for g in groups.values())
    matmul = sum(g["ms"] for k, g in groups.items() if k.split()[0] in MATMUL_WORK)
    ordered = dict(sorted(((k, {"nodes": g["nodes"], "ms": round(g["ms"], 3), "share": round(g["ms"] / total, 4)})
                           for k, g in groups.items()), key=lambda kv: -kv[1]["ms"]))
    return {"total_ms": round(total, 3), "matmul_work_share": round(matmul / total, 4),
            "reorders": sum(g["nodes"] for k, g in groups.items() if k.startswith("Reorder")), "kernels": ordered}


def interleaved_profiles(profiled: dict, runs: int) -> dict:
    """``profiled[(variant, shape)] = (request, feed)``, each request of its own compiled model (OpenVINO keeps one
    set of counters per compiled model): ``runs`` rounds, each running every variant and shape once after 3
    warm-up runs, so that other load on the machine falls on every variant alike; then each one's counters."""
    for request, feed in profiled.values():
        for _ in range(3):
            request.infer(feed)
    for _ in range(runs):
        for request, feed in profiled.values():
            request.infer(feed)
    return {key: profile_counters(request) for key, (request, _) in profiled.items()}


def timing_rounds(requests: dict, feeds: dict, rounds: int, cell_s: float, base: str) -> dict:
    medians: dict = defaultdict(list)
    fastest: dict = defaultdict(list)  # the fastest run of each cell: the least touched by other load
    cpu: dict = defaultdict(list)  # process CPU time an inference (both threads; less sensitive to other load)
    for name, (request, _) in requests.items():
        for shape, feed in feeds[name].items():
            for _ in range(3):
                request.infer(feed)
    for r in range(rounds):
        for shape in next(iter(feeds.values())):
            for name, (request, _) in requests.items():
                samples, start, cpu_start = [], time.perf_counter(), time.process_time()
                while len(samples) < 3 or time.perf_counter() - start < cell_s:
                    t0 = time.perf_counter()
                    request.infer(feeds[name][shape])
                    samples.append((time.perf_counter() - t0) * 1e3)
                medians[(name, shape)].append(statistics.median(samples))
                fastest[(name, shape)].append(min(samples))
                cpu[(name, shape)].append((time.process_time() - cpu_start) * 1e3 / len(samples))
        log(f"  round {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f})")
    out: dict = {}
    for (name, shape), values in medians.items():
        out.setdefault(name, {})[shape] = {"median_ms": round(statistics.median(values), 3),
                                           "cpu_ms": round(statistics.median(cpu[(name, shape)]), 3),
                                           "min_ms": round(min(fastest[(name, shape)]), 3),
                                           "round_medians_ms": [round(v, 3) for v in values]}
    for name in out:
        for shape in out[name]:
            out[name][shape][f"x_vs_{base}"] = round(out[base][shape]["median_ms"] / out[name][shape]["median_ms"], 3)
            out[name][shape][f"cpu_x_vs_{base}"] = round(out[base][shape]["cpu_ms"] / out[name][shape]["cpu_ms"], 3)
            out[name][shape][f"min_x_vs_{base}"] = round(out[base][shape]["min_ms"] / out[name][shape]["min_ms"], 3)
    return out


def fc_chain(activation: str, layers: int = 12, hidden: int = 384, inner: int = 1536):
    """An ov.Model of ``2 * layers`` FullyConnected layers (hidden -> inner -> hidden, bias, ReLU between) whose
    inputs are: 'float' (no FakeQuantize), 'u8-zp' (UINT8 with zero point 128, as an asymmetric range gives),
    'u8-zp0' (UINT8 zero point 0) or 's8' (symmetric INT8); weights INT8 per channel where quantized."""
    import openvino as ov
    import openvino.opset13 as op

    rng = np.random.default_rng(0)
    ranges = {"u8-zp": (-4.0, 4.0, 256), "u8-zp0": (0.0, 8.0, 256), "s8": (-4.0, 4.0, 255)}
    x = op.parameter([-1, -1, hidden], np.float32, name="x")
    h = x
    for _ in range(layers):
        for a, b in ((hidden, inner), (inner, hidden)):
            w = rng.standard_normal((b, a)).astype(np.float32) * 0.05
            bias = op.constant(rng.standard_normal(b).astype(np.float32) * 0.1)
            if activation == "float":
                h = op.add(op.matmul(h, op.constant(w), False, True), bias)
            else:
                lo, hi = (op.constant(np.float32(v)) for v in ranges[activation][:2])
                fq = op.fake_quantize(h, lo, hi, lo, hi, ranges[activation][2])
                scale = np.abs(w).max(1, keepdims=True) / 127
                weight = op.multiply(op.convert(op.constant(np.round(w / scale).astype(np.int8)), np.float32),
                                     op.constant(scale.astype(np.float32)))
                h = op.add(op.matmul(fq, weight, False, True), bias)
            if b == inner:
                h = op.relu(h)
    return ov.Model([h], [x])


def fc_chain_bench(tokens: int, threads: int, rounds: int, precision: str | None) -> dict:
    """The FullyConnected kernels alone: ``fc_chain`` per activation form, interleaved rounds of 15 runs, the
    median of the round minima; the runtime precision of the FullyConnected nodes."""
    import openvino as ov

    core = ov.Core()
    x = np.random.default_rng(1).standard_normal((1, tokens, 384)).astype(np.float32)
    requests, out = {}, {}
    for form in ("float", "u8-zp", "u8-zp0", "s8"):
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(fc_chain(form), "CPU", config)
        from tqc.compiler.io.openvino_ir import runtime_precisions
        out[form] = {"fully_connected": runtime_precisions(compiled).get("FullyConnected", {}), "ms": []}
        requests[form] = compiled.create_infer_request()
        for _ in range(3):
            requests[form].infer({0: x})
    for _ in range(rounds):
        for form, request in requests.items():
            times = []
            for _ in range(15):
                t0 = time.perf_counter()
                request.infer({0: x})
                times.append((time.perf_counter() - t0) * 1e3)
            out[form]["ms"].append(min(times))
    for form in out:
        out[form]["median_of_minima_ms"] = round(statistics.median(out[form].pop("ms")), 3)
        out[form]["x_vs_float"] = round(out["float"]["median_of_minima_ms"] / out[form]["median_of_minima_ms"], 3)
    return out


def machine() -> dict:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
           if f" {f}" in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/tqc_bench_openvino_profile")
    parser.add_argument("--sentences", default=str(SENTENCES))
    parser.add_argument("--calib-sentences", type=int, default=200)
    parser.add_argument("--eval-sentences", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1x128,8x128")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cell-s", type=float, default=0.5, help="seconds per variant and shape in a round")
    parser.add_argument("--profile-runs", type=int, default=60)
    parser.add_argument("--variants", default="fp32,fp32-fused,tqc-int8,tqc-int8-f32,tqc-int8-attn,tqc-int8-old,"
                                              "nncf-int8")
    parser.add_argument("--precision", default=None, help="INFERENCE_PRECISION_HINT for every variant "
                                                           "(default: OpenVINO's own choice)")
    parser.add_argument("--fc-chain", type=int, default=0, metavar="TOKENS",
                        help="only the FullyConnected kernels: 24 layers (384 <-> 1536) on TOKENS tokens per input "
                             "form (float, UINT8 with and without zero point, INT8), --threads threads")
    parser.add_argument("--reuse", action="store_true", help="keep the models a previous run left in --workdir")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import openvino as ov

    if args.fc_chain:
        result = {"machine": machine(), "threads": args.threads, "openvino": ov.get_version(),
                  "tokens": args.fc_chain, "precision_hint": args.precision,
                  "fc_chain": fc_chain_bench(args.fc_chain, args.threads, args.rounds, args.precision)}
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sentences = [s.strip() for s in Path(args.sentences).read_text().splitlines() if s.strip()]
    calib, held_out = sentences[:args.calib_sentences], sentences[-args.eval_sentences:]
    assert not set(calib) & set(held_out)
    calib_txt = work / "calib.txt"
    calib_txt.write_text("\n".join(calib) + "\n")
    fp32 = work / "minilm.onnx"
    if not fp32.exists():
        subprocess.run([sys.executable, "-m", "tqc", "-q", "export", "minilm", "-o", str(fp32)], check=True)
    wanted = args.variants.split(",")
    paths: dict[str, tuple[Path, str | None, bool]] = {}
    compile_s: dict[str, float] = {}
    builds = {"fp32-fused": ("fold,fuse", None), "tqc-int8": ("fold,fuse,qdq", None),
              "tqc-int8-attn": ("fold,fuse,qdq{attention=true}", None),
              "tqc-int8-attn-sep": ("fold,fuse,qdq{attention=true}", "sep"), "tqc-int8-old": ("fold,fuse,qdq", "old"),
              "tqc-int8-nofold": ("fold,fuse,qdq", "nofold"), "tqc-int8-packed": ("fold,fuse,qdq", "packed"),
              "tqc-int8-round1": ("fold,fuse,qdq", "round1")}
    for name in wanted:
        pinning = not name.endswith("-nopin")
        base = name.removesuffix("-nopin")
        hint = "f32" if base.endswith("-f32") else args.precision
        base = base.removesuffix("-f32")
        if base == "fp32":
            paths[name] = (fp32, hint, pinning)
            continue
        out = work / f"{base}.xml"
        if base not in compile_s and not (args.reuse and out.exists()):
            log(f"compile {base}")
            compile_s[base] = nncf_compile(fp32, out, calib_txt, len(calib)) if base == "nncf-int8" else \
                tqc_compile(fp32, out, builds[base][0], calib_txt, len(calib), facts=builds[base][1])
        paths[name] = (out, hint, pinning)

    from tqc.compiler.io.openvino_ir import (inference_precision, int8_matmuls, matmul_placement, placement_summary,
                                             runtime_precisions)
    core = ov.Core()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results: dict = {"machine": machine(), "threads": args.threads, "openvino": ov.get_version(),
                     "calib_sentences": len(calib), "eval_sentences": len(held_out), "compile_s": compile_s,
                     "variants": {}}
    requests, feeds, profiled = {}, {}, {}
    tok = tokenizer()
    import onnxruntime as ort

    from bench_openvino import embed, Engine  # noqa: E402  (ORT FP32 reference embeddings)
    reference_engine = Engine(fp32, "ort", args.threads)
    eval_feeds = [encode(tok, held_out[i:i + 32], reference_engine.names) for i in range(0, len(held_out), 32)]
    reference = embed(reference_engine, eval_feeds)
    del reference_engine
    for name, (path, hint, pinning) in paths.items():
        log(f"{name}: runtime model, profile, fidelity")
        compiled = compile_variant(core, path, args.threads, hint, pinning=pinning)
        model = core.read_model(str(path))
        placement = matmul_placement(compiled, model)
        integer, total = int8_matmuls(placement)
        names = [p.get_any_name() for p in compiled.inputs]
        row = {"path": str(path), "precision_hint": inference_precision(compiled), "cpu_pinning": pinning,
               "int8_matmuls": f"{integer}/{total}", "matmul_runtime_nodes": placement_summary(placement),
               "runtime_precisions": runtime_precisions(compiled), "profile": {}}
        for batch, seq in shapes:  # a compiled model per shape: its counters are its own
            profiled[(name, f"{batch}x{seq}")] = (compile_variant(core, path, args.threads, hint, profiling=True,
                                                                  pinning=pinning).create_infer_request(),
                                                  token_feed(batch, seq, names))
        request = compiled.create_infer_request()
        port = compiled.outputs[0]

        class Run:  # the Engine interface embed() reads
            run = staticmethod(lambda feed: request.infer({k: feed[k] for k in names})[port])
        row["fidelity"] = fidelity(reference, embed(Run, eval_feeds))
        requests[name] = (request, compiled)
        feeds[name] = {f"{b}x{s}": token_feed(b, s, names) for b, s in shapes}
        results["variants"][name] = row
        log(f"  {row['int8_matmuls']} {row['matmul_runtime_nodes']} {row['fidelity']}")
    log(f"profiles: {args.profile_runs} interleaved rounds")
    for (name, shape), counters in interleaved_profiles(profiled, args.profile_runs).items():
        results["variants"][name]["profile"][shape] = counters
    profiled.clear()
    log(f"latency: {args.rounds} interleaved rounds, {args.threads} threads")
    latency = timing_rounds(requests, feeds, args.rounds, args.cell_s, wanted[0])
    for name in results["variants"]:
        results["variants"][name]["latency"] = latency[name]
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["onnxruntime"] = ort.__version__
    print_tables(results, wanted[0])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def print_tables(results: dict, base: str) -> None:
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {' '.join(m['isa'])}; OpenVINO {results['openvino']}, "
          f"{results['threads']} threads, latency hint; load {m['load_average_at_start'][0]:.1f} -> "
          f"{m['load_average_at_end'][0]:.1f}")
    variants = results["variants"]
    shapes = list(next(iter(variants.values()))["latency"])
    print(f"\n{'variant':<20} {'hint':<5} {'int8 MatMuls':<13} " + " ".join(f"{s + ' ms (x)':>18}" for s in shapes) +
          f" {'mean cos':>9} {'min cos':>8} {'NN':>6}  CPU-time x   fastest-run x")
    for name, row in variants.items():
        cells = " ".join(f"{row['latency'][s]['median_ms']:>10.2f} ({row['latency'][s][f'x_vs_{base}']:.2f}x)"
                         for s in shapes)
        f = row["fidelity"]
        print(f"{name:<20} {row['precision_hint']:<5} {row['int8_matmuls']:<13} {cells} {f['mean_cosine']:>9.5f} "
              f"{f['min_cosine']:>8.4f} {f['nn_agreement']:>6.3f}  " +
              " ".join(f"{row['latency'][s][f'cpu_x_vs_{base}']:.2f}x" for s in shapes) + "  " +
              " ".join(f"{row['latency'][s][f'min_x_vs_{base}']:.2f}x" for s in shapes))
    for shape in shapes:
        print(f"\nper-node time at {shape} (OpenVINO's counters, mean of the interleaved profiled runs, ms; share of "
              "the summed node time)")
        for name, row in variants.items():
            p = row["profile"][shape]
            top = ", ".join(f"{k} x{v['nodes']} {v['ms']:.2f} ({100 * v['share']:.0f}%)"
                            for k, v in list(p["kernels"].items())[:6])
            print(f"  {name:<20} total {p['total_ms']:7.2f}  MatMul work {100 * p['matmul_work_share']:3.0f}%  "
                  f"reorders {p['reorders']:3d}  {top}")


if __name__ == "__main__":
    main()
