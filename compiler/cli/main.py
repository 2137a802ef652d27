"""The ``tqc`` command line (click).

Exit codes (``tqc.compiler.core.errors``; README "Errors"):

    0    ok
    1    a verification or quality check failed ("tqc: verification failed: ...", with a reproducer)
    2    a user mistake (missing or corrupt model, bad pipeline or option, an output that collides with an
         input or is not a regular file, bad data): one line ``tqc: error: ...``
    3    an internal error: a bug in tqc; the line says so and points to ``--debug``
    130  interrupted by SIGINT (Ctrl-C); 143 by SIGTERM

``--debug`` shows the traceback instead of the line. Inputs are never modified: every command declares what
it reads and writes to ``tqc.compiler.io.output_guard`` before any work, outputs are written atomically and all
together (or none), and an interrupt removes every temp file and folder.
"""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

import click

from tqc import __version__
from tqc.compiler.cli.ranges import COUNT, NON_NEGATIVE, OPSET, SEED, finite_float
from tqc.compiler.core.errors import (CHECK_FAILED_EXIT_CODE, INTERNAL_ERROR_EXIT_CODE, OK_EXIT_CODE, SIGINT_EXIT_CODE,
                                 USER_ERROR_EXIT_CODE, TqcError, VerificationError)
from tqc.compiler.core.target import TARGETS

TARGET_CHOICES = TARGETS  # the targets are named in tqc.compiler.core.target


class Ui:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.start = time.perf_counter()

    def progress(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:6.1f}s] {message}", err=True)

    def note(self, message: str) -> None:
        """Data accepted but suspicious: said even with -q (it is not progress)."""
        click.echo(f"tqc: note: {message}", err=True)


def _guarded(name: str):
    """Run a command body inside its output guard (``tqc.compiler.io.output_guard.command``): outputs commit
    together when it returns, and nothing is left when it fails."""
    from tqc.compiler.io.output_guard import guarded

    return guarded(name)


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
    if quiet:
        _quiet_graphsurgeon()


def _quiet_onnxruntime() -> None:
    """ORT's own warnings (graph-optimizer notes while folding) would drown tqc's progress lines, and its error
    lines would repeat, unformatted, the error tqc reports in one line: only fatal ones are printed."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)


def _quiet_graphsurgeon() -> None:
    """-q: onnx-graphsurgeon's warnings (and its 'install colored' banner) stay off stderr."""
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR
    G_LOGGER.colors = False


@cli.command("export")
@click.argument("source")
@click.option("-o", "--output", required=True, help="ONNX file to write.")
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True,
              help="torch's TorchScript-based (legacy) or torch.export-based (dynamo) ONNX exporter.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default=None,
              help="transformers attention implementation at export (default: sdpa, transformers' default, where "
                   "the family has it; eager for DeBERTa-v2 and MPNet, which have no sdpa, and for ModernBERT "
                   "through the legacy exporter, whose sdpa export does not fuse).")
@click.option("--opset", type=OPSET, default=None, help="ONNX opset (default 17 legacy, 18 dynamo; legacy "
              "supports 7-20, dynamo 18-23).")
@click.option("--size", type=click.Choice(["base", "tiny"]), default=None,
              help="For family names: published base size or a tiny test config.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for random weights.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification", "token-classification",
                                           "question-answering", "fill-mask", "sentence-embedding"]), default=None,
              help="Head to export (default: the architecture config.json names; sentence-transformers folders: "
                   "sentence-embedding; else feature-extraction).")
@_guarded("export")
def export_cmd(source: str, output: str, exporter: str, attn: str | None, opset: int | None, size: str | None,
               seed: int, task: str | None) -> None:
    """Export SOURCE to FP32 ONNX: 'minilm' (packaged, real weights), a family name (bert, roberta,
    distilbert, albert, electra, xlm-roberta, camembert, modernbert, deberta-v2 / deberta-v3, mdeberta, mpnet;
    random weights), a config.json, or a local model folder (its head kept). Nothing is downloaded."""
    from tqc.models.export import ExportSpec, export_guarded

    ui = _ui()
    info = export_guarded(ExportSpec(source, exporter=exporter, attn=attn, opset=opset, size=size, seed=seed,
                                     task=task), output, progress=ui.progress)
    click.echo(f"exported {info['source']} -> {info['output']} ({info['exporter']} exporter, {info['attn']} "
               f"attention, opset {info['opset']}, {info['nodes']} nodes, inputs {', '.join(info['inputs'])}, "
               f"outputs {', '.join(info['outputs'])})")
    for note in info["notes"]:
        click.echo(f"  note: {note}")


@cli.command("compile")
@click.argument("model")
@click.option("-p", "--pipeline", "pipeline_text", required=True,
              help="Passes, e.g. 'fold,fuse,qdq{method=percentile,percentile=99.99}'.")
@click.option("-o", "--output", required=True, help="Output .onnx, .plan for a TensorRT engine, or .xml for "
              "OpenVINO IR (+ .bin).")
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
@click.option("--allow-table-mismatch", is_flag=True,
              help="Use a --calib-table computed on another model (its model_hash differs) instead of refusing.")
@click.option("--tokenizer", default=None, help="Tokenizer folder for .txt data (default: the model's own).")
@click.option("--calib-samples", type=COUNT, default=32, show_default=True, help="Calibration samples to use.")
@click.option("--batch-size", type=COUNT, default=8, show_default=True, help="Calibration batch size.")
@click.option("--max-length", type=COUNT, default=None,
              help="Token limit per sentence of .txt data (default: 128, or the model's positions when fewer); a "
                   "value beyond the model's positions is refused.")
@click.option("--shapes", multiple=True, help="TensorRT profiles for .plan outputs: input_ids:1x16,8x128,32x512.")
@click.option("--runtime", type=click.Choice(["ort", "openvino"]), default="ort", show_default=True,
              help="Engine that --verify numeric runs every stage on (OpenVINO CPU runs in FP32 precision).")
@click.option("--input-map", default=None, metavar="MAP",
              help="Which data feeds which model input when the graph cannot tell: ids=input_ids,mask=attention_mask "
                   "(model input = tokenizer output, or array name).")
def compile_cmd(model: str, pipeline_text: str, output: str, target: str, verify: str, dump_dir: str | None,
                report_path: str | None, explain: tuple[str, ...], calib: str | None, calib_table: str | None,
                tokenizer: str | None, calib_samples: int, batch_size: int, max_length: int | None,
                shapes: tuple[str, ...], allow_table_mismatch: bool, runtime: str, input_map: str | None) -> None:
    """Run a pipeline of passes on MODEL and write the result."""
    from tqc.compiler.tools.compile import CompileOptions, compile_model, format_report

    opts = CompileOptions(model=model, pipeline=pipeline_text, output=output, target=target, verify=verify,
                          dump_dir=dump_dir, report=report_path, explain=explain, calib=calib,
                          calib_table=calib_table, tokenizer=tokenizer, calib_samples=calib_samples,
                          batch_size=batch_size, max_length=max_length, shapes=shapes,
                          allow_table_mismatch=allow_table_mismatch, runtime=runtime, input_map=input_map)
    report = compile_model(opts, progress=_ui().progress)
    click.echo(format_report(report))


@cli.command("calibrate")
@click.argument("model")
@click.option("--data", "data", required=True, help="Calibration data: .npz, polygraphy .json, .txt, script.py:fn.")
@click.option("-o", "--output", required=True, help="Calibration table (JSON) to write.")
@click.option("--tokenizer", default=None, help="Tokenizer folder for .txt data (default: the model's own).")
@click.option("--samples", type=COUNT, default=32, show_default=True)
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--max-length", type=COUNT, default=None,
              help="Token limit per sentence of .txt data (default: 128, or the model's positions when fewer); a "
                   "value beyond the model's positions is refused.")
@click.option("--input-map", default=None, metavar="MAP",
              help="Which data feeds which model input when the graph cannot tell: ids=input_ids,mask=attention_mask "
                   "(model input = tokenizer output, or array name).")
@_guarded("calibrate")
def calibrate_cmd(model: str, data: str, output: str, tokenizer: str | None, samples: int, batch_size: int,
                  max_length: int | None, input_map: str | None) -> None:
    """Stream activation statistics of MODEL over DATA into a reusable calibration table."""
    from tqc.compiler.analysis.calib_data import DataSpec, FeedSource, parse_input_map
    from tqc.compiler.analysis.calibration import calibrate, calibration_targets
    from tqc.compiler.io.graph import to_graph
    from tqc.compiler.io.model import check_input_path, load_model_lean
    from tqc.compiler.io.output_guard import current
    from tqc.compiler.io.structure import infer_shapes

    guard = current()
    guard.reads_model(check_input_path(model))
    guard.reads_data(data, "--data")
    guard.reads_tokenizer(tokenizer, data)
    out = guard.writes(output, "-o")
    from tqc.compiler.io.model import model_hash_async

    hashing = model_hash_async(model)  # the table names its model by the file's hash (weights included)
    lean = load_model_lean(model)  # weights read once; the graph runs without being exported
    skeleton = infer_shapes(lean.skeleton, strict=False)
    graph = to_graph(skeleton, lean.weights)
    source = FeedSource(DataSpec(data, tokenizer=tokenizer, samples=samples, batch_size=batch_size,
                                 max_length=max_length, input_map=parse_input_map(input_map)), skeleton)
    table = calibrate(graph, source, calibration_targets(skeleton), progress=_ui().progress,
                      model_hash=hashing(lean.external_locations))
    table.save(out)
    click.echo(f"calibrated {len(table.tensors)} tensors on {table.samples} samples in {table.seconds:.2f}s -> {out}")


@cli.command("check")
@click.argument("model")
@click.option("--target", type=click.Choice(["trt"]), default="trt", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--shapes", multiple=True, help="Profiles (input_ids:1x16,8x128,32x512): their max sequence decides "
                                              "INT8 MHA eligibility (else the model's position table).")
def check_cmd(model: str, target: str, as_json: bool, shapes: tuple[str, ...] = ()) -> None:
    """Static TensorRT readiness check: ops, Q/DQ rules, dynamic shapes, INT8 MHA eligibility."""
    from tqc.compiler.io.model import load_model
    from tqc.compiler.core.profiles import parse_shapes
    from tqc.compiler.tools.trt_check import check_trt, format_check

    report = check_trt(load_model(model, load_external_data=False), parse_shapes(shapes))
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_check(report, model))
    if not report.ok:
        sys.exit(1)


@cli.command("build")
@click.argument("model")
@click.option("-o", "--output", required=True, help="TensorRT plan to write (.plan).")
@click.option("--shapes", multiple=True, help="Profiles: input_ids:1x16,8x128,32x512 (min,opt,max).")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="FP16 for graphs without Q/DQ.")
@click.option("--workspace", type=finite_float(min=0, min_open=True), default=4.0, show_default=True,
              help="Workspace pool, GiB.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimization level.")
@click.option("--timing-cache", default=None, help="Timing cache file, read and updated with the plan (default "
              "~/.cache/tqc/trt_timing.cache, or $TQC_TIMING_CACHE).")
@_guarded("build")
def build_cmd(model: str, output: str, shapes: tuple[str, ...], fp16: bool, workspace: float, opt_level: int,
              timing_cache: str | None) -> None:
    """Build a TensorRT plan from an ONNX model (strongly typed for Q/DQ graphs)."""
    from tqc.compiler.io.model import check_input_path, load_model
    from tqc.compiler.io.output_guard import current
    from tqc.compiler.tools.trt import build_plan, declare_plan_outputs, require_tensorrt

    guard = current()
    guard.reads_model(check_input_path(model))
    load_model(model, load_external_data=False)  # validated as every command's input (weights not read)
    declare_plan_outputs(guard, output, timing_cache)  # plan, metadata, timing cache: staged, all or none
    require_tensorrt()
    meta = build_plan(model, output, shapes=shapes, fp16=fp16, workspace_gib=workspace, opt_level=opt_level,
                      timing_cache=timing_cache, progress=_ui().progress)
    click.echo(f"built {output} ({meta['network']}, TensorRT {meta['tensorrt_version']}, {meta['build_seconds']}s)")


@cli.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "trt", "openvino"]), default="cpu", show_default=True,
              help="ONNX Runtime CPU/CUDA/TensorRT EP, or OpenVINO CPU (.onnx or .xml IR).")
@click.option("--shapes", default="1x16,1x128,8x128", show_default=True, help="batch x sequence, comma-separated.")
@click.option("--lengths", type=click.Choice(["full", "uniform"]), default="full", show_default=True,
              help="Token lengths per row: all full, or uniform in [S/2, S] with right padding.")
@click.option("--runs", type=COUNT, default=200, show_default=True)
@click.option("--warmup", type=NON_NEGATIVE, default=10, show_default=True)
@click.option("--budget", type=finite_float(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds per measurement at most.")
@click.option("--threads", type=COUNT, default=None, help="ORT intra-op threads (CPU); OpenVINO inference threads.")
@click.option("--cuda-graph", is_flag=True, help="ORT CUDA: capture and replay a CUDA graph.")
@click.option("--json", "json_path", default=None, help="Write the results here.")
@_guarded("bench")
def bench_cmd(models: tuple[str, ...], provider: str, shapes: str, lengths: str, runs: int, warmup: int,
              budget: float, threads: int | None, cuda_graph: bool, json_path: str | None) -> None:
    """Latency (median, p95, p99) and throughput of one or more models; a comparison table."""
    from tqc.compiler.tools.benchmark import (bench_inputs, check_runnable, format_bench_table, parse_bench_shapes,
                                              runner_for, time_callable, token_inputs)
    from tqc.compiler.runtime.feeds import input_specs
    from tqc.compiler.io.model import check_input_path, load_model, write_text_atomic
    from tqc.compiler.io.output_guard import current

    guard = current()
    for model in models:
        guard.reads_model(check_input_path(model), f"the model '{model}'")
    guard.writes(json_path, "--json")
    ui = _ui()
    parsed = parse_bench_shapes(shapes)
    onnx_models = {}
    for model in models:  # every model, shape and runtime checked before the first measurement
        check_runnable(model, provider, cuda_graph)
        if not model.endswith((".plan", ".xml")):  # validated on load; only the signature and table dims are read
            onnx_models[model] = load_model(model, load_external_data=False)
            for batch, seq in parsed:
                bench_inputs(onnx_models[model], [s.name for s in input_specs(onnx_models[model])], batch, seq,
                             lengths)
    rows = []
    for model in models:
        onnx_model = onnx_models.get(model)
        runner = runner_for(model, provider, threads, cuda_graph)
        names = runner.input_names
        for position, (batch, seq) in enumerate(parsed):
            ui.progress(f"{model} {batch}x{seq} on {provider}" + (" (CUDA graph)" if cuda_graph else ""))
            if cuda_graph and position > 0:
                runner = runner_for(model, provider, threads, cuda_graph)  # a captured graph has fixed shapes
            feed = bench_inputs(onnx_model, names, batch, seq, lengths) if onnx_model is not None else \
                token_inputs(names, batch, seq, 30000, lengths)
            timing = time_callable(runner.prepare(feed), batch, runs, warmup, budget)
            precision = {"precision": runner.precision} if hasattr(runner, "precision") else {}
            rows.append({"model": model, "shape": f"{batch}x{seq}", "provider": provider, **precision,
                         **timing.as_dict()})
    click.echo(format_bench_table(rows, models[0]))
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
@click.option("--text", is_flag=True, help="Also NAME_tokenizer (python backend) and NAME_text (an ensemble: "
                                           "text in, the model's outputs out); ONNX models only.")
@click.option("--tokenizer", default=None, help="With --text: tokenizer folder (default: the one the export "
                                                "recorded).")
@click.option("--max-length", type=click.IntRange(1, 8192), default=None,
              help="With --text: token limit (default: the sentence encoder's or tokenizer's).")
@click.option("--long-text", type=click.Choice(["truncate", "error"]), default="truncate", show_default=True,
              help="With --text: a text over the token limit is truncated, or answered with an error.")
@_guarded("export-triton")
def export_triton_cmd(model: str, repo: str, name: str | None, max_batch: int, instances: int, kind: str,
                      queue_delay_us: int, text: bool, tokenizer: str | None, max_length: int | None,
                      long_text: str) -> None:
    """Write a Triton model repository (config.pbtxt + version folder) for an ONNX model or a plan; with --text
    also a python-backend tokenizer and an ensemble that takes text."""
    if not text:
        from tqc.compiler.tools.triton import export_triton

        if tokenizer is not None or max_length is not None or long_text != "truncate":
            raise TqcError("--tokenizer, --max-length and --long-text belong to --text; add --text")
        info = export_triton(model, repo, name=name, max_batch=max_batch, instances=instances, kind=kind,
                             queue_delay_us=queue_delay_us)
        click.echo(f"wrote {info['model']} ({info['config']['platform']}, max_batch_size "
                   f"{info['config']['max_batch_size']})")
        return
    from tqc.compiler.tools.triton_text import export_triton_text

    info = export_triton_text(model, repo, name=name, max_batch=max_batch, instances=instances, kind=kind,
                              queue_delay_us=queue_delay_us, tokenizer=tokenizer, max_length=max_length,
                              long_text=long_text, note=_ui().note)
    click.echo(f"wrote {', '.join(info['models'])} (onnxruntime_onnx, python tokenizer, ensemble; max_batch_size "
               f"{info['config']['max_batch_size']}, token limit {info['settings']['max_length']})")


@cli.command("diff")
@click.argument("reference")
@click.argument("candidates", nargs=-1, required=True)
@click.option("--data", default=None, help="Inputs: .npz, polygraphy .json, .txt sentences, script.py:fn "
                                           "(default: random token ids drawn from the model's signature; "
                                           "a note on stderr says so).")
@click.option("--tokenizer", default=None, help="Tokenizer folder for .txt data.")
@click.option("--samples", type=COUNT, default=16, show_default=True)
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--layerwise", is_flag=True, help="Compare every tensor both graphs share by name.")
@click.option("--threshold", type=finite_float(min=0), default=0.05, show_default=True,
              help="Relative L2 error that marks the first divergence (with --layerwise).")
@click.option("--json", "json_path", default=None, help="Write the comparison as JSON.")
@click.option("--plot", "plot_path", default=None, help="Draw per-tensor SQNR along the network (PNG).")
@click.option("--save-dir", default=None, help="Where polygraphy's inputs/outputs JSON go (default: a temp folder).")
@click.option("--sensitivity", is_flag=True, help="Rank the candidate's quantized MatMuls by their cost.")
@click.option("--mask-padding/--no-mask-padding", default=True, show_default=True,
              help="Leave padded token positions ([batch, sequence] rows where the attention mask is 0) out.")
@click.option("--runtime", type=click.Choice(["ort", "openvino"]), default="ort", show_default=True,
              help="Engine that runs the candidates (the reference always runs on ORT CPU, optimizations off).")
@click.option("--input-map", default=None, metavar="MAP",
              help="Which data feeds which model input when the graph cannot tell: ids=input_ids,mask=attention_mask "
                   "(model input = tokenizer output, or array name).")
@_guarded("diff")
def diff_cmd(reference: str, candidates: tuple[str, ...], data: str | None, tokenizer: str | None, samples: int,
             batch_size: int, layerwise: bool, threshold: float, json_path: str | None, plot_path: str | None,
             save_dir: str | None, sensitivity: bool, mask_padding: bool, runtime: str, input_map: str | None) -> None:
    """Compare CANDIDATES against REFERENCE on ORT CPU: per output, per shared tensor, first divergence."""
    import shutil

    from tqc.compiler.tools import diff as diffing
    from tqc.compiler.io.model import check_input_path, write_bytes_atomic, write_text_atomic
    from tqc.compiler.io.output_guard import current, make_temp_dir

    ui = _ui()
    if plot_path and not layerwise:  # option combinations first: nothing is written for a refused command
        raise TqcError("--plot draws per-tensor errors: add --layerwise")
    diffing.check_runtime(runtime, sensitivity)
    guard = current()
    for path in (reference, *candidates):
        guard.reads_model(check_input_path(path), f"the model '{path}'")
    guard.reads_data(data, "--data")
    guard.reads_tokenizer(tokenizer, data)
    guard.writes(json_path, "--json")
    guard.writes(plot_path, "--plot")
    guard.writes_into(save_dir, ("inputs.json", "reference_outputs.json"), "--save-dir")
    # Skeletons now, checked; each model's weights only for its own run (diffing.compare_models), one at a time.
    ref_side, cand_sides = diffing.prepare(reference, [(c, c) for c in candidates])
    ref_model = ref_side.skeleton
    from tqc.compiler.analysis.calib_data import DataSpec, comparison_feeds, parse_input_map

    feeds = comparison_feeds(ref_model, DataSpec(data, tokenizer=tokenizer, samples=samples, batch_size=batch_size,
                                                 input_map=parse_input_map(input_map)) if data else None)
    ui.progress(f"comparing {', '.join(candidates)} with {reference}" + (" tensor by tensor" if layerwise else ""))
    results, ref_results, _ = diffing.compare_models(ref_side, cand_sides, feeds,
                                                     layerwise=layerwise, threshold=threshold,
                                                     mask_padding=mask_padding, runtime=runtime, progress=ui.progress)
    click.echo(diffing.format_table(results, layerwise))
    folder = Path(save_dir) if save_dir else make_temp_dir("tqc-diff-", keep="success")  # kept if diff succeeds
    # The reference already ran; polygraphy's reference file holds its graph outputs only.
    inputs, ref_outputs = diffing.save_polygraphy_files(folder, feeds, ref_results)
    click.echo(f"polygraphy files in {folder}; reproduce and shrink with:")
    for command in diffing.polygraphy_commands(reference, candidates[0], inputs, ref_outputs, atol=1e-3, rtol=1e-3):
        click.echo(f"  {command}")
    payload: dict = {"reference": reference, "results": [r.as_dict() for r in results]}
    if sensitivity:
        ranking = diffing.sensitivity(reference, candidates[0], feeds, progress=ui.progress)
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
        scratch = make_temp_dir(".tqc-plot-")  # matplotlib writes the file itself: drawn aside, then placed
        try:
            drawn = scratch / Path(plot_path).name
            from tqc.compiler.tools.diff_plot import plot

            plot(results, drawn)
            write_bytes_atomic(drawn.read_bytes(), plot_path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        click.echo(f"plot: {plot_path}")
    if not data:  # said last, under the numbers it qualifies (and not at all when the command fails)
        click.echo(f"tqc: note: {diffing.drawn_inputs_note(ref_model, feeds)}", err=True)


@cli.command("passes")
def passes_cmd() -> None:
    """List the passes with their summaries and options."""
    from tqc.passes.registry import available

    for name, cls in available().items():
        click.echo(f"{name:<10} {cls.summary()}")
        for condition in cls.requires:
            click.echo(f"    requires: {condition.text}")
        for condition in cls.ensures:
            click.echo(f"    ensures:  {condition.text}")
        for key, opt in cls.options.items():
            choices = f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else ""
            choices += f" in {opt.range_text()}" if opt.range_text() else ""
            click.echo(f"    {key}={opt.default!r}{choices}  {opt.help}")


@cli.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the endpoints listen on.")
@click.option("--port", "http_port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port (0: a free one).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True,
              help="Prometheus metrics port (/metrics).")
@click.option("--name", default=None, help="Model name (default: the file name's stem); text endpoint: NAME_text.")
@click.option("--endpoints", type=click.Choice(["both", "raw", "text"]), default="both", show_default=True,
              help="raw tensors in, text in, or both (text needs a tokenizer).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "openvino"]), default=None,
              help="Runtime inside the server: ONNX Runtime CPU or CUDA (IO binding), or OpenVINO CPU (FP32 "
                   "precision). Default: openvino for an IR (.xml), else cpu.")
@click.option("--cuda-graph", is_flag=True, help="CUDA: one captured CUDA graph per (batch, sequence) bucket.")
@click.option("--tokenizer", default=None, help="Tokenizer folder (default: the one the export recorded).")
@click.option("--max-length", type=click.IntRange(1, 8192), default=None,
              help="Token limit (default: the sentence encoder's or tokenizer's; raw: 512).")
@click.option("--long-text", type=click.Choice(["truncate", "error"]), default="truncate", show_default=True,
              help="A text over the token limit: truncated, or answered with an error.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Triton max_batch_size (rows per execute call).")
@click.option("--preferred-batch", default="", help="Dynamic batching: preferred batch sizes, e.g. 8,16.")
@click.option("--queue-delay-us", type=click.IntRange(0, 10_000_000), default=100, show_default=True,
              help="Dynamic batching: max queue delay in microseconds (0 with no --preferred-batch: off).")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (processes): requests tokenize and run in parallel.")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Runtime threads per instance (CPU; default: all cores, divided among --instances).")
@click.option("--max-padding", type=click.FloatRange(0.0, 1.0), default=None,
              help="Text: the rows of a batch run in length groups, each at most this fraction padding (1: one "
                   "group, padded to the longest row). Default: 0.5 on CPU and OpenVINO, 1 on CUDA.")
@click.option("--startup-timeout", type=click.FloatRange(1, 3600), default=180.0, show_default=True,
              help="Seconds to wait for the models to load.")
@click.option("--timings", "timings_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Text: the model's own timings per padded shape (TEXT decode, tokenizer, runtime, pooling, "
                   "response; seconds summed, calls) written to DIR/NAME_text[.PID].timings.json once a second.")
def serve_cmd(model: str, host: str, http_port: int, grpc_port: int, metrics_port: int, name: str | None,
              endpoints: str, provider: str | None, cuda_graph: bool, tokenizer: str | None, max_length: int | None,
              long_text: str, max_batch: int, preferred_batch: str, queue_delay_us: int, instances: int,
              threads: int | None, max_padding: float | None, startup_timeout: float,
              timings_dir: str | None) -> None:
    """Serve MODEL (.onnx, or OpenVINO IR .xml) behind a Triton Inference Server until SIGTERM or Ctrl-C: raw tensors in, and
    text in (tokenized in the server) -> embeddings. A signal stops a serving server cleanly with exit 0; one
    that arrives while it is still starting exits 130 (SIGINT) or 143 (SIGTERM)."""
    from tqc.compiler.cli.serve import run_serve

    run_serve(model=model, host=host, ports=(http_port, grpc_port, metrics_port), name=name, endpoints=endpoints,
              provider=provider, cuda_graph=cuda_graph, tokenizer=tokenizer, max_length=max_length,
              long_text=long_text, max_batch=max_batch, preferred_batch=preferred_batch,
              queue_delay_us=queue_delay_us, instances=instances, threads=threads, max_padding=max_padding,
              startup_timeout=startup_timeout, progress=_ui().progress, timings_dir=timings_dir)


@cli.command("check-triton")
@click.argument("repo")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def check_triton_cmd(repo: str, as_json: bool) -> None:
    """Load a 'tqc export-triton' repository as far as this machine can: each config.pbtxt by tritonserver
    itself, each model.onnx by ONNX Runtime against its config. Exit 1 when a model fails."""
    from tqc.compiler.tools.serve.repo_check import check_triton_repository

    rows = check_triton_repository(repo)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            click.echo(f"{row['model']}: {'ok' if row['ok'] else 'FAILED'}\n  triton: {row['triton']}\n  files:  {row['files']}")
    if not all(row["ok"] for row in rows):
        sys.exit(1)


@cli.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(model: str, as_json: bool) -> None:
    """Opset, inputs and outputs, op histogram, parameter count and Q/DQ count of MODEL."""
    from tqc.compiler.io.model import load_model
    from tqc.compiler.tools.summary import format_summary, summarize

    info = summarize(load_model(model))
    click.echo(json.dumps(info, indent=2) if as_json else format_summary(info, model))


def main(argv: list[str] | None = None) -> None:
    """Run ``tqc ARGV`` and exit with the documented code (module docstring); whatever happens, every temp
    file and folder of the run is removed and an uncommitted output is never left half-written."""
    from tqc.compiler.io import output_guard

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    previous_handlers = output_guard.install_signal_handlers()
    kept: tuple[str, ...] = ()
    code = INTERNAL_ERROR_EXIT_CODE
    try:
        code, kept = _run(argv, debug)
    finally:
        try:
            with output_guard.signals_deferred():
                output_guard.end_command(keep=kept)
        except output_guard.Interrupted as late:  # arrived while cleaning up: still exits 130/143, cleanly
            output_guard.end_command()
            click.echo(f"tqc: interrupted ({late}) while finishing", err=True)
            code = late.exit_code
        output_guard.restore_signal_handlers(previous_handlers)
    sys.exit(code)


def _run(argv: list[str], debug: bool) -> tuple[int, tuple[str, ...]]:
    """(exit code, temp-path policies to keep) of one run; messages printed here."""
    from tqc.compiler.io.output_guard import KEPT_WRITTEN, Interrupted

    try:
        cli.main(args=argv, prog_name="tqc", standalone_mode=False)
    except Interrupted as exc:
        click.echo(f"tqc: interrupted ({exc}); temporary files removed", err=True)
        return exc.exit_code, ()
    except click.exceptions.Exit as exc:
        return exc.exit_code, ("success", KEPT_WRITTEN)
    except click.exceptions.Abort:  # click turns KeyboardInterrupt (and EOF) into Abort
        click.echo("tqc: interrupted (SIGINT); temporary files removed", err=True)
        return SIGINT_EXIT_CODE, ()
    except click.ClickException as exc:  # usage errors: unknown option, missing argument
        if debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        click.echo(f"tqc: error: {exc.format_message()}{hint}", err=True)
        return USER_ERROR_EXIT_CODE, ()
    except VerificationError as exc:
        if debug:
            raise
        message = f"tqc: verification failed: {exc}"
        if exc.reproducer:
            message += f"; reproduce with: {exc.reproducer}"
        click.echo(message, err=True)
        return CHECK_FAILED_EXIT_CODE, ("check-failed", KEPT_WRITTEN)
    except TqcError as exc:
        if debug:
            raise
        click.echo(f"tqc: error: {exc}", err=True)
        return exc.exit_code, ()
    except KeyboardInterrupt:
        click.echo("tqc: interrupted (SIGINT); temporary files removed", err=True)
        return SIGINT_EXIT_CODE, ()
    except OSError as exc:  # the machine, not tqc: a full disk, a read-only file system, a permission
        if debug or exc.errno not in ENVIRONMENT_ERRNOS:
            if debug:
                raise
            return _internal_error(exc), ()
        where = f" '{exc.filename}'" if exc.filename else ""
        click.echo(f"tqc: error: cannot write or read{where}: {exc.strerror or exc}", err=True)
        return USER_ERROR_EXIT_CODE, ()
    except SystemExit as exc:  # sys.exit inside a command (tqc check), or from user code
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USER_ERROR_EXIT_CODE)
        return code, ("success", KEPT_WRITTEN) if code == 0 else ()
    except Exception as exc:
        if debug:
            raise
        return _internal_error(exc), ()
    return OK_EXIT_CODE, ("success", KEPT_WRITTEN)


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _internal_error(exc: BaseException) -> int:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    click.echo(f"tqc: internal error (a bug in tqc, please report it): {type(exc).__name__}: {first} "
               "(rerun with --debug for the traceback)", err=True)
    return INTERNAL_ERROR_EXIT_CODE
