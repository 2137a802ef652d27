#!/usr/bin/env python3
"""Which activation ranges a range method changes, and what each change costs alone (MiniLM, ort-cpu).

Compiles ``fold,fuse,qdq`` (max) and ``fold,fuse,qdq{method=M}`` on the same calibration sentences. The two
graphs differ only in the activation scales and zero points (same structure, same INT8 weights), so each
site's range can be switched alone from max to M in the max graph; the table gives per site the max range,
M's range, the share of the range M keeps, and the held-out mean cosine / NN agreement with that site alone
switched (and with all of them).

    python bench/bench_range_sites.py --method mse
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import SENTENCES  # noqa: E402
from bench_qdq import embed, encode, fidelity, log, tokenizer_for  # noqa: E402


def embed_model(model: onnx.ModelProto, feeds: list[dict], threads: int) -> np.ndarray:
    return embed(model.SerializeToString(), feeds, threads)


def activation_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """tag -> (scale, zero point) of every scalar UINT8 activation quantization."""
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for name, t in inits.items():
        if name.endswith("_zero_point") and t.data_type == onnx.TensorProto.UINT8:
            tag = name[: -len("_zero_point")]
            scale = inits.get(f"{tag}_scale")
            if scale is not None:
                found[tag] = (float(numpy_helper.to_array(scale)), int(numpy_helper.to_array(t)))
    return found


def with_ranges(model: onnx.ModelProto, ranges: dict[str, tuple[float, int]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        for tag, (scale, zp) in ranges.items():
            if t.name == f"{tag}_scale":
                t.CopyFrom(numpy_helper.from_array(np.array(scale, np.float32), t.name))
            elif t.name == f"{tag}_zero_point":
                t.CopyFrom(numpy_helper.from_array(np.array(zp, np.uint8), t.name))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_work_accuracy")
    parser.add_argument("--method", default="mse", help="qdq options of the candidate, e.g. 'method=mse'")
    parser.add_argument("--base", default="", help="qdq options of the baseline (default: none, i.e. max)")
    parser.add_argument("--calib-sentences", type=int, default=200)
    parser.add_argument("--eval-sentences", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tqc

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    calib, held_out = sentences[: args.calib_sentences], sentences[-args.eval_sentences:]
    fp32 = work / "minilm-fp32.onnx"
    if not fp32.exists():
        tqc.export("minilm", fp32)
    feeds = [encode(tokenizer_for("minilm"), held_out[i:i + 100], ["input_ids", "attention_mask", "token_type_ids"])
             for i in range(0, len(held_out), 100)]
    reference = embed_model(onnx.load(str(fp32)), feeds, args.threads)

    def build(options: str) -> onnx.ModelProto:
        qdq = f"qdq{{{options}}}" if options else "qdq"
        log(f"compile fold,fuse,{qdq}")
        return tqc.compile(fp32, f"fold,fuse,{qdq}", target="ort-cpu", calib=calib, calib_samples=len(calib),
                           verify="structure").model

    base, cand = build(args.base), build(args.method)
    base_r, cand_r = activation_ranges(base), activation_ranges(cand)
    if set(base_r) != set(cand_r):
        sys.exit("the two graphs quantize different tensors; cannot switch sites one by one")
    print(f"base {args.base or 'max'}: {fidelity(reference, embed_model(base, feeds, args.threads))}")
    print(f"all sites {args.method}: {fidelity(reference, embed_model(cand, feeds, args.threads))}")
    print("| site | base range | candidate range | kept | mean cos alone | NN alone |\n|---|---|---|---|---|---|")
    for tag in sorted(base_r, key=lambda t: list(base_r).index(t)):
        (bs, bz), (cs, cz) = base_r[tag], cand_r[tag]
        if (bs, bz) == (cs, cz):
            continue
        lo_b, hi_b, lo_c, hi_c = -bz * bs, (255 - bz) * bs, -cz * cs, (255 - cz) * cs
        f = fidelity(reference, embed_model(with_ranges(base, {tag: (cs, cz)}), feeds, args.threads))
        print(f"| {tag[-60:]} | [{lo_b:.3g}, {hi_b:.3g}] | [{lo_c:.3g}, {hi_c:.3g}] | "
              f"{(hi_c - lo_c) / (hi_b - lo_b):.3f} | {f['mean_cosine']:.5f} | {100 * f['nn_agreement']:.1f}% |",
              flush=True)


if __name__ == "__main__":
    main()
