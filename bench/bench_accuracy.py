#!/usr/bin/env python3
"""INT8 fidelity of tqc's range methods on the real all-MiniLM-L6-v2 (ORT CPU): a first version of issue 21's
accuracy benchmark.

Calibrates on the first --calib-sentences of ../shared/data/sentences.txt and judges on the last --eval-sentences
(no overlap), or, with ``--eval-groups G``, the last G x --eval-sentences in G disjoint groups (NN agreement is
measured within each group, so the task stays that of --eval-sentences sentences; the table gives the mean over
groups and their spread, min-max): mean and min cosine of the token-pooled sentence embedding (over the tokens the
attention mask keeps) to FP32, and nearest-neighbour agreement (each sentence keeps, among the evaluation set, the
nearest neighbour it has in FP32). Rows: the default (``max``, SmoothQuant 0.75, shift and bias correction), the
placement before those two, every range method, SmoothQuant variants, and the refinements (bias correction, the
shift, GPTQ rounding, SmoothQuant's alpha per layer), each alone and on the default. Every row compiles
``fold,fuse,qdq{...}`` with ``verify=structure`` so a variant that would fail qdq's own numeric check (output
cosine < 0.98 on the calibration data) still gets a number; the table says which would have failed. ``--targets
ort-cpu,trt,openvino`` repeats every row per target (trt's Q/DQ graph judged on ORT CPU; the OpenVINO IR on
OpenVINO CPU).

    python bench/bench_accuracy.py --json bench/results/accuracy_cpu.json
    python bench/bench_accuracy.py --eval-groups 4 --targets trt --row "shifted=qdq{shift=true}"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qdq import embed, encode, fidelity, log, tokenizer_for  # noqa: E402  (the shared helpers)

REPO = Path(__file__).resolve().parents[1]
# The project's 3,000 real sentences live beside the checkout (../shared); a worktree sits one level deeper.
SENTENCES = next((p / "shared" / "data" / "sentences.txt" for p in REPO.parents
                  if (p / "shared" / "data" / "sentences.txt").is_file()), REPO.parent / "shared" / "data" / "sentences.txt")
ROWS = {  # row -> the qdq item of the pipeline (the default: max ranges, SmoothQuant 0.75, shift, bias correction)
    "default": "qdq",
    "before shift and bias correction": "qdq{shift=false,bias_correct=false}",
    "percentile 99.99": "qdq{method=percentile}",
    "percentile 99.999": "qdq{method=percentile,percentile=99.999}",
    "entropy": "qdq{method=entropy}",
    "mse": "qdq{method=mse}",
    "max smooth=0.5": "qdq{smooth=0.5}",
    "max smooth=0": "qdq{smooth=0}",
    "mse smooth=0": "qdq{method=mse,smooth=0}",
    "percentile smooth=0": "qdq{method=percentile,smooth=0}",
    # The refinements that keep every INT8 MatMul (constants only; the shift adds an Add per layer), each alone
    # against the plain placement, then on top of the default
    "bias correction alone": "qdq{shift=false,bias_correct=true}",
    "shift alone": "qdq{shift=true,bias_correct=false}",
    "gptq rounding alone": "qdq{shift=false,bias_correct=false,rounding=gptq}",
    "alpha per layer alone": "qdq{shift=false,bias_correct=false,smooth_search=true}",
    "default + gptq": "qdq{rounding=gptq}",
    "default + alpha per layer": "qdq{smooth_search=true}",
    "all": "qdq{smooth_search=true,rounding=gptq}",
    # SmoothQuant's range cap (smoothed channel ranges capped at their 99th percentile, per layer where it lowers
    # the layer's output error), alone on the default and with the other constant-only refinements
    "cap 0.99": "qdq{smooth_cap=0.99}",
    "cap 0.99 + gptq": "qdq{smooth_cap=0.99,rounding=gptq}",
    "cap 0.99 + alpha per layer": "qdq{smooth_cap=0.99,smooth_search=true}",
    # The outlier channel split (the [CLS] channels that own a layer's range run in a float MatMul beside the
    # INT8 one): on by default on trt and, for the FFN output layers (recomputed), openvino and ort-cpu
    "split": "qdq{split=true}",
    "before the split": "qdq{split=false}",
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def grouped_fidelity(reference: np.ndarray, candidate: np.ndarray, group: int) -> dict:
    """``fidelity`` over every group of ``group`` consecutive sentences: cosines over all of them, NN agreement
    the mean over groups (each group its own neighbour search), with every group's value."""
    parts = [fidelity(reference[i:i + group], candidate[i:i + group]) for i in range(0, len(reference), group)]
    whole = fidelity(reference, candidate) if len(parts) > 1 else parts[0]
    nn = [p["nn_agreement"] for p in parts]
    return {"mean_cosine": whole["mean_cosine"], "min_cosine": whole["min_cosine"],
            "nn_agreement": round(float(np.mean(nn)), 4), "nn_groups": nn}


def row_item(item: str) -> tuple[str, str]:
    """``--row NAME=QDQ`` split where the qdq item starts, so a name may hold '=' ('split=auto all=qdq{...}')."""
    at = item.rfind("=qdq")
    if at <= 0:
        sys.exit(f"bench_accuracy: --row {item!r}: expected NAME=qdq{{...}}")
    return item[:at], item[at + 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_work_accuracy")
    parser.add_argument("--calib-sentences", type=int, default=200)
    parser.add_argument("--eval-sentences", type=int, default=600)
    parser.add_argument("--eval-groups", type=int, default=1, help="judge on this many disjoint groups of "
                        "--eval-sentences (the last ones of the file); NN agreement within each group")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=QDQ",
                        help="an extra row: its name and the qdq item, e.g. 'shifted=qdq{shift=true}' (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all, or none with --row)")
    parser.add_argument("--targets", default="ort-cpu", help="comma-separated: ort-cpu, trt (judged on ORT CPU: "
                        "its Q/DQ graph), openvino (the IR run on OpenVINO CPU, FP32 hint)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "accuracy_cpu.json"))
    args = parser.parse_args()
    if not SENTENCES.is_file():
        sys.exit(f"bench_accuracy: {SENTENCES} is absent: this benchmark needs the project's 3,000 real sentences "
                 "(one per line) there")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tqc

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib = sentences[: args.calib_sentences]
    held_out = sentences[-args.eval_sentences * args.eval_groups:]
    if set(calib) & set(held_out):
        sys.exit("bench_accuracy: calibration and evaluation sentences overlap; use fewer of each")
    fp32 = work / "minilm-fp32.onnx"
    if not fp32.exists():
        log("export minilm")
        tqc.export("minilm", fp32)
    tokenizer = tokenizer_for("minilm")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    feeds = [encode(tokenizer, held_out[i:i + 100], names) for i in range(0, len(held_out), 100)]
    cached = work / f"reference-{len(calib)}-{len(held_out)}.npy"
    if cached.exists():
        reference = np.load(cached)
    else:
        reference = embed(fp32, feeds, args.threads)
        np.save(cached, reference)
    extra = dict(row_item(item) for item in args.row)
    rows = []
    for target in args.targets.split(","):
        named = args.rows.split(",") if args.rows else ([] if extra else list(ROWS))
        for row in named + list(extra):
            qdq = extra.get(row) or ROWS[row]
            start = time.perf_counter()
            result = tqc.compile(fp32, f"fold,fuse,{qdq}", target=target, calib=calib,
                                 calib_samples=len(calib), verify="structure")
            seconds = time.perf_counter() - start
            path = work / ("candidate.xml" if target == "openvino" else "candidate.onnx")
            result.save(path)
            if target == "openvino":
                from bench_openvino import Engine, embed as embed_engine

                candidate = embed_engine(Engine(path, "openvino", args.threads), feeds)
            else:
                candidate = embed(path, feeds, args.threads)
            numbers = grouped_fidelity(reference, candidate, args.eval_sentences)
            rows.append({"target": target, "row": row, "pipeline": f"fold,fuse,{qdq}", **numbers,
                         "compile_s": round(seconds, 1)})
            log(f"{target} {row}: {numbers}")
    print(f"\nMiniLM (real weights), calibrated on {len(calib)} sentences, judged on {len(held_out)}; "
          f"{cpu_name()}, {args.threads} threads\n")
    print("| target | variant | qdq | mean cos | min cos | NN agreement (groups: min-max) | compile s |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        spread = f" ({100 * min(r['nn_groups']):.1f}-{100 * max(r['nn_groups']):.1f})" if len(r["nn_groups"]) > 1 else ""
        print(f"| {r['target']} | {r['row']} | `{r['pipeline'].split(',', 2)[2]}` | {r['mean_cosine']:.4f} | "
              f"{r['min_cosine']:.4f} | {100 * r['nn_agreement']:.1f}%{spread} | {r['compile_s']} |")
    out = {"cpu": cpu_name(), "threads": args.threads, "model": "all-MiniLM-L6-v2 (tqc export minilm)",
           "targets": args.targets.split(","), "calib_sentences": len(calib), "eval_sentences": len(held_out),
           "eval_groups": args.eval_groups, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
