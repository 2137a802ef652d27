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
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass


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
def export_cmd(source: str, output: str, exporter: str, attn: str, opset: int | None, size: str | None,
               seed: int) -> None:
    """Export SOURCE to FP32 ONNX: 'minilm' (packaged, real weights), a family name (bert, roberta,
    distilbert, albert, electra, xlm-roberta, camembert; random weights), a config.json, or a local model
    folder."""
    from tqc.compiler.model_io import check_output_path
    from tqc.models.export import ExportSpec, export

    check_output_path(output)
    ui = _ui()
    info = export(ExportSpec(source, exporter=exporter, attn=attn, opset=opset, size=size, seed=seed), output,
                  progress=ui.progress)
    click.echo(f"exported {info['source']} -> {info['output']} ({info['exporter']} exporter, {info['attn']} "
               f"attention, opset {info['opset']}, {info['nodes']} nodes, inputs {', '.join(info['inputs'])})")


@cli.command("compile")
@click.argument("model")
@click.option("-p", "--pipeline", "pipeline_text", required=True,
              help="Passes, e.g. 'fold,fuse,qdq{method=percentile,percentile=99.99}'.")
@click.option("-o", "--output", required=True, help="Output .onnx, or .plan for a TensorRT engine.")
@click.option("--target", type=click.Choice(TARGET_CHOICES), default="trt", show_default=True,
              help="Deployment target that passes consult.")
@click.option("--verify", type=click.Choice(["none", "structure", "numeric"]), default="structure",
              show_default=True, help="Check after every pass.")
@click.option("--dump-dir", type=click.Path(file_okay=False), default=None,
              help="Write every stage, its report, inputs and outputs here.")
@click.option("--report", "report_path", default=None, help="Write the compile report (JSON) here.")
@click.option("--explain", multiple=True, metavar="PASS",
              help="Have PASS say why candidates did not match (e.g. --explain fuse).")
def compile_cmd(model: str, pipeline_text: str, output: str, target: str, verify: str, dump_dir: str | None,
                report_path: str | None, explain: tuple[str, ...]) -> None:
    """Run a pipeline of passes on MODEL and write the result."""
    from tqc.compiler.compile import CompileOptions, compile_model

    opts = CompileOptions(model=model, pipeline=pipeline_text, output=output, target=target, verify=verify,
                          dump_dir=dump_dir, report=report_path, explain=explain)
    report = compile_model(opts, progress=_ui().progress)
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    lines = [f"{report['input']['path']} -> {report['output']['path']}  (target {report['target']}, "
             f"verify {report['verify']})"]
    lines.append(f"  {'#':>2}  {'pass':<24} {'time':>8} {'verify':>8}  stats   (verify: max |diff| vs the stage before)")
    for stage in report["stages"]:
        verify = stage["verify"]
        status = "-"
        if "numeric" in verify:
            worst = max((o["max_abs"] or 0.0 for o in verify["numeric"]["outputs"].values()), default=0.0)
            status = "FAIL" if not verify["numeric"]["passed"] else ("exact" if worst == 0 else f"{worst:.1e}")
        elif verify.get("structure") == "ok":
            status = "ok"
        stats = ", ".join(f"{k}={v}" for k, v in stage["stats"].items())
        lines.append(f"  {stage['index']:>2}  {stage['spec']:<24} {stage['seconds']:>7.2f}s {status:>8}  {stats}")
    lines.append(f"  nodes {report['input']['nodes']} -> {report['output']['nodes']}, "
                 f"total {report['total_seconds']:.2f}s")
    lines += [f"  note: {message}" for message in report.get("messages", [])]
    return "\n".join(lines)


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
