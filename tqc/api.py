"""The Python API: ``tqc compile``, ``tqc diff`` and ``tqc export`` as functions, with the CLI's defaults and checks.

    tqc.compile(model_or_path, passes, target=..., calib=...)  -> CompileResult: .model, .report, .save(path)
    tqc.PassManager(passes, target=..., calib=...)(model)      -> the same, as onnx_ir's PassManager is called
    tqc.diff(reference, candidate, data=...)                   -> DiffResult: .cosine, .outputs, .layers, print()
    tqc.export(source, path, ...)                              -> the export's summary

``passes`` is pipeline text (``"fold,fuse,qdq{method=percentile}"``, the CLI's grammar) or a list of pass
objects (``tqc.passes.Fold()``, ...; pipeline text items may be mixed in). Calibration and comparison data
(``calib``, ``data``) is a path as the CLI takes it (``.npz``, polygraphy ``.json``, ``.txt``,
``script.py:function``), a list of texts (tokenized with the tokenizer the export recorded, or
``tokenizer=``), a dict of arrays (input name -> array, batch on axis 0), or any iterable of such dicts.

Everything runs through the layers below (``compiler/tools/compile.py``, ``compiler/tools/diff.py``,
``compiler/analysis/calib_data.py``, ``models/export.py``), the same code the CLI runs: the same pipeline on the
same file gives the same bytes. Mistakes raise ``TqcError`` with the line the CLI prints after ``tqc: error:``;
a pass that changes the model's answer beyond its tolerance raises ``VerificationError``. Files are written
through the output guard: atomically, and never over a file the call reads.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import onnx

from tqc.compiler.analysis.calib_data import DataSpec, comparison_feeds, in_memory, parse_input_map
from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import DEFAULT_TARGET
from tqc.compiler.io import output_guard
from tqc.compiler.io.lean import LeanModel, lean_of_model, model_of_lean
from tqc.compiler.io.model import check_input_path, load_model_lean, model_hash_async
from tqc.compiler.io.model_check import validate_model
from tqc.compiler.pipeline.manager import PassManager as _Manager
from tqc.compiler.pipeline.spec import parse_pipeline
from tqc.compiler.tools import diff as diffing
from tqc.compiler.tools.compile import (CompileOptions, check_choices, check_output_format, check_plan_shapes,
                                        declare_inputs, declare_output, dump_file_names, format_report,
                                        note_cuda_graphs, pass_context, write_output)
from tqc.passes.base import Pass

PathLike = Union[str, "os.PathLike[str]"]
Feed = Mapping[str, Any]
# A path, a list of texts, a dict of arrays (input name -> array, batch on axis 0), or an iterable of such dicts.
Data = Union[PathLike, Sequence[str], Mapping[str, Any], Iterable[Feed]]
Progress = Union[Callable[[str], None], bool, None]

IN_MEMORY = "<onnx.ModelProto>"  # how error lines and the report name a model given as an object


# ---------------------------------------------------------------- compile

class CompileReport(dict):
    """The compile report: the dict ``tqc compile --report`` writes (stages with their stats, time and
    verification numbers, notes, input and output), printed as ``tqc compile`` prints it."""

    def __str__(self) -> str:
        return format_report(self)

    def to_json(self) -> str:
        """The text ``tqc compile --report R.json`` writes."""
        import json

        return json.dumps(self, indent=2, default=str) + "\n"


class CompileResult:
    """A compiled model: ``model`` (an ``onnx.ModelProto``, built on first use), ``report`` and ``save``.

    The result keeps the model as the pipeline left it (its structure plus one array per weight); ``save``
    writes that, so ``result.save(p)`` gives the bytes ``tqc compile -o p`` gives."""

    def __init__(self, lean: LeanModel, report: CompileReport, inputs: "_Inputs", target: str,
                 shapes: tuple[str, ...], source_hash: str | None, progress: Callable[[str], None]):
        self._lean = lean
        self._model: onnx.ModelProto | None = None
        self.report = report
        self._inputs = inputs
        self._target = target
        self._shapes = shapes
        self._source_hash = source_hash
        self._progress = progress

    @property
    def model(self) -> onnx.ModelProto:
        """The compiled model as an ``onnx.ModelProto`` (weights copied in once, on first use)."""
        if self._model is None:
            self._model = model_of_lean(self._lean)
        return self._model

    @property
    def modified(self) -> bool:
        """Whether any pass changed the graph."""
        return any(stage["modified"] for stage in self.report["stages"])

    def save(self, path: PathLike) -> Path:
        """Write the compiled model to ``path`` and return it: ``.onnx`` (external data ``<name>.data`` above
        2 GB), ``.xml`` (OpenVINO IR, + ``.bin``) or ``.plan`` (TensorRT). Atomic (all files or none), and
        refused in one line when ``path`` is (or resolves to) a file the compile read: the input model or its
        external data, the calibration data or table, the tokenizer."""
        with output_guard.command("save") as guard:
            self._inputs.declare(guard)
            out = declare_output(guard, os.fspath(path), "the output")
            check_output_format(out, self._target, self._shapes)
            if out.suffix == ".plan":
                check_plan_shapes(self._lean.skeleton, self._shapes)
            write_output(self._lean, out, self._source_hash, self._shapes, progress=self._progress)
        self.report["output"]["path"] = str(out)
        return out

    def __repr__(self) -> str:
        return (f"<CompileResult {self.report['pipeline']} for {self.report['target']}: nodes "
                f"{self.report['input']['nodes']} -> {self.report['output']['nodes']}>")


class _Inputs:
    """What a compile read (the model file, calibration data or table, tokenizer), declared again to the output
    guard by ``save`` so that no output lands on any of it."""

    def __init__(self, model: Path | None, calib: str | None, calib_table: str | None, tokenizer: str | None,
                 texts: bool):
        self.model, self.calib, self.calib_table = model, calib, calib_table
        self.tokenizer, self.texts = tokenizer, texts

    def declare(self, guard) -> None:
        declare_inputs(guard, self.model, self.calib, self.calib_table, self.tokenizer)
        if self.texts and not self.tokenizer:
            guard.reads_packaged_model()  # texts may be tokenized with the packaged MiniLM's tokenizer


class PassManager:
    """A pipeline and its settings, called on a model (as ``onnx_ir.passes.PassManager``)::

        manager = tqc.PassManager([Fold(), Fuse(), Qdq()], target="ort-cpu", calib=sentences)
        result = manager("minilm.onnx")            # a CompileResult; the manager can run on other models

    Every pass is verified after it runs (``verify="numeric"`` by default, as the CLI: outputs before and after
    on ONNX Runtime CPU, at the pass's tolerance; ``"structure"`` checks only the graph; ``"none"``). The
    settings are checked here, before any model is read. ``tqc.compile`` documents each one."""

    def __init__(self, passes: str | Sequence[Pass | str], *, target: str = DEFAULT_TARGET, calib: Data | None = None,
                 calib_table: PathLike | None = None, tokenizer: PathLike | None = None,
                 calib_samples: int | None = CompileOptions.calib_samples, batch_size: int = CompileOptions.batch_size,
                 max_length: int | None = CompileOptions.max_length, input_map: str | Mapping[str, str] | None = None,
                 verify: str = CompileOptions.verify, runtime: str = CompileOptions.runtime,
                 explain: str | Sequence[str] = (), shapes: str | Sequence[str] = (), dump_dir: PathLike | None = None,
                 allow_table_mismatch: bool = False, progress: Progress = None):
        self.passes = pipeline(passes)
        check_choices(target, verify, runtime)
        if calib is not None and calib_table is not None:
            raise TqcError("give either calib or calib_table, not both")
        self.target, self.verify, self.runtime = target, verify, runtime
        self.calib = data_spec(calib, "calib", tokenizer=tokenizer, samples=calib_samples, batch_size=batch_size,
                               max_length=max_length, input_map=input_map)
        self.calib_table = os.fspath(calib_table) if calib_table is not None else None
        self.tokenizer = os.fspath(tokenizer) if tokenizer is not None else None
        self.explain = (explain,) if isinstance(explain, str) else tuple(explain)
        self.shapes = (shapes,) if isinstance(shapes, str) else tuple(shapes)
        if self.shapes:
            from tqc.compiler.core.profiles import parse_shapes

            parse_shapes(self.shapes)  # malformed profiles fail here
        self.dump_dir = os.fspath(dump_dir) if dump_dir is not None else None
        self.allow_table_mismatch = allow_table_mismatch
        self.progress = progress_function(progress)

    def __call__(self, model: onnx.ModelProto | PathLike) -> CompileResult:
        """Compile ``model`` (an ``onnx.ModelProto``, left unchanged, or a path: external data is read from beside
        it) and return the result; nothing is written but ``dump_dir``'s files."""
        start = time.perf_counter()
        calib_path = self.calib.path if self.calib is not None else None
        texts = self.calib is not None and self.calib.data is not None and not isinstance(self.calib.data, Mapping) \
            and all(isinstance(item, str) for item in self.calib.data)
        with output_guard.command("compile") as guard:
            source = check_input_path(model) if isinstance(model, (str, os.PathLike)) else None
            inputs = _Inputs(source, calib_path, self.calib_table, self.tokenizer, texts)
            inputs.declare(guard)
            passes = [_fresh(p) for p in self.passes]  # a pass object given twice keeps no state between runs
            guard.writes_into(self.dump_dir, dump_file_names(passes), "dump_dir")
            lean, hashing = _lean_input(model, source, self.progress)
            skeleton = lean.skeleton
            ctx = pass_context(skeleton, target=self.target, explain=self.explain, shapes=self.shapes,
                               calib=copy.copy(self.calib), calib_table=self.calib_table,
                               model_path=source or IN_MEMORY, hashing=hashing,
                               allow_table_mismatch=self.allow_table_mismatch, progress=self.progress)
            if self.runtime == "openvino" and self.verify == "numeric":
                from tqc.compiler.io.openvino_ir import require_openvino

                require_openvino()
            manager = _Manager(passes, ctx, verify=self.verify, dump_dir=self.dump_dir, progress=self.progress,
                               runtime=self.runtime)
            nodes_in = len(skeleton.graph.node)
            result = manager.run_lean(lean)
            if ctx.target.cuda_graphs:
                note_cuda_graphs(result.skeleton, ctx)  # as tqc compile: can the output capture CUDA graphs
            source_hash = hashing() if source is not None else None
            report = manager.report(
                input={"path": str(source) if source is not None else IN_MEMORY, "hash": source_hash,
                       "nodes": nodes_in},
                output={"path": None, "nodes": len(result.skeleton.graph.node)},
                total_seconds=round(time.perf_counter() - start, 4),
            )
        return CompileResult(result, CompileReport(report), inputs, self.target, self.shapes, source_hash,
                             self.progress)

    def __repr__(self) -> str:
        return f"PassManager({self.passes!r}, target={self.target!r}, verify={self.verify!r})"


def compile(model: onnx.ModelProto | PathLike, passes: str | Sequence[Pass | str], *, target: str = DEFAULT_TARGET,
            calib: Data | None = None, calib_table: PathLike | None = None, tokenizer: PathLike | None = None,
            calib_samples: int | None = CompileOptions.calib_samples, batch_size: int = CompileOptions.batch_size,
            max_length: int | None = CompileOptions.max_length, input_map: str | Mapping[str, str] | None = None,
            verify: str = CompileOptions.verify, runtime: str = CompileOptions.runtime,
            explain: str | Sequence[str] = (), shapes: str | Sequence[str] = (), dump_dir: PathLike | None = None,
            allow_table_mismatch: bool = False, progress: Progress = None) -> CompileResult:
    """Run ``passes`` on ``model``, verifying after every pass, as ``tqc compile`` does; nothing is written
    until ``result.save(path)``.

    model           an ``onnx.ModelProto`` (not changed) or a path (external data beside it is read)
    passes          pipeline text (``"fold,fuse,qdq{method=percentile}"``) or a list of pass objects
                    (``[Fold(), Fuse(), Qdq(smooth=0.5)]``; text items allowed)
    target          trt (the CLI's default), ort-cpu, ort-cuda or openvino: what the passes write for
    calib           calibration data for ``qdq``: a path (.npz, polygraphy .json, .txt, script.py:function),
                    a list of texts, a dict of arrays (input name -> array, batch on axis 0), or an iterable
                    of such dicts (a generator is read once, up to ``calib_samples`` rows)
    calib_table     or a table from ``tqc calibrate`` (checked against the model's hash)
    tokenizer       tokenizer folder for texts (default: the one the export recorded)
    calib_samples   samples used (32), ``batch_size`` (8) per calibration batch, ``max_length`` tokens per
                    text (the CLI's default: 128, or the model's positions when fewer)
    input_map       which data feeds which input where the graph cannot tell: {"ids": "input_ids"} or the
                    CLI's text ``"ids=input_ids,mask=attention_mask"``
    verify          "numeric" (default, as the CLI), "structure" or "none"
    runtime         engine of the numeric check: "ort" (ONNX Runtime CPU) or "openvino"
    explain         pass names whose misses are noted in the report (``"fuse"``)
    shapes          TensorRT profiles (``"input_ids:1x16,8x128,32x512"``): for ``.plan`` outputs and qdq's
                    INT8 attention placement
    dump_dir        write every stage, its report, inputs and outputs there
    progress        a function taking progress lines, or True to print them on stderr

    Raises ``TqcError`` (one line) on a mistake, ``VerificationError`` when a pass changes the answer.
    """
    return PassManager(passes, target=target, calib=calib, calib_table=calib_table, tokenizer=tokenizer,
                       calib_samples=calib_samples, batch_size=batch_size, max_length=max_length,
                       input_map=input_map, verify=verify, runtime=runtime, explain=explain, shapes=shapes,
                       dump_dir=dump_dir, allow_table_mismatch=allow_table_mismatch, progress=progress)(model)


def pipeline(passes: str | Sequence[Pass | str]) -> list[Pass]:
    """Pass objects from pipeline text or a list of pass objects (and text items); one line on anything else."""
    if isinstance(passes, str):
        return parse_pipeline(passes)
    if isinstance(passes, Pass):
        return [passes]
    if not isinstance(passes, (list, tuple)):
        raise TqcError(f"passes must be pipeline text ('fold,fuse,qdq') or a list of passes, got "
                       f"{type(passes).__name__}")
    found: list[Pass] = []
    for index, item in enumerate(passes):
        if isinstance(item, Pass):
            found.append(item)
        elif isinstance(item, str):
            found += parse_pipeline(item)
        elif isinstance(item, type) and issubclass(item, Pass):
            raise TqcError(f"passes[{index}] is the class {item.__name__}: give an instance, {item.__name__}()")
        else:
            raise TqcError(f"passes[{index}] is {type(item).__name__}, not a pass (tqc.passes.Fold(), ...) or "
                           "pipeline text")
    if not found:
        raise TqcError("empty pipeline: give passes, e.g. [Fold()] or 'fold'")
    return found


def _fresh(p: Pass) -> Pass:
    """A copy of a pass object for one run, with its own option values (working state is set per run)."""
    fresh = copy.copy(p)
    fresh.values = dict(p.values)
    return fresh


def _lean_input(model, source: Path | None, progress: Callable[[str], None]):
    """(LeanModel, hashing) of a compile's input: a file read as ``tqc compile`` reads it (hash in a thread),
    or a ModelProto split the same way (and validated as a loaded file is)."""
    if source is not None:
        progress(f"loading {source}")
        hash_thread = model_hash_async(source)
        lean = load_model_lean(source)
        external = list(lean.external_locations)
        return lean, lambda: hash_thread(external)
    if not isinstance(model, onnx.ModelProto):
        raise TqcError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")
    lean = lean_of_model(model)
    validate_model(lean.skeleton, IN_MEMORY)

    def hashing() -> str:  # what a calibration table names: the model's bytes as tqc writes them
        import hashlib

        from tqc.compiler.io.model import serialize

        return "sha256:" + hashlib.sha256(serialize(model)).hexdigest()

    return lean, hashing


# ---------------------------------------------------------------- data

def data_spec(data: Data | None, label: str, *, tokenizer: PathLike | None, samples: int | None, batch_size: int,
              max_length: int | None, input_map: str | Mapping[str, str] | None) -> DataSpec | None:
    """A ``DataSpec`` for calibration or comparison data given from Python (see ``Data``); the counts are
    checked as the CLI's options are (at least 1)."""
    if samples is not None:
        _count(samples, f"{label}_samples" if label == "calib" else "samples")
    _count(batch_size, "batch_size")
    if max_length is not None:  # None: the CLI's default when --max-length is left out
        _count(max_length, "max_length")
    if data is None:
        return None
    mapping = _input_map(input_map)
    tokenizer = os.fspath(tokenizer) if tokenizer is not None else None
    if isinstance(data, (str, os.PathLike)):
        return DataSpec(os.fspath(data), tokenizer=tokenizer, samples=samples, batch_size=batch_size,
                        max_length=max_length, input_map=mapping)
    spec = DataSpec(None, tokenizer=tokenizer, samples=samples, batch_size=batch_size, max_length=max_length,
                    input_map=mapping, data=data, label=label)
    # Read once, here: its form is checked before any model is read, and a generator serves every run of a
    # PassManager (up to ``samples`` rows of it are kept).
    _, spec.data = in_memory(spec)
    return spec


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TqcError(f"Invalid value for '{name}': {value!r} is not in the range x>=1")
    return int(value)


def _input_map(value: str | Mapping[str, str] | None) -> dict[str, str] | None:
    if value is None or isinstance(value, str):
        return parse_input_map(value)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TqcError("input_map takes {model input: tokenizer output or array name} (texts), or "
                       "'ids=input_ids,mask=attention_mask'")
    return dict(value) or None


def progress_function(progress: Progress) -> Callable[[str], None]:
    """None/False: silent; True: lines on stderr with the elapsed time (as the CLI prints them); a function."""
    if progress is None or progress is False:
        return lambda message: None
    if progress is True:
        start = time.perf_counter()
        return lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr)
    if not callable(progress):
        raise TqcError(f"progress must be a function, True or None, got {type(progress).__name__}")
    return progress


# ---------------------------------------------------------------- diff

class DiffResult:
    """Where a candidate parts ways with its reference: the numbers ``tqc diff`` prints.

    ``cosine``            the lowest output cosine (worst output, worst batch): 1.0 is identical
    ``outputs``           output name -> metrics (``max_abs``, ``mean_abs``, ``rel_l2``, ``cosine``, ``sqnr_db``)
    ``layers``            with ``layerwise=True``: every shared tensor's row, in the reference's order
    ``first_divergence``  the first tensor whose relative L2 error passes ``threshold`` (or None)
    ``inputs``            the batches both models ran on
    ``sensitivity``       with ``sensitivity=True``: the ranking ``tqc diff --sensitivity`` prints
    ``str(result)`` is the table ``tqc diff`` prints; ``as_dict()`` its ``--json`` entry.
    """

    def __init__(self, result: diffing.DiffResult, inputs: list[dict[str, np.ndarray]], layerwise: bool,
                 sensitivity: dict | None = None):
        self._result = result
        self._layerwise = layerwise
        self.inputs = inputs
        self.sensitivity = sensitivity

    @property
    def outputs(self) -> dict:
        return {row.name: row.metrics for row in self._result.outputs}

    @property
    def cosine(self) -> float:
        return min(row.metrics.cosine for row in self._result.outputs)

    @property
    def layers(self) -> list:
        return list(self._result.layers)

    @property
    def first_divergence(self):
        return self._result.first_divergence

    def as_dict(self) -> dict:
        payload = self._result.as_dict()
        if self.sensitivity is not None:
            payload["sensitivity"] = self.sensitivity
        return payload

    def __str__(self) -> str:
        return diffing.format_table([self._result], self._layerwise)

    def __repr__(self) -> str:
        return f"<DiffResult {self._result.candidate}: output cosine {self.cosine:.6f}>"


def diff(reference: onnx.ModelProto | PathLike, candidate: onnx.ModelProto | PathLike, *, data: Data | None = None,
         layerwise: bool = False, threshold: float = 0.05, tokenizer: PathLike | None = None, samples: int = 16,
         batch_size: int = 8, max_length: int | None = CompileOptions.max_length,
         input_map: str | Mapping[str, str] | None = None, mask_padding: bool = True, runtime: str = "ort",
         sensitivity: bool = False, progress: Progress = None) -> DiffResult:
    """Compare ``candidate`` with ``reference`` on the same inputs, as ``tqc diff`` does: the reference on ONNX
    Runtime CPU (optimizations off), the candidate on ``runtime`` ("ort" or "openvino").

    data            what both run on (the forms ``tqc.compile``'s ``calib`` takes; texts are tokenized with
                    the reference's recorded tokenizer or ``tokenizer``); default: two batches drawn from the
                    reference's signature (random token ids)
    layerwise       also compare every float tensor both graphs share by name; ``threshold`` (relative L2)
                    marks the first divergence
    samples         at most this many samples (16), ``batch_size`` (8) per batch
    mask_padding    leave padded token positions out of the numbers (as the CLI)
    sensitivity     rank the candidate's quantized MatMuls by the output error each one costs

    Models are read as ``tqc diff`` reads them (a path) or copied (an ``onnx.ModelProto``: left unchanged).
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold) \
            or threshold < 0:
        raise TqcError(f"Invalid value for 'threshold': {threshold!r} is not a finite number >= 0")
    diffing.check_runtime(runtime, sensitivity)
    spec = data_spec(data, "data", tokenizer=tokenizer, samples=samples, batch_size=batch_size,
                     max_length=max_length, input_map=input_map)
    report = progress_function(progress)
    ref_side, (cand_side,) = diffing.prepare(_diff_side(reference, "reference"), [_diff_side(candidate, "candidate")])
    feeds = comparison_feeds(ref_side.skeleton, spec)
    report(f"comparing {cand_side.name} with {ref_side.name}" + (" tensor by tensor" if layerwise else ""))
    result, _, _ = diffing.diff(ref_side, cand_side, feeds, layerwise=layerwise, threshold=threshold,
                                candidate_name=cand_side.name, mask_padding=mask_padding, runtime=runtime)
    ranking = diffing.sensitivity(ref_side.source, cand_side.source, feeds, progress=report) if sensitivity else None
    return DiffResult(result, feeds, layerwise, ranking)


def _diff_side(model: onnx.ModelProto | PathLike, role: str) -> diffing.Side:
    """One side of a diff, as the CLI reads it: a path as a checked skeleton whose weights are read only for
    its own run (one model's weights in memory at a time), or a copy of an object (left unchanged)."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        check_input_path(path)
        return diffing.Side.of(path, path)
    if not isinstance(model, onnx.ModelProto):
        raise TqcError(f"the {role} must be an onnx.ModelProto or a path, got {type(model).__name__}")
    copied = onnx.ModelProto()
    copied.CopyFrom(model)  # diffing adds shape information to the graph: the caller's model stays as it was
    validate_model(copied, f"<{role}: onnx.ModelProto>")
    return diffing.Side.of(copied, role)


# ---------------------------------------------------------------- export

def export(source: str | os.PathLike, path: PathLike, *, exporter: str = "legacy", attn: str | None = None,
           opset: int | None = None, size: str | None = None, seed: int = 0, task: str | None = None,
           progress: Progress = None) -> dict[str, Any]:
    """Export ``source`` to FP32 ONNX at ``path``, as ``tqc export`` does, and return its summary (source,
    output, exporter, attn, opset, nodes, inputs, outputs, notes).

    source      "minilm" (the packaged all-MiniLM-L6-v2, real weights), a family ("bert", "roberta", ...;
                "-tiny" for a test config; random weights, ``seed``), a config.json, or a local model folder
    exporter    "legacy" (TorchScript) or "dynamo" (torch.export); ``attn`` "sdpa" or "eager" (default: sdpa
                where transformers has it for the family, else eager)
    opset       default 17 (legacy) or 18 (dynamo); legacy 7-20, dynamo 18-23
    size        for family names: "base" or "tiny"
    task        the head to export (default: what config.json names; feature-extraction)

    The file is written atomically, never over the source; nothing is downloaded (a hub name is refused).
    Needs ``pip install 'tqc[export]'`` (torch, transformers).
    """
    from tqc.models.export import ExportSpec, export_guarded

    spec = ExportSpec(os.fspath(source), exporter=exporter, attn=attn, opset=opset, size=size, seed=seed, task=task)
    return export_guarded(spec, os.fspath(path), progress=progress_function(progress), what="the output")
