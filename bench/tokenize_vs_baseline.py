"""The tokenizer step at batch 1, ``tqc serve``'s stub against the hand-written baseline's call, on the CPU.

``bench/serve_vs_baseline.py`` sends three texts (11, 16 and 128 tokens after truncation at 128; the long one is
887 characters, 158 tokens whole). This times, per text, each step that turns those bytes into the token tensors
the runtime gets, in one process, the paths interleaved call by call, each call after ``--idle-ms`` without
work (a request at batch 1 comes after the client's round trip; back to back, caches and the tokenizer's thread
pool stay warm):

    tqc        decode (the stub's TEXT check and UTF-8 decode), encode (the stub's ``_encode``: the one-text
               pick of load time, a long text's head first (``cut_chars``), printable ASCII without the
               BertNormalizer, by its words' cached ids (``wordpiece_words``)), tensors (``_tokenize``: the
               CUDA-graph bucket), as ``tqc serve --provider cuda --cuda-graph --max-length 128`` runs them
               (the same text again and again: its words are cached after the first call)
    tqc-rust   the same stub without the cached words (``ascii_tokenizer``: the tokenizer without its
               BertNormalizer), as before session 12
    tqc-off    the same stub with none of them (``cut_chars`` 0, no ``ascii_tokenizer``)
    tqc-base   the stub of ``--base`` (default: main before session 8's changes), its own steps
    baseline   its ``execute``: bytes decode, ``AutoTokenizer(texts, padding=True, truncation=True,
               max_length=128, return_tensors="np")``, ``astype(np.int64)`` per input

Both give the runtime the same token tensors (checked first; the bucket's padding aside).

    python bench/tokenize_vs_baseline.py [--rounds 5] [--calls 200] [--idle-ms 1] [--base COMMIT] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stub import load, old_source  # noqa: E402
from serve_vs_baseline import S11, S128, text_of_tokens  # noqa: E402

STEPS = ("decode", "encode", "tensors")
BASE = "e1ee411"  # main before session 8's tokenizer changes


def stub_steps(model, request) -> tuple[dict, dict]:
    times = {}
    start = time.perf_counter()
    texts = model._texts(request)
    decoded = time.perf_counter()
    encodings = model._encode(texts) if hasattr(model, "_encode") else (  # an older stub: its own calls
        model.encode_one(texts[0]) if len(texts) == 1 else model.encode_batch(texts))
    encoded = time.perf_counter()
    feed, _, lengths = model._tokenize(encodings)
    done = time.perf_counter()
    times.update(decode=decoded - start, encode=encoded - decoded, tensors=done - encoded)
    return times, {name: value[:, :int(lengths.max())] for name, value in feed.items()}


def baseline_steps(tokenizer, raw: np.ndarray) -> tuple[dict, dict]:
    start = time.perf_counter()
    texts = [bytes(row.astype(np.uint8)).decode("utf-8") for row in raw]
    decoded = time.perf_counter()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    encoded = time.perf_counter()
    feed = {k: v.astype(np.int64) for k, v in enc.items()}
    done = time.perf_counter()
    return {"decode": decoded - start, "encode": encoded - decoded, "tensors": done - encoded}, feed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="calls per path, text and round")
    parser.add_argument("--idle-ms", type=float, default=1.0, help="idle time before each call (0: back to back)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: the packaged MiniLM's)")
    parser.add_argument("--base", default=BASE, help="the commit whose stub is tqc-base ('': none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from tqc.compiler.io.packaged import packaged_tokenizer
    from tqc.compiler.tools.serve.stub_harness import text_request

    folder = args.tokenizer or packaged_tokenizer("minilm")
    work = Path(tempfile.mkdtemp(prefix="tok-vs-baseline-"))
    stubs = {"tqc": load(work / "tqc", None, True, folder), "tqc-rust": load(work / "rust", None, True, folder),
             "tqc-off": load(work / "off", None, True, folder, cut_chars=0)}
    stubs["tqc-rust"].wordpiece_words = stubs["tqc-off"].wordpiece_words = stubs["tqc-off"].ascii_tokenizer = None
    if args.base:
        try:
            stubs["tqc-base"] = load(work / "base", old_source(args.base), True, folder)
        except (OSError, subprocess.CalledProcessError) as exc:  # no git history here (a copied checkout)
            print(f"note: no tqc-base: cannot read the stub of {args.base}: {exc}", file=sys.stderr)
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    texts = {"11 tokens": S11, "16 tokens": text_of_tokens(Path(folder), 16), "128 tokens": S128}
    requests = {label: text_request([text]) for label, text in texts.items()}
    for label, request in requests.items():  # the same tensors reach the runtime
        expected = baseline_steps(hf, request.tensors["TEXT"])[1]
        for name, model in stubs.items():
            got = stub_steps(model, request)[1]
            for key, value in expected.items():
                assert np.array_equal(got[key], value), (name, label, key)
    print(f"same token tensors on every text; one text by {stubs['tqc'].single_encode} (picked at load); "
          f"cut_chars {stubs['tqc'].cut_chars}; ASCII path {stubs['tqc'].ascii_tokenizer is not None}; "
          f"cached words {getattr(stubs['tqc'], 'wordpiece_words', None) is not None}",
          file=sys.stderr, flush=True)
    paths = list(stubs) + ["baseline"]
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for label, request in requests.items():
            samples = {path: {step: [] for step in STEPS} for path in paths}
            order = paths if round_index % 2 == 0 else list(reversed(paths))
            for _ in range(args.calls):
                for path in order:
                    time.sleep(args.idle_ms / 1000)
                    steps = (baseline_steps(hf, request.tensors["TEXT"]) if path == "baseline"
                             else stub_steps(stubs[path], request))[0]
                    for step, seconds in steps.items():
                        samples[path][step].append(seconds)
            for path in paths:
                totals = [sum(parts) for parts in zip(*samples[path].values())]
                results.setdefault((path, label), []).append(
                    {**{step: statistics.median(v) * 1e3 for step, v in samples[path].items()},
                     "total": statistics.median(totals) * 1e3})
        print(f"round {round_index} done", file=sys.stderr, flush=True)
    print(f"\nbatch-1 tokenizer step, ms (p50 per round, median of {args.rounds} rounds; {args.calls} calls each, "
          f"{args.idle_ms} ms idle before each; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"{'text':<11} {'path':<10} " + " ".join(f"{s:>8}" for s in (*STEPS, "total")))
    table = []
    for label in texts:
        for path in paths:
            rounds = results[(path, label)]
            med = {key: statistics.median(r[key] for r in rounds) for key in (*STEPS, "total")}
            table.append({"text": label, "path": path, **med, "rounds": rounds})
            print(f"{label:<11} {path:<10} " + " ".join(f"{med[key]:>8.4f}" for key in (*STEPS, "total")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "texts": texts,
                                   "single_encode": stubs["tqc"].single_encode, "cpus": os.cpu_count(),
                                   "load_average": os.getloadavg(), "table": table}, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
