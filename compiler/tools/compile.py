"""The compile driver behind ``tqc compile``: check paths, parse, run the manager, write atomically.

Order matters for "bad input loses nothing": every path and the pipeline are checked before any work, and
the output and report are written only after every pass has been verified.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from tqc.compiler.core.errors import TqcError
from tqc.compiler.pipeline.manager import VERIFY_LEVELS, PassManager
from tqc.compiler.io.model import check_input_path, load_model_lean, model_hash_async, save_model, write_text_atomic
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.core.target import DEFAULT_TARGET, Target
from tqc.passes.base import PassContext


@dataclass
class CompileOptions:
    model: str
    pipeline: str
    output: str
    target: str = DEFAULT_TARGET
    verify: str = "numeric"             # --verify structure opts out of the numeric check
    dump_dir: str | None = None
    report: str | None = None
    explain: tuple[str, ...] = ()
    calib: str | None = None            # calibration data (see compiler/analysis/calib_data.py)
    calib_table: str | None = None      # or a table from `tqc calibrate`
    tokenizer: str | None = None
    calib_samples: int | None = 32
    batch_size: int = 8
    max_length: int | None = None      # .txt data: None is 128, or the model's positions when fewer
    shapes: tuple[str, ...] = ()       # TensorRT profiles for .plan outputs
    allow_table_mismatch: bool = False  # use a calib_table whose model_hash is another model's
    runtime: str = "ort"               # engine of --verify numeric: ort | openvino
    input_map: str | None = None        # --input-map ids=input_ids,mask=attention_mask


RUNTIMES = ("ort", "openvino")  # engines --verify numeric runs the stages on


def compile_model(opts: CompileOptions, progress=lambda message: None) -> dict:
    """Compile ``opts.model``; its outputs (model, report, plan + metadata) are written all or none."""
    from tqc.compiler.io import output_guard

    with output_guard.command("compile") as guard:
        return _compile(opts, progress, guard)


def dump_file_names(passes) -> list[str]:
    """Every file ``--dump-dir`` may receive for this pipeline (see ``PassManager``)."""
    names = ["inputs.json", "00_input.onnx", "00_input.onnx.data", "00_input.outputs.json"]
    for index, p in enumerate(passes, start=1):
        stage = f"{index:02d}_{p.name}"
        names += [f"{stage}.onnx", f"{stage}.onnx.data", f"{stage}.report.json", f"{stage}.outputs.json"]
    return names


def _compile(opts: CompileOptions, progress, guard) -> dict:
    start = time.perf_counter()
    check_choices(opts.target, opts.verify, opts.runtime)
    source = check_input_path(opts.model)
    # Everything read and written is declared before any work: an output that is (or resolves to) an input,
    # another output, or a device/FIFO is refused here.
    declare_inputs(guard, source, opts.calib, opts.calib_table, opts.tokenizer)
    from tqc.compiler.analysis.calib_data import parse_input_map

    input_map = parse_input_map(opts.input_map)  # a malformed map fails before anything is loaded
    out = declare_output(guard, opts.output)
    is_plan = out.suffix == ".plan"
    guard.writes(opts.report, "--report")
    if opts.calib and opts.calib_table:
        raise TqcError("give either --calib or --calib-table, not both")
    passes = parse_pipeline(opts.pipeline)
    guard.writes_into(opts.dump_dir, dump_file_names(passes), "--dump-dir")
    check_output_format(out, opts.target, opts.shapes)
    progress(f"loading {source}")
    hash_thread = model_hash_async(source)  # in a thread, next to the load and the first passes
    lean = load_model_lean(source)  # the weights are read once, into the arrays the passes work on
    external = list(lean.external_locations)

    def hashing() -> str:
        return hash_thread(external)

    model = lean.skeleton
    if is_plan:
        check_plan_shapes(model, opts.shapes)  # refused before any pass runs (and before anything is written)
    calib = None
    if opts.calib:
        from tqc.compiler.analysis.calib_data import DataSpec

        calib = DataSpec(opts.calib, tokenizer=opts.tokenizer, samples=opts.calib_samples, batch_size=opts.batch_size,
                         max_length=opts.max_length, input_map=input_map)
    ctx = pass_context(model, target=opts.target, explain=opts.explain, shapes=opts.shapes, calib=calib,
                       calib_table=opts.calib_table, model_path=source, hashing=hashing,
                       allow_table_mismatch=opts.allow_table_mismatch, progress=progress)
    if opts.runtime == "openvino" and opts.verify == "numeric":
        from tqc.compiler.io.openvino_ir import require_openvino

        require_openvino()
    manager = PassManager(passes, ctx, verify=opts.verify, dump_dir=opts.dump_dir, progress=progress,
                          runtime=opts.runtime)
    nodes_in = len(model.graph.node)
    if is_plan:
        from tqc.compiler.tools.trt import build_plan_from_model

        result = manager.run(lean)
        source_hash = hashing()
        progress("building the TensorRT plan")
        build_plan_from_model(result, out, source_hash=source_hash, shapes=opts.shapes, progress=progress)
        nodes_out = len(result.graph.node)
    else:
        result = manager.run_lean(lean)  # written straight from the graph's arrays: no export, no copy
        source_hash = hashing()
        if ctx.target.cuda_graphs:
            note_cuda_graphs(result.skeleton, ctx)
        write_output(result, out, source_hash, progress=progress)
        nodes_out = len(result.skeleton.graph.node)
    report = manager.report(
        input={"path": str(source), "hash": source_hash, "nodes": nodes_in},
        output={"path": str(out), "nodes": nodes_out},
        total_seconds=round(time.perf_counter() - start, 4),
    )
    if opts.report:
        write_text_atomic(json.dumps(report, indent=2, default=str) + "\n", opts.report)
    return report


# ---------------------------------------------------------------- the steps, shared with the Python API (tqc.api)

def note_cuda_graphs(skeleton: onnx.ModelProto, ctx: PassContext) -> None:
    """Note whether ONNX Runtime CUDA can capture CUDA graphs on the compiled model: the nodes it would place on
    the CPU for shape reasons block it (``tqc.compiler.analysis.cuda_placement``); any ``--explain`` lists
    them all."""
    from tqc.compiler.analysis.cuda_placement import (host_placed_by_inference, host_placement_details,
                                                      host_placement_note)

    placed = host_placed_by_inference(skeleton)  # the written model keeps its own value_info
    ctx.note(host_placement_note(placed))
    if ctx.explain and placed:
        for line in host_placement_details(placed):
            ctx.note(line)


def check_choices(target: str, verify: str, runtime: str) -> None:
    """The target, verification level and verification engine are known ones (one line each otherwise)."""
    Target.named(target)  # an unknown name: one line with a did-you-mean
    if verify not in VERIFY_LEVELS:
        raise TqcError(f"--verify must be one of {', '.join(VERIFY_LEVELS)}")
    if runtime not in RUNTIMES:
        raise TqcError(f"--runtime must be ort or openvino, got '{runtime}'")


def declare_inputs(guard, model: Path | None, calib: str | None, calib_table: str | None,
                   tokenizer: str | None) -> None:
    """What a compile reads, declared to the output guard: no output may be written over any of it."""
    guard.reads_model(model)
    guard.reads_data(calib, "--calib")
    guard.reads(calib_table, "--calib-table")
    guard.reads_tokenizer(tokenizer, calib)


def declare_output(guard, output: str | Path, what: str = "-o") -> Path:
    """Declare the compiled model's output and what comes with it: a plan's metadata (``.plan.json``) and timing
    cache, an IR's
    weights and metadata (``.bin``, ``.xml.json``), an ONNX model's external data (``.onnx.data``)."""
    out = Path(output)
    if out.suffix == ".plan":
        from tqc.compiler.tools.trt import declare_plan_outputs

        declare_plan_outputs(guard, out, None)  # plan, metadata and the default timing cache
    elif out.suffix == ".xml":  # OpenVINO IR: the .xml and its .bin weights
        guard.writes(out, what)
        guard.writes(out.with_suffix(".bin"), "the IR's weights (.bin)")
        guard.writes(out.with_name(out.name + ".json"), "the IR's metadata")
    else:
        guard.writes_model(out, what)
    return out


def check_output_format(out: Path, target: str, shapes: tuple[str, ...] = ()) -> None:
    """The output's format can be written on this machine for this target (before anything runs)."""
    if out.suffix == ".plan":
        from tqc.compiler.core.profiles import parse_shapes
        from tqc.compiler.tools.trt import require_tensorrt

        parse_shapes(shapes)  # a malformed --shapes fails before anything runs
        require_tensorrt()
    elif out.suffix == ".xml":
        from tqc.compiler.io.openvino_ir import require_openvino

        require_openvino()  # missing OpenVINO fails before anything runs
        if Target.named(target).contrib_ops:
            raise TqcError(f"OpenVINO IR output needs --target openvino (or trt): --target {target} writes "
                           "com.microsoft ops that OpenVINO cannot read")
    elif out.suffix != ".onnx":
        raise TqcError(f"output '{out}' must end in .onnx, .plan (TensorRT) or .xml (OpenVINO IR)")


def check_plan_shapes(model: onnx.ModelProto, shapes: tuple[str, ...]) -> None:
    """A TensorRT plan needs a profile (``--shapes``) for every dynamic input of ``model``."""
    from tqc.compiler.core.profiles import parse_shapes

    dynamic = [i.name for i in model.graph.input if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
    given = set(parse_shapes(shapes))
    missing = [n for n in dynamic if n not in given and "*" not in given]
    if missing:
        raise TqcError(f"a .plan output needs --shapes for every dynamic input; missing: {', '.join(missing)} "
                       f"(e.g. --shapes {missing[0]}:1x16,8x128,32x512)")


def pass_context(model: onnx.ModelProto, *, target: str, explain=(), shapes: tuple[str, ...] = (), calib=None,
                 calib_table: str | None = None, model_path: str | Path | None = None, hashing=None,
                 allow_table_mismatch: bool = False, progress=lambda message: None) -> PassContext:
    """The context the passes read: the target, ``explain`` (pass names, checked), the TensorRT profiles, and
    the calibration data (``calib``: a ``DataSpec``, read as a ``FeedSource`` against ``model``) or a table
    (``calib_table``: a file from ``tqc calibrate``, checked against the model's hash: ``hashing()``)."""
    from tqc.passes.registry import get_pass

    for name in explain:
        get_pass(name)  # unknown names get the did-you-mean error
    ctx = PassContext(target=Target.named(target), explain=set(explain))  # the manager gives it the progress
    if shapes:  # the profiles' max sequence also decides qdq's INT8 attention placement
        from tqc.compiler.core.profiles import parse_shapes

        ctx.shapes = parse_shapes(shapes)
    if calib is not None and calib_table:
        raise TqcError("give either --calib or --calib-table, not both")
    if calib is not None:
        from tqc.compiler.analysis.calib_data import FeedSource

        ctx.calibration_source = FeedSource(calib, model)
    elif calib_table:
        from tqc.compiler.analysis.calibration import CalibrationTable
        from tqc.compiler.analysis.table_check import check_table_matches

        ctx.calibration = CalibrationTable.load(calib_table)
        check_table_matches(ctx.calibration, calib_table, model_path, hashing, model, allow_table_mismatch, progress)
    return ctx


def write_output(result, out: Path, source_hash: str | None, shapes: tuple[str, ...] = (),
                 progress=lambda message: None) -> None:
    """Write a compiled ``LeanModel`` as ``out`` says: ONNX (external data above 2 GB), OpenVINO IR (``.xml``)
    or a TensorRT plan (``.plan``); atomically, through the output guard."""
    if out.suffix == ".plan":
        from tqc.compiler.io.lean import model_of_lean
        from tqc.compiler.tools.trt import build_plan_from_model

        progress("building the TensorRT plan")
        build_plan_from_model(model_of_lean(result), out, source_hash=source_hash, shapes=shapes, progress=progress)
    elif out.suffix == ".xml":
        from tqc.compiler.io.openvino_ir import write_ir

        write_ir(result, out, source_hash=source_hash, progress=progress)
    else:
        save_model(result, out)


def format_report(report: dict) -> str:
    """The compile report as ``tqc compile`` prints it: one line per pass (time, verification, stats)."""
    output = report["output"].get("path") or "(in memory)"
    lines = [f"{report['input']['path']} -> {output}  (target {report['target']}, verify {report['verify']})"]
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
