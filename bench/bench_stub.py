"""The host side of ``tqc serve``'s text model, on CPU: the stub's ``execute`` (TEXT decode, tokenizer, token
tensors, length groups, response building) with the runtime left out, this checkout's stub against an earlier
one (``--base``, default the commit before the tokenizer-path change), interleaved per round.

Both stubs run through ``compiler/tools/serve/stub_harness.py`` (the stub's own code; Triton's side stood in),
with the packaged MiniLM's tokenizer and a runner that returns zeros of the pooled output's shape, so what is
timed is what the stub adds around the model. Texts: real held-out sentences (../shared/data/sentences.txt, else
the shipped 64) cut to exactly 16 and 128 tokens, and the sentences as they are.

    python bench/bench_stub.py [--rounds 7] [--rows 1,8,64] [--json out.json]
    python bench/bench_stub.py --procs 4 ...   # four stubs at once, as --instances 4: rows/s of all

rayon's pool (``encode_batch``) reads RAYON_NUM_THREADS / TOKENIZERS_PARALLELISM once per process. In one
process the bench runs in the environment it is given; with ``--procs N`` each stub runs in the environment
the server gives it: before, none (rayon takes every core in each process), after, ``tokenizer_env(N)``
(``compiler/tools/serve/repository.py``: the cores divided among the instances).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import held_out_sentences, texts_of_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = "19af4bd"  # main before the tokenizer path of session 7
TOKENIZER_VARS = ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")


class NullRunner:
    """Stands for the runtime: zeros of the pooled output's shape, after checking the feed's shapes agree."""

    def __init__(self, conf):
        self.bucketed = bool(conf.get("cuda_graph"))
        self.output = conf["output"]
        self.describe = "no runtime (zeros)"

    def run(self, feed):
        shapes = {value.shape for value in feed.values()}
        assert len(shapes) == 1, shapes
        return {self.output: np.zeros((next(iter(shapes))[0], 384), dtype=np.float32)}


def stub_conf(folder: Path, bucketed: bool, tokenizer: Path | None = None) -> dict:
    """The text model's serve.json as ``tqc serve`` writes it, for the packaged MiniLM's tokenizer (or ``tokenizer``)."""
    from tqc.compiler.io.packaged import packaged_tokenizer
    from tqc.compiler.tools.serve.repository import CHARS_PER_TOKEN, save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(tokenizer or packaged_tokenizer("minilm"), folder / "tokenizer.json")
    limit = 256 if not bucketed else 128
    return {"kind": "text", "provider": "cpu", "onnx": "-", "sitedirs": [], "cuda_graph": bucketed,
            "inputs": [{"name": n} for n in ("input_ids", "attention_mask", "token_type_ids")],
            "cut_chars": CHARS_PER_TOKEN * limit if tok["cut_at_space"] else 0,
            "max_length": limit, "max_batch": 64, "max_padding": 1.0 if bucketed else 0.5,
            "tokenizer": "tokenizer.json", "pad_id": tok["pad_id"], "pad_token": tok["pad_token"],
            "output": "sentence_embedding", "run_outputs": ["sentence_embedding"], "pooling": "graph",
            "normalize": True, "text_output": "embeddings", "max_text_bytes": 65536, "long_text": "truncate"}


def load(folder: Path, source: str | None, bucketed: bool, tokenizer: Path | None = None, **changes):
    from tqc.compiler.tools.serve.stub_harness import load_stub

    conf = dict(stub_conf(folder, bucketed, tokenizer), **changes)
    if source is None:  # this checkout's stub records its own steps (tqc serve --timings)
        conf["timings"] = str(folder / "m_text.timings.json")
    module = load_stub(folder, conf, source)
    module.RUNNERS = {"cpu": NullRunner}
    module.check_numpy = lambda: None  # the stub bridge's numpy 1 need: no bridge in this process
    model = module.TritonPythonModel()
    model.initialize({})
    return model


def old_source(base: str) -> str:
    return subprocess.run(["git", "show", f"{base}:compiler/tools/serve/stub_model.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def cases(rows_list: list[int], tokenizer_dir: Path) -> dict[str, list[str]]:
    pool = held_out_sentences()
    sets = {"16": texts_of_tokens(str(tokenizer_dir), 16, pool), "128": texts_of_tokens(str(tokenizer_dir), 128, pool),
            "real": pool[:256]}
    return {f"{rows}x{tokens}": sets[tokens] for tokens in sets for rows in rows_list}


def time_execute(model, texts: list[str], rows: int, repeat: int) -> list[float]:
    from tqc.compiler.tools.serve.stub_harness import text_request

    requests = [text_request([texts[(i * rows + r) % len(texts)] for r in range(rows)]) for i in range(repeat)]
    times = []
    for request in requests:
        start = time.perf_counter()
        model.execute([request])
        times.append(time.perf_counter() - start)
    return times


def worker(args) -> tuple[float, float]:
    """One process of ``--procs``: rows per second of one stub over ``seconds`` and rows per second of CPU time
    (all its threads: the pool's spinning and switching count, which a machine of its own would spend on other
    instances; a shared machine gives more threads more of its cores), in the environment that the
    server gives that stub (before: none of the tokenizer's; after: ``tokenizer_env``), set before the first
    call starts rayon's pool."""
    which, folder, source, bucketed, texts, rows, seconds, env = args
    for key in TOKENIZER_VARS:
        os.environ.pop(key, None)
    os.environ.update(env)
    model = load(Path(folder), source, bucketed)
    time_execute(model, texts, rows, 5)
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        time_execute(model, texts, rows, 5)
        done += 5 * rows
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def answers_agree(models: dict, texts: list[str]) -> None:
    """Both stubs give the runner the same token tensors: compared through a recording runner."""
    seen = {}
    for which, model in models.items():
        fed = []
        runner = model.runner
        original = runner.run
        runner.run = lambda feed, fed=fed, original=original: (fed.append(feed), original(feed))[1]
        from tqc.compiler.tools.serve.stub_harness import answer, text_request

        got = answer(model.execute([text_request(texts)])[0])
        runner.run = original
        seen[which] = (fed, got["token_count"])
    (fed_a, counts_a), (fed_b, counts_b) = seen.values()
    assert np.array_equal(counts_a, counts_b), "token counts differ"
    assert len(fed_a) == len(fed_b)
    for a, b in zip(fed_a, fed_b):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "token tensors differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=BASE, help="The commit whose stub is 'before'.")
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=0, help="execute calls per cell and round (default: by rows)")
    parser.add_argument("--bucketed", default="off,on", help="off: CPU feed; on: CUDA-graph buckets.")
    parser.add_argument("--procs", type=int, default=1, help="Stubs at once (as --instances N): rows/s of all.")
    parser.add_argument("--seconds", type=float, default=3.0, help="--procs: seconds per cell and round.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",") if r]
    env = {k: os.environ.get(k) for k in TOKENIZER_VARS}
    from tqc.compiler.tools.serve.repository import tokenizer_env

    proc_env = {"before": {}, "after": tokenizer_env(args.procs)}  # what the server sets for each stub
    if args.procs > 1:
        env = {"before": "rayon's default (all cores per process)", "after": proc_env["after"]}
    work = Path(tempfile.mkdtemp(prefix="bench-stub-"))
    sources = {"before": old_source(args.base), "after": None}
    results: dict[tuple, list[float]] = {}
    steps: dict[str, dict] = {}
    for bucketed in [b == "on" for b in args.bucketed.split(",") if b]:
        tag = "bucketed" if bucketed else "cpu"
        folders = {which: work / f"{which}-{tag}" for which in sources}
        models = {which: load(folders[which], source, bucketed) for which, source in sources.items()}
        all_cases = cases(rows_list, folders["after"])
        for name, texts in all_cases.items():
            answers_agree(models, texts[:int(name.split("x")[0])])
        print(f"{tag}: both stubs feed the runtime the same tensors on every case", file=sys.stderr, flush=True)
        for round_index in range(args.rounds):
            for name, texts in all_cases.items():
                rows = int(name.split("x")[0])
                order = list(sources) if round_index % 2 == 0 else list(reversed(sources))
                for which in order:
                    if args.procs > 1:
                        with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
                            rates = pool.map(worker, [(which, str(work / f"p{i}-{which}-{tag}"), sources[which],
                                                       bucketed, texts, rows, args.seconds, proc_env[which])
                                                      for i in range(args.procs)])
                        value = sum(rate for rate, _ in rates)
                        results.setdefault((tag, name, which, "cpu"), []).append(
                            float(np.mean([per_cpu for _, per_cpu in rates])))
                    else:
                        repeat = args.repeat or max(10, 400 // rows)
                        value = float(np.median(time_execute(models[which], texts, rows, repeat))) * 1000
                    results.setdefault((tag, name, which), []).append(value)
            print(f"round {round_index} {tag} done", file=sys.stderr, flush=True)
        models["after"].finalize()
        steps[tag] = json.loads(Path(models["after"].conf["timings"]).read_text())
    unit = "rows/s of all processes" if args.procs > 1 else "ms per execute, p50"
    print(f"\nstub execute without the runtime ({unit}), median of {args.rounds} rounds; env {env}; "
          f"{args.procs} process(es); before = {args.base}")
    print(f"{'path':<9} {'rows x tokens':<14} {'before':>9} {'after':>9} {'after/before':>12}")
    table = []
    for (tag, name, which, *cpu), values in results.items():
        if which != "after" or cpu:
            continue
        before = float(np.median(results[(tag, name, "before")]))
        after = float(np.median(values))
        ratio = after / before
        table.append({"path": tag, "case": name, "before": before, "after": after, "ratio": ratio,
                      "rounds_before": results[(tag, name, "before")], "rounds_after": values})
        line = f"{tag:<9} {name:<14} {before:>9.3f} {after:>9.3f} {ratio:>11.2f}x"
        if (tag, name, "after", "cpu") in results:
            per_cpu = {w: float(np.median(results[(tag, name, w, "cpu")])) for w in ("before", "after")}
            table[-1]["rows_per_cpu_second"] = per_cpu
            line += (f"   rows per CPU-second {per_cpu['before']:.0f} -> {per_cpu['after']:.0f} "
                     f"({per_cpu['after'] / per_cpu['before']:.2f}x)")
        print(line)
    if args.procs == 1:
        print("\nthis checkout's stub, its own split (ms per execute, means over every round; 'runtime' is the "
              "zeros runner): the texts of exactly 16 and 128 tokens")
        names = ("tokenize", "runtime", "pool", "calls", "decode", "respond", "execute")
        for tag, shapes in steps.items():
            for shape, v in sorted(shapes.items(), key=lambda kv: (int(kv[0].split("x")[1]), int(kv[0].split("x")[0]))):
                if shape.split("x")[1] in ("16", "128") and v[3] >= 10:
                    print(f"  {tag:<9} {shape:<7} " + ", ".join(f"{name} {v[i] / v[3] * 1000:.4f}"
                                                                 for i, name in enumerate(names) if i != 3))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}, "env": env,
                   "args": vars(args), "unit": unit, "table": table, "after_steps_seconds_summed": steps}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    main()
