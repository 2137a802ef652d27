"""Runs a pipeline of passes and verifies the graph after every one.

    input ─► pass 1 ─► verify ─► pass 2 ─► verify ─► ... ─► output
                        │ structure: onnx checker, strict shape inference, same inputs/outputs (or exactly
                        │            the output change the pass declares: PassResult.removed/added_outputs)
                        │ numeric:   ORT CPU (optimizations off) before vs after, polygraphy Comparator,
                        │            exact-name output matching, the pass's tolerance; an added output
                        │            against its reference, computed from the outputs of the stage before
                        └ --dump-dir: NN_<pass>.onnx, its report and outputs, inputs.json

``numeric`` is the default (the CLI's and the Python API's): the inputs are a few small batches drawn within the model's limits
(``feeds.verification_feeds``: token ids below the vocabulary, sequences within the position table, two
batch x sequence shapes, padded rows), and without ``--dump-dir`` each stage runs as the graph itself
(``GraphSession``: the skeleton plus the graph's own arrays, no export, no weight copy), so the check costs a
session and a few small runs per pass. ``--verify structure`` is the explicit opt-out.

When a numeric check fails, the manager saves the stage after the pass (and the one before, where it was
exported), the inputs and the reference outputs in polygraphy's formats and raises a ``VerificationError``
whose reproducer is the ``polygraphy run`` command that shows the same failure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from tqc.version import __version__
from tqc.compiler.runtime import compare
from tqc.compiler.core.errors import TqcError, VerificationError
from tqc.compiler.runtime.feeds import verification_feeds
from tqc.compiler.io.graph import (lean_of_graph, set_metadata, skeleton_of_graph, to_graph, to_model,
                                   update_tensor_types)
from tqc.compiler.io.lean import LeanModel
from tqc.compiler.io.model import save_model, write_text_atomic
from tqc.compiler.io.output_guard import reproducer_dir, write_with
from tqc.compiler.io.structure import changed_signature, infer_shapes, signature, verify_structure
from tqc.compiler.io.skeleton import model_header
from tqc.passes.base import AddedOutput, Pass, PassContext, Tolerance, check_conditions

VERIFY_LEVELS = ("none", "structure", "numeric")

Progress = Callable[[str], None]


@dataclass
class StageRecord:
    index: int
    name: str
    spec: str
    modified: bool
    seconds: float
    stats: dict[str, Any]
    verify: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"index": self.index, "pass": self.name, "spec": self.spec, "modified": self.modified,
                "seconds": round(self.seconds, 4), "stats": self.stats, "verify": self.verify}


def derived_results(previous, feeds, removed: tuple[str, ...], added: tuple[AddedOutput, ...]):
    """The reference of a pass that changes the graph's outputs: per verification input, the outputs before it
    that stay, plus each added output's reference computed from the outputs before (polygraphy RunResults, so
    that the reproducer compares against exactly this)."""
    import numpy as np
    from polygraphy.comparator import IterationResult, RunResults

    name, iterations = list(previous.items())[0]
    derived = []
    for iteration, feed in zip(iterations, feeds):
        outputs = {k: v for k, v in iteration.items() if k not in removed}
        before = dict(iteration.items())
        for output in added:
            outputs[output.name] = np.asarray(output.reference(before, feed))
        derived.append(IterationResult(outputs, runner_name=name))
    return RunResults([(name, derived)])


class PassManager:
    def __init__(self, passes: list[Pass], ctx: PassContext | None = None, verify: str = "numeric",
                 dump_dir: str | Path | None = None, progress: Progress | None = None, runtime: str = "ort"):
        if verify not in VERIFY_LEVELS:
            raise TqcError(f"--verify must be one of {', '.join(VERIFY_LEVELS)}")
        self.passes = passes
        self.ctx = ctx or PassContext()
        if progress is not None:
            self.ctx.progress = progress
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.progress = progress or (lambda message: None)
        self.records: list[StageRecord] = []
        self.runtime = runtime  # numeric verification runs on ORT CPU (optimizations off) or OpenVINO CPU (FP32)

    def _check_context(self) -> None:
        """Every pass's context conditions (what the pipeline must be given), before any pass runs."""
        for p in self.passes:
            check_conditions(p.requires, None, self.ctx, p.name, "requires", on="context")

    def run(self, model: onnx.ModelProto | LeanModel) -> onnx.ModelProto:
        """Run the pipeline on ``model``. A ``LeanModel``'s weights move into the manager's graph."""
        graph, like = self._run_graph(model)
        return infer_shapes(to_model(graph, like=like), strict=False)

    def run_lean(self, model: onnx.ModelProto | LeanModel) -> LeanModel:
        """``run``, with the result as a skeleton plus the graph's own arrays: nothing is exported or copied,
        and ``tqc.compiler.io.lean`` writes it straight to a file."""
        graph, like = self._run_graph(model)
        lean = lean_of_graph(graph, like=like)
        if lean is None:
            model = to_model(graph, like=like)
            lean = LeanModel(model)  # nothing to stream: a plain model
        infer_shapes(lean.skeleton, strict=False)
        return lean

    def _run_graph(self, model: onnx.ModelProto | LeanModel) -> tuple:
        self._check_context()
        lean = model if isinstance(model, LeanModel) else None
        if lean is not None:
            model = lean.skeleton
        expected = signature(model)
        current = infer_shapes(model, strict=False)
        # One graph travels through every pass. After each pass the checker and strict shape inference run
        # on a skeleton (weights as shape-only stand-ins); the full model is exported only where it is run
        # (numeric verification) or written (dumps, the final result).
        graph = to_graph(current, lean.weights if lean is not None else None)
        like = signed = current  # the input as read (a skeleton for a lean load): what verification inputs fit
        # Numeric checks run the graph itself (GraphSession) unless stages are dumped anyway.
        # OpenVINO (--runtime openvino) reads exported models only.
        full_needed = self.dump_dir is not None or (self.verify == "numeric" and self.runtime == "openvino")
        if lean is not None:
            lean.weights = {}  # the graph holds them now
            like = model_header(current)
            current = to_model(graph, like=like) if full_needed else None
        elif not full_needed:
            current = None  # stages are not exported: the graph itself runs
        self._like = like
        feeds = None
        previous_results = None
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump_model(current, 0, "input")
        if self.verify == "numeric":
            # The first batches of the pipeline's calibration data when it has any: a quantized stage is then
            # judged on inputs like those it will see, not on random token ids (a tiny classifier's logits can
            # lose 0.02 cosine on random ids and none on real text).
            feeds = self.ctx.verification_feeds or self.ctx.calibration_batches(count=2, rows=4) or None
            given = feeds is not None
            feeds = feeds or verification_feeds(signed)
            self.progress("verify: reference run on " + ("OpenVINO CPU (FP32)" if self.runtime == "openvino" else
                                                         "ORT CPU (optimizations off)"))
            feeds, previous_results = self._reference_run(graph, like, current, feeds, given)
            self.ctx.verification_feeds = feeds
            if self.dump_dir:
                self._dump_io(feeds, previous_results, 0, "input")
        for index, p in enumerate(self.passes, start=1):
            stage = f"{index:02d}_{p.name}"
            self.progress(f"[{index}/{len(self.passes)}] {p.spec()}")
            check_conditions(p.requires, graph, self.ctx, p.name, "requires", on="graph")
            start = time.perf_counter()
            result = p.run(graph, self.ctx)
            seconds = time.perf_counter() - start
            check_conditions(p.ensures, graph, self.ctx, p.name, "ensures", on="graph")
            if result.metadata:  # the written model carries them (to_model copies like's metadata_props)
                set_metadata(like, result.metadata)
            record = StageRecord(index, p.name, p.spec(), result.modified, seconds, dict(result.stats))
            self.records.append(record)
            vstart = time.perf_counter()
            light = skeleton_of_graph(graph, like=like)
            changes_outputs = bool(result.removed_outputs or result.added_outputs)
            if changes_outputs:  # the promised new outputs, checked whatever the verify level
                expected = changed_signature(expected, signature(light), tuple(result.removed_outputs),
                                             tuple(a.name for a in result.added_outputs), stage)
                record.verify["outputs"] = {"removed": list(result.removed_outputs),
                                            "added": {a.name: a.describe for a in result.added_outputs}}
            if self.verify != "none":
                light = verify_structure(light, expected, stage)
                record.verify["structure"] = "ok"
            else:
                light = infer_shapes(light, strict=False)
            update_tensor_types(graph, light)
            candidate = to_model(graph, like=like) if full_needed else None
            if self.dump_dir:
                self._dump_model(candidate, index, p.name)
            if self.verify == "numeric":
                self.progress(f"      verify numeric ({len(feeds)} batches)")
                if changes_outputs:  # the new outputs against their references, computed from the stage before
                    previous_results = derived_results(previous_results, feeds, result.removed_outputs,
                                                       result.added_outputs)
                previous_results = self._verify_numeric(p, result.tolerance or p.tolerance, current, candidate, feeds,
                                                        previous_results, index, record, graph)
            if self.verify != "none":
                record.verify["seconds"] = round(time.perf_counter() - vstart, 4)
            if self.dump_dir:
                write_text_atomic(json.dumps(record.as_dict(), indent=2, default=str),
                                  self.dump_dir / f"{stage}.report.json")
            if candidate is not None:
                current = candidate
        return graph, like

    def _reference_run(self, graph, like, model: onnx.ModelProto | None, feeds, given: bool):
        """The input graph's outputs on the verification inputs. A graph that cannot run at every drawn shape
        (a constant that fixes the sequence length, say) is checked on the first shape only, with a note; one
        that runs on none is a user error: the inputs cannot be drawn, --verify structure skips the check."""
        tried = [feeds] if given or len(feeds) == 1 else [feeds, feeds[:1]]
        for attempt, candidate in enumerate(tried):
            try:
                results = self._run_stage(graph, like, model, candidate, "00_input")
            except Exception as exc:  # ORT's own failure on the input model
                message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                if attempt + 1 < len(tried):
                    continue
                raise TqcError(f"numeric verification: the input model does not run on ONNX Runtime CPU with "
                               f"inputs drawn from its signature ({message}); give --verify structure to skip "
                               f"the numeric check") from exc
            if attempt:
                shape = "x".join(str(d) for d in next(iter(candidate[0].values())).shape[:2])
                self.ctx.messages.append(f"numeric verification on batch x sequence {shape} only: the input "
                                         f"model does not run at the other drawn shapes")
            return candidate, results
        raise AssertionError("unreachable")

    def _run_stage(self, graph, like, model: onnx.ModelProto | None, feeds, name: str):
        """The stage's outputs on ``feeds`` as polygraphy RunResults: the exported model when there is one,
        else the graph itself through a GraphSession (no export, no copy of its weights)."""
        if model is not None:
            return compare.run_model(model, feeds, name=name, runtime=self.runtime)
        from polygraphy.comparator import IterationResult, RunResults

        from tqc.compiler.runtime.graph_session import GraphSession

        session = GraphSession(graph, like=like)
        names = session.output_names
        iterations = [IterationResult(dict(zip(names, session.run(names, feed))), runner_name=name)
                      for feed in feeds]
        return RunResults([(name, iterations)])

    def _verify_numeric(self, p: Pass, tol: Tolerance, before: onnx.ModelProto | None, after: onnx.ModelProto | None,
                        feeds, previous_results, index: int, record: StageRecord, graph=None):
        stage = f"{index:02d}_{p.name}"
        try:
            results = self._run_stage(graph, self._like, after, feeds, stage)
        except TqcError as exc:
            if self.runtime != "openvino":
                raise
            raise VerificationError(f"{stage}: {exc}") from exc
        except Exception as exc:  # ORT refusing the graph is the pass's fault, reported like any failed check
            from tqc.compiler.io.model import save_model as _save

            after = after if after is not None else to_model(graph, like=self._like)
            folder = self.dump_dir or reproducer_dir()
            _save(after, Path(folder) / f"{stage}.onnx")
            raise VerificationError(f"{stage}: ONNX Runtime CPU cannot run the graph after the pass: "
                                    f"{str(exc).strip().splitlines()[0][:300]}",
                                    reproducer=f"polygraphy run {Path(folder) / f'{stage}.onnx'} --onnxrt "
                                               f"{compare.ORT_LEVEL_FLAG}") from exc
        ref_pair = list(previous_results.items())[0]
        cand_pair = list(results.items())[0]
        masks = compare.padding_masks(feeds) if tol.min_cosine is not None else None
        outcome = compare.compare_results(ref_pair, cand_pair, atol=tol.atol, rtol=tol.rtol,
                                          min_cosine=tol.min_cosine, masks=masks,
                                          unmasked=compare.fixed_width_outputs(
                                              graph.outputs if graph is not None else after.graph.output))
        record.verify["numeric"] = outcome.as_dict()
        if self.dump_dir:
            self._dump_io(feeds, results, index, p.name)
        if not outcome.passed:
            after = after if after is not None else to_model(graph, like=self._like)
            reproducer = self._write_reproducer(before, after, feeds, previous_results, index, p.name, tol)
            worst = outcome.worst()
            detail = (f"max |diff| {worst.max_abs:.3g} on '{worst.name}' (cosine {worst.cosine:.6f})"
                      if worst else f"outputs missing: {outcome.missing}")
            bound = f"cosine {tol.min_cosine}" if tol.min_cosine is not None else f"atol={tol.atol:g} rtol={tol.rtol:g}"
            raise VerificationError(
                f"{stage}: outputs differ from the graph before the pass beyond {bound}: {detail}",
                reproducer=reproducer)
        return results

    def _write_reproducer(self, before, after, feeds, previous_results, index, name, tol) -> str:
        folder = self.dump_dir or reproducer_dir()
        folder = Path(folder)
        if not self.dump_dir:
            if before is not None:  # the graph before the pass, where it was exported (it changed in place)
                save_model(before, folder / f"{index - 1:02d}_before.onnx")
            save_model(after, folder / f"{index:02d}_{name}.onnx")
        inputs_json = folder / "inputs.json"
        ref_json = folder / f"{index - 1:02d}_reference.outputs.json"
        from polygraphy.json import save_json

        with compare.quiet_polygraphy():
            write_with(inputs_json, lambda tmp: save_json(feeds, tmp))
            write_with(ref_json, lambda tmp: previous_results.save(tmp))
        atol, rtol = (tol.atol, tol.rtol) if tol.min_cosine is None else (0.1, 0.1)
        return compare.polygraphy_command(str(folder / f"{index:02d}_{name}.onnx"), str(inputs_json),
                                          str(ref_json), atol, rtol)

    def _dump_model(self, model: onnx.ModelProto, index: int, name: str) -> None:
        save_model(model, self.dump_dir / f"{index:02d}_{name}.onnx")

    def _dump_io(self, feeds, results, index: int, name: str) -> None:
        from polygraphy.json import save_json

        with compare.quiet_polygraphy():
            if index == 0:
                write_with(self.dump_dir / "inputs.json", lambda tmp: save_json(feeds, tmp))
            write_with(self.dump_dir / f"{index:02d}_{name}.outputs.json", lambda tmp: results.save(tmp))

    def report(self, **extra: Any) -> dict:
        return {
            "tqc_version": __version__,
            "target": self.ctx.target.name,
            "verify": self.verify,
            "pipeline": ",".join(p.spec() for p in self.passes),
            "stages": [r.as_dict() for r in self.records],
            "messages": list(self.ctx.messages),
            **extra,
        }
