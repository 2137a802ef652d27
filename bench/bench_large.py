#!/usr/bin/env python3
"""Compile time and peak memory from MiniLM to base to large (issue #10 item 11).

Models (random weights from transformers configs, except MiniLM's real ones):
  minilm              all-MiniLM-L6-v2 (packaged)                          22.7 M parameters
  bert-base           12 layers, hidden 768                                 110 M
  bert-large          24 layers, hidden 1024, 16 heads, intermediate 4096   335 M
  xlm-roberta-large   as bert-large with a 250,002-token vocabulary         560 M (2.2 GB: external data)

Phases, each in its own process (``tqc`` CLI), measured with ``os.wait4`` on that child (wall time and the
child's own peak RSS, ``ru_maxrss``, and CPU time, which a busy shared machine inflates less than wall time):
  export     tqc export SOURCE -o model.onnx (legacy exporter, sdpa attention)
  qdq        tqc compile model.onnx -p fold,fuse,qdq --target ort-cpu --calib calib.npz (first 32 sentences of
             the project's sentence file, tokenized with the MiniLM tokenizer, max length 128)
  fp16       tqc compile model.onnx -p fold,fuse,fp16 --target ort-cuda
Growth: every figure divided by MiniLM's (and by the parameter ratio), so "time per parameter" shows whether
compile cost grows linearly. Big files live in --workdir and are deleted after each model.

    .venv/bin/python bench/bench_large.py                      # all four; bench/results/large.{json,log}
    .venv/bin/python bench/bench_large.py --models minilm,bert-base
    # fp16 before/after a change, in the same run: an older tqc tree (a folder holding a ``tqc`` package,
    # e.g. ``git archive REV`` laid out as the editable install maps it) runs as phase fp16_before
    .venv/bin/python bench/bench_large.py --models bert-base --phases fp16 --before /tmp/old_tqc --append
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SENTENCE_FILES = [REPO.parent / "shared" / "data" / "sentences.txt", Path("/work/shared/data/sentences.txt")]
CALIB_SENTENCES = 32

LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
CONFIGS = {
    "bert-base": dict(model_type="bert", vocab_size=30522),
    "bert-large": dict(model_type="bert", vocab_size=30522, **LARGE),
    "xlm-roberta-large": dict(model_type="xlm-roberta", vocab_size=250002, max_position_embeddings=514,
                              type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              layer_norm_eps=1e-5, **LARGE),
}
LOG_LINES: list[str] = []


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    LOG_LINES.append(line)
    print(line, file=sys.stderr, flush=True)


def tqc_command() -> list[str]:
    return [sys.executable, "-c", "import sys; from tqc.compiler.cli.main import main; sys.exit(main())"]


MAX_RSS_GIB = 9.0  # the machine is shared: a phase that grows past this is stopped and reported


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(args: list[str], name: str, pythonpath: str | None = None) -> dict:
    """Runs one phase in its own process; wall time and that child's peak RSS (os.wait4's rusage).

    A watchdog stops the child when its RSS passes MAX_RSS_GIB (reported as 'stopped at ... GiB')."""
    log(f"{name}: tqc {' '.join(args)}")
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as output_file:
        proc = subprocess.Popen(tqc_command() + args, stdout=output_file, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                     **({"PYTHONPATH": pythonpath} if pythonpath else {})})
        stopped = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if rss_bytes(proc.pid) > MAX_RSS_GIB * 2**30:
                proc.kill()
                stopped = True
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        output_file.seek(0)
        output = output_file.read()
    wall = time.perf_counter() - start
    tail = output.strip().splitlines()[-6:]
    LOG_LINES.extend("    | " + line for line in tail)
    result = {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "rc": proc.returncode}
    if stopped:
        result["error"] = f"stopped by the benchmark's watchdog: RSS passed {MAX_RSS_GIB} GiB (--max-rss-gib)"
    elif proc.returncode != 0:
        result["error"] = tail[-1] if tail else f"exit {proc.returncode}"
    log(f"  -> {result}")
    return result


def sentences() -> list[str]:
    for path in SENTENCE_FILES:
        if path.exists():
            return [s.strip() for s in path.read_text().splitlines() if s.strip()][:CALIB_SENTENCES]
    raise SystemExit("no sentence file (../shared/data/sentences.txt)")


def calib_npz(path: Path, input_names: list[str]) -> Path:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from tqc.compiler.io.packaged import packaged_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    encoded = tokenizer(sentences(), padding=True, truncation=True, max_length=128, return_tensors="np")
    np.savez(path, **{name: encoded[name].astype(np.int64) for name in input_names})
    return path


def model_inputs(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


PHASES = {"qdq": ("fold,fuse,qdq", "ort-cpu"), "fp16": ("fold,fuse,fp16", "ort-cuda")}


def bench_model(name: str, workdir: Path, keep: bool, phases: tuple[str, ...] = ("qdq", "fp16"),
                before: str | None = None) -> dict:
    model_dir = workdir / name
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    if name == "minilm":
        source, params = "minilm", None
    else:
        from transformers import AutoConfig

        values = dict(CONFIGS[name])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.save_pretrained(str(model_dir / "config"))
        source = str(model_dir / "config" / "config.json")
    onnx_path = model_dir / "model.onnx"
    row: dict = {"model": name}
    row["export"] = run_child(["export", source, "-o", str(onnx_path), "--exporter", "legacy"], f"{name} export")
    if row["export"]["rc"] != 0:
        return row
    row["onnx_bytes"] = files_size(onnx_path)
    row["onnx_files"] = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    params = parameter_count(onnx_path)
    row["parameters"] = params
    calib = calib_npz(model_dir / "calib.npz", model_inputs(onnx_path))
    runs = [(phase, phase, None) for phase in phases]
    if before:  # the older tree's run of each phase goes first
        runs = [run for phase in phases for run in ((f"{phase}_before", phase, before), (phase, phase, None))]
    for phase, kind, pythonpath in runs:
        pipeline, target = PHASES[kind]
        out = model_dir / f"model.{phase}.onnx"
        report = model_dir / f"report.{phase}.json"
        args = ["compile", str(onnx_path), "-p", pipeline, "--target", target, "-o", str(out), "--report", str(report)]
        if kind == "qdq":
            args += ["--calib", str(calib)]
        row[phase] = run_child(args, f"{name} {phase}" + (f" (PYTHONPATH={pythonpath})" if pythonpath else ""),
                               pythonpath)
        if row[phase]["rc"] == 0:
            row[phase]["output_bytes"] = files_size(out)
            row[phase]["output_files"] = sorted(p.name for p in model_dir.glob(out.name + "*"))
            with open(report) as handle:
                stages = json.load(handle).get("stages", [])
            for stage in stages:
                stats = stage.get("stats", {})
                if stage.get("pass") == "fuse":
                    row[phase]["attention"] = stats.get("attention_summary")
                row[phase].setdefault("stage_s", {})[stage.get("pass")] = stage.get("seconds", stage.get("time_s"))
        for stale in model_dir.glob(out.name + "*"):
            stale.unlink()
    if not keep:
        shutil.rmtree(model_dir, ignore_errors=True)
    return row


def parameter_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count
    return total


def table(rows: list[dict]) -> str:
    anchor = next((r for r in rows if r["model"] == "minilm" and "parameters" in r), None)
    header = ["model", "run", "params M", "onnx MB", "phase", "wall s", "cpu s", "peak RSS MiB", "cpu x", "RSS x",
              "params x", "attention"]
    lines = []
    for row in rows:
        for phase in ("export", "qdq", "qdq_before", "fp16_before", "fp16"):
            result = row.get(phase)
            if not result:
                continue
            values = [row["model"], (lambda run: run[11:16] if "T" in run else run)(str(row.get("invocation", ""))), f"{row.get('parameters', 0) / 1e6:.0f}",
                      f"{row.get('onnx_bytes', 0) / 2**20:.0f}", phase]
            if result.get("rc"):
                values += ["FAILED", "", "", "", "", "", result.get("error", "")[:80]]
            else:
                ratio = anchor and anchor.get(phase) and not anchor[phase].get("rc")
                values += [f"{result['wall_s']:.1f}", f"{result['cpu_s']:.1f}", f"{result['peak_rss_mib']:.0f}",
                           f"{result['cpu_s'] / anchor[phase]['cpu_s']:.1f}" if ratio else "",
                           f"{result['peak_rss_mib'] / anchor[phase]['peak_rss_mib']:.1f}" if ratio else "",
                           f"{row['parameters'] / anchor['parameters']:.1f}" if anchor else "",
                           str(result.get("attention", ""))]
            lines.append(values)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join(out) + ("\n(x: ratio to MiniLM measured in the same run; cpu s = the child's user+system "
                              "time, steadier than wall time on a shared machine; run: the invocation's UTC time; "
                              "fp16_before: the tree given with --before, run just before fp16)")


def main() -> None:
    global MAX_RSS_GIB
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert-base,bert-large,xlm-roberta-large")
    parser.add_argument("--workdir", default="/tmp/bench_large")
    parser.add_argument("--keep", action="store_true", help="keep the exported and compiled models")
    parser.add_argument("--append", action="store_true",
                        help="add these models' rows to an existing --json (a later invocation; recorded per row)")
    parser.add_argument("--max-rss-gib", type=float, default=MAX_RSS_GIB,
                        help="stop a phase whose RSS passes this (shared machine)")
    parser.add_argument("--phases", default="qdq,fp16", help="compile phases after the export (qdq, fp16)")
    parser.add_argument("--before", help="a folder holding an older tqc package: its run of each phase is "
                                         "recorded as PHASE_before, just before the current tree's")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "large.json"))
    parser.add_argument("--log", default=str(REPO / "bench" / "results" / "large.log"))
    args = parser.parse_args()
    MAX_RSS_GIB = args.max_rss_gib
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    results = {"max_rss_gib": MAX_RSS_GIB, "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
               "calibration": f"first {CALIB_SENTENCES} sentences of ../shared/data/sentences.txt, MiniLM tokenizer",
               "rows": rows}
    invocation = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.append and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        for row in previous.get("rows", []):
            row.setdefault("invocation", previous.get("invocation", "first"))
        partial = set(args.phases.split(",")) != set(PHASES)  # a partial rerun keeps the earlier rows too
        rows.extend(r for r in previous.get("rows", []) if partial or r["model"] not in args.models.split(","))
        results["previous_invocations"] = previous.get("invocations", [previous.get("invocation", "first")])
        if Path(args.log).exists():  # the previous invocation's progress lines (its table follows a blank line)
            LOG_LINES.extend(Path(args.log).read_text().split("\n\n", 1)[0].splitlines())
        LOG_LINES.append(f"--- later invocation {invocation} (--append): {args.models}")
    results["invocation"] = invocation

    def save() -> None:
        text = table(rows)
        for path, content in ((args.json, json.dumps(results, indent=1) + "\n"),
                              (args.log, "\n".join(LOG_LINES) + "\n\n" + text + "\n")):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(path) + ".tmp")
            tmp.write_text(content)
            tmp.replace(path)

    for name in args.models.split(","):
        row = bench_model(name, workdir, args.keep, tuple(args.phases.split(",")), args.before)
        row["invocation"] = invocation
        row["max_rss_gib"] = MAX_RSS_GIB
        rows.append(row)
        save()
    print(table(rows))
    save()


if __name__ == "__main__":
    main()
