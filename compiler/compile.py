"""The compile driver behind ``tqc compile``: check paths, parse, run the manager, write atomically.

Order matters for "bad input loses nothing": every path and the pipeline are checked before any work, and
the output and report are written only after every pass has been verified.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqc.compiler.errors import TqcError
from tqc.compiler.manager import PassManager
from tqc.compiler.model_io import (check_input_path, check_output_path, load_model_lean, model_hash_async, save_model,
                                   write_text_atomic)
from tqc.compiler.pipeline import parse_pipeline
from tqc.passes.base import TARGETS, PassContext


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
    calib: str | None = None            # calibration data (see compiler/calib_data.py)
    calib_table: str | None = None      # or a table from `tqc calibrate`
    tokenizer: str | None = None
    calib_samples: int | None = 32
    batch_size: int = 8
    max_length: int = 128
    shapes: tuple[str, ...] = ()       # TensorRT profiles for .plan outputs
    input_map: str | None = None        # --input-map ids=input_ids,mask=attention_mask


def compile_model(opts: CompileOptions, progress=lambda message: None) -> dict:
    start = time.perf_counter()
    if opts.target not in TARGETS:
        raise TqcError(f"--target must be one of {', '.join(TARGETS)}")
    source = check_input_path(opts.model)
    out = check_output_path(opts.output, inputs=(source,))
    if opts.report:
        check_output_path(opts.report, inputs=(source, out))
    if opts.dump_dir and Path(opts.dump_dir).exists() and not Path(opts.dump_dir).is_dir():
        raise TqcError(f"--dump-dir '{opts.dump_dir}' exists and is not a directory")
    passes = parse_pipeline(opts.pipeline)
    from tqc.compiler.calib_data import parse_input_map

    input_map = parse_input_map(opts.input_map)  # a malformed map fails before anything is loaded
    is_plan = out.suffix == ".plan"
    if is_plan:
        from tqc.compiler.profiles import parse_shapes
        from tqc.compiler.trt import require_tensorrt

        parse_shapes(opts.shapes)  # a malformed --shapes fails before anything runs
        require_tensorrt()
    elif out.suffix != ".onnx":
        raise TqcError(f"output '{out}' must end in .onnx or .plan")
    progress(f"loading {source}")
    hashing = model_hash_async(source)  # in a thread, next to the load and the first passes
    lean = load_model_lean(source)  # the weights are read once, into the arrays the passes work on
    model = lean.skeleton
    from tqc.passes.registry import get_pass

    for name in opts.explain:
        get_pass(name)  # unknown names get the did-you-mean error
    ctx = PassContext(target=opts.target, explain=set(opts.explain))
    if opts.calib and opts.calib_table:
        raise TqcError("give either --calib or --calib-table, not both")
    if opts.calib:
        from tqc.compiler.calib_data import DataSpec, FeedSource

        ctx.analyses["calibration_source"] = FeedSource(
            DataSpec(opts.calib, tokenizer=opts.tokenizer, samples=opts.calib_samples, batch_size=opts.batch_size,
                     max_length=opts.max_length, input_map=input_map), model)
    elif opts.calib_table:
        from tqc.compiler.calibration import CalibrationTable

        ctx.calibration = CalibrationTable.load(opts.calib_table)
    manager = PassManager(passes, ctx, verify=opts.verify, dump_dir=opts.dump_dir, progress=progress)
    nodes_in = len(model.graph.node)
    if is_plan:
        from tqc.compiler.trt import build_plan_from_model

        result = manager.run(lean)
        source_hash = hashing()
        progress("building the TensorRT plan")
        build_plan_from_model(result, out, source_hash=source_hash, shapes=opts.shapes, progress=progress)
        nodes_out = len(result.graph.node)
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
