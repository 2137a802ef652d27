"""The compile driver behind ``tqc compile``: check paths, parse, run the manager, write atomically.

Order matters for "bad input loses nothing": every path and the pipeline are checked before any work, and
the output and report are written only after every pass has been verified.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqc.compiler.core.errors import TqcError
from tqc.compiler.pipeline.manager import PassManager
from tqc.compiler.io.model import check_input_path, load_model_lean, model_hash_async, save_model, write_text_atomic
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.core.target import Target
from tqc.passes.base import PassContext


@dataclass
class CompileOptions:
    model: str
    pipeline: str
    output: str
    target: str = "trt"
    verify: str = "numeric"             # --verify structure opts out of the numeric check
    dump_dir: str | None = None
    report: str | None = None
    explain: tuple[str, ...] = ()
    calib: str | None = None            # calibration data (see compiler/analysis/calib_data.py)
    calib_table: str | None = None      # or a table from `tqc calibrate`
    tokenizer: str | None = None
    calib_samples: int | None = 32
    batch_size: int = 8
    max_length: int = 128
    shapes: tuple[str, ...] = ()       # TensorRT profiles for .plan outputs
    allow_table_mismatch: bool = False  # use a calib_table whose model_hash is another model's
    runtime: str = "ort"               # engine of --verify numeric: ort | openvino
    input_map: str | None = None        # --input-map ids=input_ids,mask=attention_mask


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
    target = Target.named(opts.target)  # an unknown name fails here, before anything is read
    source = check_input_path(opts.model)
    # Everything read and written is declared before any work: an output that is (or resolves to) an input,
    # another output, or a device/FIFO is refused here.
    guard.reads_model(source)
    guard.reads_data(opts.calib, "--calib")
    guard.reads(opts.calib_table, "--calib-table")
    guard.reads_tokenizer(opts.tokenizer, opts.calib)
    out = Path(opts.output)
    from tqc.compiler.analysis.calib_data import parse_input_map

    input_map = parse_input_map(opts.input_map)  # a malformed map fails before anything is loaded
    is_plan = out.suffix == ".plan"
    if is_plan:
        guard.writes(out, "-o")
        guard.writes(out.with_name(out.name + ".json"), "the plan's metadata")
    elif out.suffix == ".xml":  # OpenVINO IR: the .xml and its .bin weights
        guard.writes(out, "-o")
        guard.writes(out.with_suffix(".bin"), "the IR's weights (.bin)")
        guard.writes(out.with_name(out.name + ".json"), "the IR's metadata")
    else:
        guard.writes_model(out, "-o")
    guard.writes(opts.report, "--report")
    if opts.calib and opts.calib_table:
        raise TqcError("give either --calib or --calib-table, not both")
    passes = parse_pipeline(opts.pipeline)
    guard.writes_into(opts.dump_dir, dump_file_names(passes), "--dump-dir")
    if is_plan:
        from tqc.compiler.core.profiles import parse_shapes
        from tqc.compiler.tools.trt import require_tensorrt

        parse_shapes(opts.shapes)  # a malformed --shapes fails before anything runs
        require_tensorrt()
    elif out.suffix == ".xml":
        from tqc.compiler.io.openvino_ir import require_openvino

        require_openvino()  # missing OpenVINO fails before anything runs
        if target.contrib_ops:
            raise TqcError(f"OpenVINO IR output needs --target openvino (or trt): --target {opts.target} writes "
                           "com.microsoft ops that OpenVINO cannot read")
    elif out.suffix != ".onnx":
        raise TqcError(f"output '{out}' must end in .onnx, .plan (TensorRT) or .xml (OpenVINO IR)")
    progress(f"loading {source}")
    hash_thread = model_hash_async(source)  # in a thread, next to the load and the first passes
    lean = load_model_lean(source)  # the weights are read once, into the arrays the passes work on
    external = list(lean.external_locations)

    def hashing() -> str:
        return hash_thread(external)

    model = lean.skeleton
    if is_plan:
        from tqc.compiler.core.profiles import parse_shapes

        dynamic = [i.name for i in model.graph.input if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
        given = set(parse_shapes(opts.shapes))
        missing = [n for n in dynamic if n not in given and "*" not in given]
        if missing:  # refused before any pass runs (and before anything is written)
            raise TqcError(f"a .plan output needs --shapes for every dynamic input; missing: {', '.join(missing)} "
                           f"(e.g. --shapes {missing[0]}:1x16,8x128,32x512)")
    from tqc.passes.registry import get_pass

    for name in opts.explain:
        get_pass(name)  # unknown names get the did-you-mean error
    ctx = PassContext(target=target, explain=set(opts.explain))  # the manager gives it the progress
    if opts.shapes:  # the profiles' max sequence also decides qdq's INT8 attention placement
        from tqc.compiler.core.profiles import parse_shapes

        ctx.shapes = parse_shapes(opts.shapes)
    if opts.calib and opts.calib_table:
        raise TqcError("give either --calib or --calib-table, not both")
    if opts.calib:
        from tqc.compiler.analysis.calib_data import DataSpec, FeedSource

        ctx.calibration_source = FeedSource(
            DataSpec(opts.calib, tokenizer=opts.tokenizer, samples=opts.calib_samples, batch_size=opts.batch_size,
                     max_length=opts.max_length, input_map=input_map), model)
    elif opts.calib_table:
        from tqc.compiler.analysis.calibration import CalibrationTable

        ctx.calibration = CalibrationTable.load(opts.calib_table)
        from tqc.compiler.analysis.table_check import check_table_matches

        check_table_matches(ctx.calibration, opts.calib_table, source, hashing, model, opts.allow_table_mismatch,
                            progress)
    if opts.runtime == "openvino" and opts.verify == "numeric":
        from tqc.compiler.io.openvino_ir import require_openvino

        require_openvino()
    elif opts.runtime not in ("ort", "openvino"):
        raise TqcError(f"--runtime must be ort or openvino, got '{opts.runtime}'")
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
    elif out.suffix == ".xml":
        from tqc.compiler.io.openvino_ir import write_ir

        result = manager.run_lean(lean)
        source_hash = hashing()
        write_ir(result, out, source_hash=source_hash, progress=progress)
        nodes_out = len(result.skeleton.graph.node)
    else:
        result = manager.run_lean(lean)  # written straight from the graph's arrays: no export, no copy
        save_model(result, out)
        source_hash = hashing()
        nodes_out = len(result.skeleton.graph.node)
    report = manager.report(
        input={"path": str(source), "hash": source_hash, "nodes": nodes_in},
        output={"path": str(out), "nodes": nodes_out},
        total_seconds=round(time.perf_counter() - start, 4),
    )
    if opts.report:
        write_text_atomic(json.dumps(report, indent=2, default=str) + "\n", opts.report)
    return report
