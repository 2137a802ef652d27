#!/usr/bin/env python3
"""Attention fusion on graphs tqc did not make ("bring your own model"): tqc vs ORT vs onnxscript.

Every graph is measured by every optimizer in the same run:

  tqc fuse --target trt       standard ONNX that TensorRT fuses (fused count: the pass's own stats)
  tqc fuse --target ort-cpu   com.microsoft Attention (fused count: Attention/MultiHeadAttention ops)
  ort-opt                     onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
                              num_heads, hidden_size given)
  onnxscript                  onnxscript.rewriter.ort_fusions.optimize_for_ort

"fused N/M": M is the number of attention blocks in the original graph (its Softmax count), N the attention
ops in the result (tqc trt: the blocks the pass reports rewritten). "diff": the largest absolute difference of
any output against the original graph, both run on ONNX Runtime CPU with graph optimizations off, on the
graph's own inputs (real sentences for the committed fixtures and user exports, random ids with padding for
tqc's tiny exports). tqc's fusion must be exact (<= 1e-4) or not applied.

Graphs:
  optimum / st     the committed fixtures in tests/fixtures/byom/ (optimum-cli, SentenceTransformer backend)
  tqc-export       tqc export {bert,roberta,distilbert}-tiny, attention eager/sdpa, exporter legacy/dynamo
  user             tests/fixtures/byom/user_exports.py: plain torch.onnx.export, ids/mask, custom outputs,
                   pooling or task heads inside, both exporters

    .venv/bin/python bench/bench_byom.py                       # everything; table + bench/results/byom.*
    .venv/bin/python bench/bench_byom.py --sources optimum,st   # committed fixtures only (fast)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXACT = 1e-4
ATTENTION_OPS = ("Attention", "MultiHeadAttention")
LOG_LINES: list[str] = []


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    LOG_LINES.append(line)
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- graphs

def committed_graphs(kind: str) -> list[dict]:
    from tests.fixtures.byom import FIXTURES, attention_shape, feeds, onnx_path

    graphs = []
    for record in FIXTURES:
        is_st = record["tool"].startswith("SentenceTransformer") or "sentence_transformers" in record["tool"]
        if (kind == "st") != is_st:
            continue
        heads, hidden = attention_shape(record)
        graphs.append({"source": kind, "name": record["name"], "family": record["family"], "task": record["task"],
                       "exporter": f"{record['tool'].split('(')[0].split(' --')[0]} (opset {record['opset']})",
                       "path": onnx_path(record), "feeds": feeds(record), "num_heads": heads, "hidden_size": hidden})
    return graphs


def tqc_exports(workdir: Path, families: list[str]) -> list[dict]:
    from tqc.models.export import ExportSpec, export
    from tqc.models.recipes import find_recipe

    graphs = []
    for family in families:
        recipe = find_recipe(family)
        config = recipe.config("tiny")
        heads = int(getattr(config, "num_attention_heads", getattr(config, "n_heads", 0)))
        hidden = int(getattr(config, "hidden_size", getattr(config, "dim", 0)))
        for exporter in ("legacy", "dynamo"):
            for attn in ("eager", "sdpa"):
                name = f"tqc-{family}-tiny-{exporter}-{attn}"
                path = workdir / "tqc" / f"{name}.onnx"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    log(f"tqc export {family}-tiny --exporter {exporter} --attn {attn}")
                    try:
                        with quiet():
                            export(ExportSpec(f"{family}-tiny", exporter=exporter, attn=attn), path)
                    except Exception as exc:  # an export that fails is reported, not fatal
                        log(f"  export failed: {type(exc).__name__}: {exc}")
                        continue
                graphs.append({"source": "tqc-export", "name": name, "family": family, "task": "feature-extraction",
                               "exporter": f"{exporter}/{attn}", "path": path,
                               "feeds": synthetic_feeds(recipe.inputs, int(config.vocab_size)),
                               "num_heads": heads, "hidden_size": hidden})
    return graphs


def user_graphs(workdir: Path, families: list[str]) -> list[dict]:
    from tests.fixtures.byom import user_exports

    graphs = []
    for case in user_exports.standard_cases():
        if case["family"] not in families:
            continue
        log(f"user export {case}")
        try:
            with quiet():
                made = user_exports.export_user_model(workdir / "user", **case, reuse=True)
        except Exception as exc:
            log(f"  export failed: {type(exc).__name__}: {exc}")
            continue
        graphs.append({"source": "user", "name": made.name, "family": made.family, "task": made.head,
                       "exporter": f"{made.exporter}/{made.attn}", "path": made.path, "feeds": made.feeds,
                       "num_heads": made.num_heads, "hidden_size": made.hidden_size})
    return graphs


def synthetic_feeds(names, vocab: int, batch: int = 2, seq: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 4:] = 0
    values = {"input_ids": rng.integers(5, vocab, size=(batch, seq)).astype(np.int64), "attention_mask": mask,
              "token_type_ids": np.zeros((batch, seq), np.int64)}
    return {n: values[n] for n in names}


# ---------------------------------------------------------------- measuring

@contextlib.contextmanager
def quiet():
    """Optimizers print progress and warnings; keep the table readable (their output goes to the log)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield
    text = buffer.getvalue().strip()
    if text:
        LOG_LINES.extend("    | " + line for line in text.splitlines()[-20:])


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def max_diff(reference: dict[str, np.ndarray], path: Path, feeds: dict[str, np.ndarray]) -> float:
    candidate = run_ort(path, feeds)
    missing = set(reference) - set(candidate)
    if missing:
        raise ValueError(f"outputs lost: {sorted(missing)}")
    return max(float(np.max(np.abs(candidate[k].astype(np.float64) - v))) for k, v in reference.items())


def count_ops(path: Path) -> tuple[int, int]:
    """(attention ops, Softmax nodes left outside them)"""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    for function in model.functions:
        nodes.extend(function.node)
    return (sum(1 for n in nodes if n.op_type in ATTENTION_OPS), sum(1 for n in nodes if n.op_type == "Softmax"))


def measure_tqc(graph: dict, out: Path, target: str, reference: dict) -> dict:
    from tqc.compiler.tools.compile import CompileOptions, compile_model

    start = time.perf_counter()
    with quiet():
        report = compile_model(CompileOptions(model=str(graph["path"]), pipeline="fuse", output=str(out),
                                              target=target, verify="structure"))
    elapsed = time.perf_counter() - start
    stage = next(s for s in report["stages"] if s["pass"] == "fuse")
    stats = stage.get("stats", {})
    ops, _ = count_ops(out)
    fused = int(stats.get("attention", ops)) if target == "trt" else ops
    return {"fused": fused, "stats_attention": stats.get("attention"), "attention_ops": ops,
            "rules": stats.get("attention_rules"), "embed_layernorm": stats.get("embed_layernorm"),
            "diff": max_diff(reference, out, graph["feeds"]), "seconds": round(elapsed, 2)}


def measure_ort(graph: dict, out: Path, reference: dict) -> dict:
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    with quiet():
        model = optimizer.optimize_model(str(graph["path"]), model_type="bert", num_heads=graph["num_heads"],
                                         hidden_size=graph["hidden_size"])
        model.save_model_to_file(str(out))
    elapsed = time.perf_counter() - start
    ops, _ = count_ops(out)
    return {"fused": ops, "diff": max_diff(reference, out, graph["feeds"]), "seconds": round(elapsed, 2)}


def measure_onnxscript(graph: dict, out: Path, reference: dict) -> dict:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    start = time.perf_counter()
    with quiet():
        model = ir.load(str(graph["path"]))
        model, counts = optimize_for_ort(model)
        ir.save(model, str(out))
    elapsed = time.perf_counter() - start
    ops, _ = count_ops(out)
    return {"fused": ops, "fusions": {k: v for k, v in counts.items() if v},
            "diff": max_diff(reference, out, graph["feeds"]), "seconds": round(elapsed, 2)}


TOOLS = {
    "tqc-trt": lambda g, out, ref: measure_tqc(g, out, "trt", ref),
    "tqc-ort-cpu": lambda g, out, ref: measure_tqc(g, out, "ort-cpu", ref),
    "ort-opt": measure_ort,
    "onnxscript": measure_onnxscript,
}


def measure(graph: dict, workdir: Path) -> dict:
    import onnx

    model = onnx.load(str(graph["path"]), load_external_data=False)
    blocks = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    row = {k: (str(v) if isinstance(v, Path) else v) for k, v in graph.items() if k != "feeds"}
    row["path"] = str(Path(graph["path"]).relative_to(REPO)) if str(graph["path"]).startswith(str(REPO)) \
        else str(graph["path"])
    row["inputs"] = [i.name for i in model.graph.input]
    row["outputs"] = [o.name for o in model.graph.output]
    row["blocks"] = blocks
    reference = run_ort(Path(graph["path"]), graph["feeds"])
    out_dir = workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    for tool, fn in TOOLS.items():
        out = out_dir / f"{graph['name']}.{tool}.onnx"
        for stale in (out, out.with_name(out.name + ".data")):
            stale.unlink(missing_ok=True)
        try:
            row[tool] = fn(graph, out, reference)
        except Exception as exc:  # one tool failing on one graph is a result, not a crash
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            row[tool] = {"error": message}
            LOG_LINES.extend("    | " + line for line in traceback.format_exc().splitlines()[-6:])
        result = row[tool]
        log(f"  {graph['name']:<46} {tool:<12} " + (f"fused {result['fused']}/{blocks} diff {result['diff']:.1e}"
                                                   if "error" not in result else result["error"]))
    return row


# ---------------------------------------------------------------- report

def cell(result: dict, blocks: int, with_diff: bool) -> str:
    if "error" in result:
        return "error"
    text = f"{result['fused']}/{blocks}"
    if with_diff:
        diff = result["diff"]
        text += " exact" if diff <= EXACT else f" DIFF {diff:.0e}"
    return text


def table(rows: list[dict]) -> str:
    header = ["source", "graph", "exporter", "blocks", "tqc trt", "tqc ort-cpu", "ort-opt", "onnxscript"]
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["source"], row["name"], row["exporter"], "-", "original fails", "", "", ""])
            continue
        lines.append([row["source"], row["name"], row["exporter"], str(row["blocks"]),
                      cell(row["tqc-trt"], row["blocks"], True), cell(row["tqc-ort-cpu"], row["blocks"], True),
                      cell(row["ort-opt"], row["blocks"], True), cell(row["onnxscript"], row["blocks"], True)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Per source and tool: graphs with every block fused (and, for tqc, exact)."""
    lines = ["", "graphs fully fused (all blocks; 'exact' = max abs diff <= 1e-4 vs the original on ORT CPU):"]
    for source in sorted({r["source"] for r in rows}):
        chosen = [r for r in rows if r["source"] == source and "error" not in r]
        parts = []
        for tool in TOOLS:
            done = [r for r in chosen if "error" not in r[tool] and r[tool]["fused"] == r["blocks"] > 0]
            exact = [r for r in done if r[tool]["diff"] <= EXACT]
            errors = sum(1 for r in chosen if "error" in r[tool])
            parts.append(f"{tool} {len(done)}/{len(chosen)} ({len(exact)} exact" +
                         (f", {errors} errors)" if errors else ")"))
        lines.append(f"  {source:<11} " + "; ".join(parts))
    return "\n".join(lines)


def environment() -> dict:
    from importlib.metadata import version

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for name in ("onnxruntime", "onnxscript", "onnx", "torch", "transformers", "tqc"):
        try:
            env[name] = version(name)
        except Exception:
            pass
    with contextlib.suppress(Exception):
        import subprocess

        env["tqc_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default="optimum,st,tqc-export,user")
    parser.add_argument("--families", default="bert,roberta,distilbert",
                        help="families for tqc's and the user exports (the fixtures are all measured)")
    parser.add_argument("--workdir", default="/tmp/bench_byom")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "byom.json"))
    parser.add_argument("--log", default=str(REPO / "bench" / "results" / "byom.log"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sources = args.sources.split(",")
    families = args.families.split(",")
    start = time.perf_counter()
    graphs: list[dict] = []
    for source in sources:
        if source in ("optimum", "st"):
            graphs += committed_graphs(source)
        elif source == "tqc-export":
            graphs += tqc_exports(workdir, families)
        elif source == "user":
            graphs += user_graphs(workdir, families)
        else:
            raise SystemExit(f"unknown source {source}")
    log(f"{len(graphs)} graphs")
    rows = []
    for graph in graphs:
        try:
            rows.append(measure(graph, workdir))
        except Exception as exc:  # the original itself does not load or run: reported, not fatal
            log(f"  {graph['name']}: original graph fails on ORT CPU: {type(exc).__name__}: {str(exc)[:200]}")
            rows.append({"source": graph["source"], "name": graph["name"], "family": graph["family"],
                         "task": graph["task"], "exporter": graph["exporter"], "path": str(graph["path"]),
                         "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"})
    text = table(rows) + "\n" + summary(rows)
    print(text)
    results = {"env": environment(), "seconds": round(time.perf_counter() - start, 1), "exact_tolerance": EXACT,
               "tools": {"tqc-trt": "tqc compile -p fuse --target trt", "tqc-ort-cpu": "tqc compile -p fuse "
                         "--target ort-cpu", "ort-opt": "onnxruntime.transformers.optimizer.optimize_model("
                         "model_type='bert', num_heads, hidden_size)", "onnxscript":
                         "onnxscript.rewriter.ort_fusions.optimize_for_ort"},
               "rows": rows}
    for path, content in ((args.json, json.dumps(results, indent=1) + "\n"),
                          (args.log, "\n".join(LOG_LINES) + "\n\n" + text + "\n")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)


if __name__ == "__main__":
    main()
