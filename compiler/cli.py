"""The ``tqc`` command line (click).

Every user mistake (missing or corrupt model, bad pipeline, unwritable output, bad data) prints one line
``tqc: error: ...`` on stderr and exits with code 2; ``--debug`` shows the traceback instead. Inputs are never
modified and outputs are written atomically, so a failed command leaves nothing behind.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from tqc import __version__
from tqc.compiler.errors import USER_ERROR_EXIT_CODE, TqcError, VerificationError

TARGET_CHOICES = ("trt", "ort-cpu", "ort-cuda")


class Ui:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.start = time.perf_counter()

    def progress(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:6.1f}s] {message}", err=True)


def _ui() -> Ui:
    ctx = click.get_current_context()
    return ctx.find_root().obj or Ui()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tqc")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """tqc: compile transformer encoders (ONNX) to fast, verified FP16/INT8 deployments."""
    ctx.obj = Ui(quiet=quiet)
    _quiet_onnxruntime()


def _quiet_onnxruntime() -> None:
    """ORT's own warnings (graph-optimizer notes while folding) would drown tqc's progress lines."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


@cli.command("export")
@click.argument("source")
@click.option("-o", "--output", required=True, help="ONNX file to write.")
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True,
              help="torch's TorchScript-based (legacy) or torch.export-based (dynamo) ONNX exporter.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="sdpa", show_default=True,
              help="transformers attention implementation at export (sdpa is transformers' default).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17 legacy, 18 dynamo).")
@click.option("--size", type=click.Choice(["base", "tiny"]), default=None,
              help="For family names: published base size or a tiny test config.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification", "token-classification",
                                           "question-answering", "fill-mask", "sentence-embedding"]), default=None,
              help="Head to export (default: the architecture config.json names; sentence-transformers folders: "
                   "sentence-embedding; else feature-extraction).")
def export_cmd(source: str, output: str, exporter: str, attn: str, opset: int | None, size: str | None,
               seed: int, task: str | None) -> None:
    """Export SOURCE to FP32 ONNX: 'minilm' (packaged, real weights), a family name (bert, roberta,
    distilbert, albert, electra, xlm-roberta, camembert; random weights), a config.json, or a local model
    folder (its head kept). Nothing is downloaded."""
    from tqc.compiler.model_io import check_output_path
    from tqc.models.export import ExportSpec, export

    check_output_path(output)
    ui = _ui()
    info = export(ExportSpec(source, exporter=exporter, attn=attn, opset=opset, size=size, seed=seed, task=task),
                  output, progress=ui.progress)
    click.echo(f"exported {info['source']} -> {info['output']} ({info['exporter']} exporter, {info['attn']} "
               f"attention, opset {info['opset']}, {info['nodes']} nodes, inputs {', '.join(info['inputs'])}, "
               f"outputs {', '.join(info['outputs'])})")
    for note in info["notes"]:
        click.echo(f"  note: {note}")


@cli.command("compile")
@click.argument("model")
@click.option("-p", "--pipeline", "pipeline_text", required=True,
              help="Passes, e.g. 'fold,fuse,qdq{method=percentile,percentile=99.99}'.")
@click.option("-o", "--output", required=True, help="Output .onnx, or .plan for a TensorRT engine.")
@click.option("--target", type=click.Choice(TARGET_CHOICES), default="trt", show_default=True,
              help="Deployment target that passes consult.")
@click.option("--verify", type=click.Choice(["none", "structure", "numeric"]), default="numeric",
              show_default=True, help="Check after every pass: numeric compares outputs before/after on small "
                                      "inputs within the model's limits; structure only checks the graph.")
@click.option("--dump-dir", type=click.Path(file_okay=False), default=None,
              help="Write every stage, its report, inputs and outputs here.")
@click.option("--report", "report_path", default=None, help="Write the compile report (JSON) here.")
@click.option("--explain", multiple=True, metavar="PASS",
              help="Have PASS say why candidates did not match (e.g. --explain fuse).")
@click.option("--calib", default=None, metavar="DATA",
              help="Calibration data: .npz, polygraphy inputs .json, sentences .txt, or script.py:function.")
@click.option("--calib-table", default=None, metavar="TABLE", help="A calibration table from 'tqc calibrate'.")
@click.option("--tokenizer", default=None, help="Tokenizer folder for .txt data (default: the model's own).")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="Calibration samples to use.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration batch size.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Token limit for .txt data.")
@click.option("--shapes", multiple=True, help="TensorRT profiles for .plan outputs: input_ids:1x16,8x128,32x512.")
@click.option("--input-map", default=None, metavar="MAP",
              help="Which data feeds which model input when the graph cannot tell: ids=input_ids,mask=attention_mask "
                   "(model input = tokenizer output, or array name).")
def compile_cmd(model: str, pipeline_text: str, output: str, target: str, verify: str, dump_dir: str | None,
                report_path: str | None, explain: tuple[str, ...], calib: str | None, calib_table: str | None,
                tokenizer: str | None, calib_samples: int, batch_size: int, max_length: int,
                shapes: tuple[str, ...], input_map: str | None) -> None:
    """Run a pipeline of passes on MODEL and write the result."""
    from tqc.compiler.compile import CompileOptions, compile_model

    opts = CompileOptions(model=model, pipeline=pipeline_text, output=output, target=target, verify=verify,
                          dump_dir=dump_dir, report=report_path, explain=explain, calib=calib,
                          calib_table=calib_table, tokenizer=tokenizer, calib_samples=calib_samples,
                          batch_size=batch_size, max_length=max_length, shapes=shapes, input_map=input_map)
    report = compile_model(opts, progress=_ui().progress)
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    lines = [f"{report['input']['path']} -> {report['output']['path']}  (target {report['target']}, "
             f"verify {report['verify']})"]
    lines.append(f"  {'#':>2}  {'pass':<24} {'time':>8} {'verify':>8}  stats   (verify: max |diff|, or cosine for INT8, vs the stage before)")
    for stage in report["stages"]:
        verify = stage["verify"]
        status = "-"
        if "numeric" in verify:
            numeric = verify["numeric"]
            worst = max((float(o["max_abs"]) for o in numeric["outputs"].values()), default=0.0)
            lowest = min((float(o["cosine"]) for o in numeric["outputs"].values()), default=1.0)
            status = ("FAIL" if not numeric["passed"] else f"cos {lowest:.4f}" if "min_cosine" in numeric else
                      "exact" if worst == 0 else f"{worst:.1e}")
        elif verify.get("structure") == "ok":
            status = "ok"
        stats = ", ".join(f"{k}={v}" for k, v in stage["stats"].items())
        lines.append(f"  {stage['index']:>2}  {stage['spec']:<24} {stage['seconds']:>7.2f}s {status:>8}  {stats}")
    lines.append(f"  nodes {report['input']['nodes']} -> {report['output']['nodes']}, "
                 f"total {report['total_seconds']:.2f}s")
    lines += [f"  note: {message}" for message in report.get("messages", [])]
    return "\n".join(lines)


@cli.command("calibrate")
@click.argument("model")
@click.option("--data", "data", required=True, help="Calibration data: .npz, polygraphy .json, .txt, script.py:fn.")
@click.option("-o", "--output", required=True, help="Calibration table (JSON) to write.")
@click.option("--tokenizer", default=None, help="Tokenizer folder for .txt data (default: the model's own).")
@click.option("--samples", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--input-map", default=None, metavar="MAP",
              help="Which data feeds which model input when the graph cannot tell: ids=input_ids,mask=attention_mask "
                   "(model input = tokenizer output, or array name).")
def calibrate_cmd(model: str, data: str, output: str, tokenizer: str | None, samples: int, batch_size: int,
                  max_length: int, input_map: str | None) -> None:
    """Stream activation statistics of MODEL over DATA into a reusable calibration table."""
    from tqc.compiler.calib_data import DataSpec, FeedSource, parse_input_map
    from tqc.compiler.calibration import calibrate, calibration_targets
    from tqc.compiler.graph_io import to_graph
    from tqc.compiler.model_io import check_output_path, load_model_lean
    from tqc.compiler.verify import infer_shapes

    out = check_output_path(output, inputs=(model,))
    lean = load_model_lean(model)  # weights read once; the graph runs without being exported
    skeleton = infer_shapes(lean.skeleton, strict=False)
    graph = to_graph(skeleton, lean.weights)
    source = FeedSource(DataSpec(data, tokenizer=tokenizer, samples=samples, batch_size=batch_size,
                                 max_length=max_length, input_map=parse_input_map(input_map)), skeleton)
    table = calibrate(graph, source, calibration_targets(skeleton), progress=_ui().progress)
    table.save(out)
    click.echo(f"calibrated {len(table.tensors)} tensors on {table.samples} samples in {table.seconds:.2f}s -> {out}")


@cli.command("check")
@click.argument("model")
@click.option("--target", type=click.Choice(["trt"]), default="trt", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def check_cmd(model: str, target: str, as_json: bool) -> None:
    """Static TensorRT readiness check: ops, Q/DQ rules, dynamic shapes, INT8 MHA eligibility."""
    from tqc.compiler.model_io import load_model
    from tqc.compiler.trt_check import check_trt, format_check

    report = check_trt(load_model(model, load_external_data=False))
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_check(report, model))
    if not report.ok:
        sys.exit(1)


@cli.command("build")
@click.argument("model")
@click.option("-o", "--output", required=True, help="TensorRT plan to write (.plan).")
@click.option("--shapes", multiple=True, help="Profiles: input_ids:1x16,8x128,32x512 (min,opt,max).")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="FP16 for graphs without Q/DQ.")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="Workspace pool, GiB.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimization level.")
@click.option("--timing-cache", default=None, help="Timing cache file (default ~/.cache/tqc/trt_timing.cache).")
def build_cmd(model: str, output: str, shapes: tuple[str, ...], fp16: bool, workspace: float, opt_level: int,
              timing_cache: str | None) -> None:
    """Build a TensorRT plan from an ONNX model (strongly typed for Q/DQ graphs)."""
    from tqc.compiler.model_io import check_input_path, check_output_path
    from tqc.compiler.trt import build_plan, require_tensorrt

    check_input_path(model)
    check_output_path(output, inputs=(model,))
    require_tensorrt()
    meta = build_plan(model, output, shapes=shapes, fp16=fp16, workspace_gib=workspace, opt_level=opt_level,
                      timing_cache=timing_cache, progress=_ui().progress)
    click.echo(f"built {output} ({meta['network']}, TensorRT {meta['tensorrt_version']}, {meta['build_seconds']}s)")


@cli.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "trt"]), default="cpu", show_default=True)
@click.option("--shapes", default="1x16,1x128,8x128", show_default=True, help="batch x sequence, comma-separated.")
@click.option("--lengths", type=click.Choice(["full", "uniform"]), default="full", show_default=True,
              help="Token lengths per row: all full, or uniform in [S/2, S] with right padding.")
@click.option("--runs", type=int, default=200, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--budget", type=float, default=5.0, show_default=True, help="Seconds per measurement at most.")
@click.option("--threads", type=int, default=None, help="ORT intra-op threads (CPU).")
@click.option("--cuda-graph", is_flag=True, help="ORT CUDA: capture and replay a CUDA graph.")
@click.option("--json", "json_path", default=None, help="Write the results here.")
def bench_cmd(models: tuple[str, ...], provider: str, shapes: str, lengths: str, runs: int, warmup: int,
              budget: float, threads: int | None, cuda_graph: bool, json_path: str | None) -> None:
    """Latency (median, p95, p99) and throughput of one or more models; a comparison table."""
    from tqc.compiler.benchmark import runner_for, time_callable, token_inputs
    from tqc.compiler.feeds import vocab_size
    from tqc.compiler.model_io import check_input_path, load_model, write_text_atomic

    ui = _ui()
    parsed = []
    for item in shapes.split(","):
        try:
            batch, seq = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise TqcError(f"--shapes: '{item}' is not BATCHxSEQUENCE") from None
        parsed.append((batch, seq))
    rows = []
    for model in models:
        check_input_path(model)
        vocab = 30000
        if model.endswith(".onnx"):
            onnx_model = load_model(model)
            vocab = vocab_size(onnx_model, "input_ids") or vocab
        runner = runner_for(model, provider, threads, cuda_graph)
        names = runner.input_names
        for position, (batch, seq) in enumerate(parsed):
            ui.progress(f"{model} {batch}x{seq} on {provider}" + (" (CUDA graph)" if cuda_graph else ""))
            if cuda_graph and position > 0:
                runner = runner_for(model, provider, threads, cuda_graph)  # a captured graph has fixed shapes
            feed = token_inputs(names, batch, seq, vocab, lengths)
            timing = time_callable(runner.prepare(feed), batch, runs, warmup, budget)
            rows.append({"model": model, "shape": f"{batch}x{seq}", "provider": provider, **timing.as_dict()})
    base = {r["shape"]: r["median_ms"] for r in rows if r["model"] == models[0]}
    click.echo(f"{'model':<40} {'shape':<8} {'median ms':>10} {'p95':>8} {'p99':>8} {'seq/s':>9}  vs first")
    for r in rows:
        ratio = base.get(r["shape"], r["median_ms"]) / r["median_ms"]
        click.echo(f"{r['model'][-40:]:<40} {r['shape']:<8} {r['median_ms']:>10.3f} {r['p95_ms']:>8.3f} "
                   f"{r['p99_ms']:>8.3f} {r['throughput']:>9.1f}  {ratio:.2f}x")
    if json_path:
        write_text_atomic(json.dumps({"provider": provider, "lengths": lengths, "rows": rows}, indent=2) + "\n",
                          json_path)


@cli.command("export-triton")
@click.argument("model")
@click.option("-o", "--output", "repo", required=True, help="Model repository folder.")
@click.option("--name", default=None, help="Model name in the repository (default: file stem).")
@click.option("--max-batch", type=int, default=32, show_default=True, help="0 disables batching.")
@click.option("--instances", type=int, default=1, show_default=True)
@click.option("--kind", type=click.Choice(["KIND_GPU", "KIND_CPU"]), default="KIND_GPU", show_default=True)
@click.option("--queue-delay-us", type=int, default=100, show_default=True, help="Dynamic batching queue delay.")
def export_triton_cmd(model: str, repo: str, name: str | None, max_batch: int, instances: int, kind: str,
                      queue_delay_us: int) -> None:
    """Write a Triton model repository (config.pbtxt + version folder) for an ONNX model or a plan."""
    from tqc.compiler.triton import export_triton

    info = export_triton(model, repo, name=name, max_batch=max_batch, instances=instances, kind=kind,
                         queue_delay_us=queue_delay_us)
    click.echo(f"wrote {info['model']} ({info['config']['platform']}, max_batch_size "
               f"{info['config']['max_batch_size']})")


@cli.command("diff")
@click.argument("reference")
@click.argument("candidates", nargs=-1, required=True)
@click.option("--data", default=None, help="Inputs: .npz, polygraphy .json, .txt sentences, script.py:fn "
                                           "(default: drawn from the model's signature).")
@click.option("--tokenizer", default=None, help="Tokenizer folder for .txt data.")
@click.option("--samples", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--layerwise", is_flag=True, help="Compare every tensor both graphs share by name.")
@click.option("--threshold", type=float, default=0.05, show_default=True,
              help="Relative L2 error that marks the first divergence (with --layerwise).")
@click.option("--json", "json_path", default=None, help="Write the comparison as JSON.")
@click.option("--plot", "plot_path", default=None, help="Draw per-tensor SQNR along the network (PNG).")
@click.option("--save-dir", default=None, help="Where polygraphy's inputs/outputs JSON go (default: a temp folder).")
@click.option("--sensitivity", is_flag=True, help="Rank the candidate's quantized MatMuls by their cost.")
@click.option("--mask-padding/--no-mask-padding", default=True, show_default=True,
              help="Leave padded token positions ([batch, sequence] rows where the attention mask is 0) out.")
@click.option("--input-map", default=None, metavar="MAP",
              help="Which data feeds which model input when the graph cannot tell: ids=input_ids,mask=attention_mask "
                   "(model input = tokenizer output, or array name).")
def diff_cmd(reference: str, candidates: tuple[str, ...], data: str | None, tokenizer: str | None, samples: int,
             batch_size: int, layerwise: bool, threshold: float, json_path: str | None, plot_path: str | None,
             save_dir: str | None, sensitivity: bool, mask_padding: bool, input_map: str | None) -> None:
    """Compare CANDIDATES against REFERENCE on ORT CPU: per output, per shared tensor, first divergence."""
    import tempfile

    from tqc.compiler import compare
    from tqc.compiler import diff as diffing
    from tqc.compiler.feeds import synthesize_feeds
    from tqc.compiler.model_io import check_output_path, load_model, write_text_atomic

    ui = _ui()
    for out in (json_path, plot_path):
        if out:
            check_output_path(out, inputs=(reference, *candidates))
    ref_model = load_model(reference)
    cand_models = [load_model(c) for c in candidates]
    if data:
        from tqc.compiler.calib_data import DataSpec, FeedSource, parse_input_map

        feeds = list(FeedSource(DataSpec(data, tokenizer=tokenizer, samples=samples, batch_size=batch_size,
                                         input_map=parse_input_map(input_map)), ref_model))
    else:
        feeds = synthesize_feeds(ref_model, count=2)
    results, ref_results = [], None
    for path, model in zip(candidates, cand_models):
        ui.progress(f"comparing {path} with {reference}" + (" tensor by tensor" if layerwise else ""))
        result, ref_results_now, _ = diffing.diff(ref_model, model, feeds, layerwise=layerwise, threshold=threshold,
                                                  candidate_name=path, mask_padding=mask_padding,
                                                  reference_results=ref_results if not layerwise else None)
        ref_results = ref_results_now
        results.append(result)
    click.echo(diffing.format_table(results, layerwise))
    folder = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix="tqc-diff-"))
    # The reference already ran; polygraphy's reference file holds its graph outputs only.
    ref_out_results = compare.restrict(ref_results, [o.name for o in ref_model.graph.output])
    inputs, ref_outputs = diffing.save_polygraphy_files(folder, feeds, ref_out_results)
    click.echo(f"polygraphy files in {folder}; reproduce and shrink with:")
    for command in diffing.polygraphy_commands(reference, candidates[0], inputs, ref_outputs, atol=1e-3, rtol=1e-3):
        click.echo(f"  {command}")
    payload: dict = {"reference": reference, "results": [r.as_dict() for r in results]}
    if sensitivity:
        ranking = diffing.sensitivity(ref_model, cand_models[0], feeds, progress=ui.progress)
        payload["sensitivity"] = ranking
        click.echo(f"sensitivity of {candidates[0]} (output rel L2 {ranking['baseline_rel_l2']:.4g}; share of it "
                   "removed by un-quantizing):")
        for row in ranking["classes"][:8]:
            click.echo(f"  class {row['class']:<60} x{row['nodes']:<3} {100 * row['share']:6.1f}%")
        for row in ranking["nodes"][:8]:
            click.echo(f"  node  {row['node']:<60}      {100 * row['share']:6.1f}%")
        click.echo(f"  to keep the top three in float: -p '...,{ranking['qdq_option']}'")
    if json_path:
        write_text_atomic(json.dumps(payload, indent=2, default=str) + "\n", json_path)
    if plot_path:
        if not layerwise:
            raise TqcError("--plot draws per-tensor errors: add --layerwise")
        diffing.plot(results, plot_path)
        click.echo(f"plot: {plot_path}")


@cli.command("passes")
def passes_cmd() -> None:
    """List the passes with their summaries and options."""
    from tqc.passes.registry import available

    for name, cls in available().items():
        needs = f"  (needs: {', '.join(cls.needs)})" if cls.needs else ""
        click.echo(f"{name:<10} {cls.summary()}{needs}")
        for key, opt in cls.options.items():
            choices = f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else ""
            click.echo(f"    {key}={opt.default!r}{choices}  {opt.help}")


@cli.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(model: str, as_json: bool) -> None:
    """Opset, inputs and outputs, op histogram, parameter count and Q/DQ count of MODEL."""
    from tqc.compiler.model_io import load_model
    from tqc.compiler.summary import format_summary, summarize

    info = summarize(load_model(model))
    click.echo(json.dumps(info, indent=2) if as_json else format_summary(info, model))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="tqc", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("tqc: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:  # usage errors: unknown option, missing argument
        if debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        click.echo(f"tqc: error: {exc.format_message()}{hint}", err=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except VerificationError as exc:
        if debug:
            raise
        click.echo(f"tqc: verification failed: {exc}", err=True)
        if exc.reproducer:
            click.echo(f"tqc: reproduce with: {exc.reproducer}", err=True)
        sys.exit(1)
    except TqcError as exc:
        if debug:
            raise
        click.echo(f"tqc: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("tqc: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"tqc: internal error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                   " (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)
