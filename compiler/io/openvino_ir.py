"""OpenVINO: IR output (``tqc compile -o model.xml``), a runner for bench/diff/verify, runtime precisions.

    compiled graph ─► model.onnx (temporary folder beside the output)
                   ─► ov.convert_model ─► ov.save_model(compress_to_fp16=True, OpenVINO's own default: it
                      compresses float weights of float models, and leaves a Q/DQ model's float weights FP32;
                      INT8 weights stay INT8) ─► model.xml + model.bin (same folder)
                   ─► .bin then .xml renamed into place; model.xml.json: tqc and OpenVINO versions, source hash,
                      inputs/outputs, what ran in INT8 on this machine's CPU (the compiled runtime graph):
                      int8_matmuls = the model's MatMuls whose runtime node takes integer inputs, counted
                      through each runtime node's original layer names, so an attention MatMul counts whether
                      it runs as a MatMul (AVX2/AVX-512 VNNI) or inside an i8 Subgraph (AMX CPUs); and the
                      ONNX model's metadata (tokenizer, pool pass), which ``tqc serve model.xml`` reads

OpenVINO is optional (``pip install 'tqc[openvino]'``) and imported only here, lazily: where it is missing,
every entry point raises one clear error (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from tqc.version import __version__
from tqc.compiler.core.errors import TqcError

INSTALL_HINT = ("OpenVINO is not installed (import openvino failed): pip install 'tqc[openvino]' (or pip install "
                "openvino), or write an .onnx output")
DEFAULT_THREADS = None  # OpenVINO's own choice unless --threads is given


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise TqcError(INSTALL_HINT) from None
    return openvino


def is_ir(path: str | os.PathLike) -> bool:
    return str(path).endswith(".xml")


def bin_path(xml: str | os.PathLike) -> Path:
    return Path(xml).with_suffix(".bin")


def compile_ov(model, threads: int | None = None, core=None):
    """``model``: an .onnx/.xml path or an ``ov.Model``; compiled for CPU with a latency hint."""
    ov = require_openvino()
    core = core or ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        source = core.read_model(str(model)) if isinstance(model, (str, os.PathLike)) else model
        return core.compile_model(source, "CPU", config)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"'{model}'" if isinstance(model, (str, os.PathLike)) else f"'{model.get_friendly_name()}'"
        raise TqcError(f"OpenVINO cannot compile {what}: {first}") from None


def runtime_precisions(compiled) -> dict:
    """What the CPU plugin actually runs: per layer type, the count of nodes by runtime precision, from
    ``compiled.get_runtime_model()`` (rt_info ``layerType`` / ``runtimePrecision``)."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        if layer in ("Const", "Input", "Output"):
            continue
        counts[(layer, precision)] += 1
    summary: dict[str, dict[str, int]] = {}
    for (layer, precision), count in sorted(counts.items()):
        summary.setdefault(layer, {})[precision] = count
    return summary


INTEGER = ("u8", "i8")


COMPUTE = ("FullyConnected", "MatMul", "Subgraph", "ScaledDotProductAttention")  # nodes that can hold a MatMul


def runtime_hosts(compiled) -> dict[str, list[tuple[str, str]]]:
    """Original layer name -> (layer type, runtime precision) of each runtime node that names it in its
    ``originalLayersNames`` (a fused node names every layer it took in)."""
    hosts: dict[str, list[tuple[str, str]]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" not in info:
            continue
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        for name in info["originalLayersNames"].astype(str).split(","):
            if name:
                hosts.setdefault(name, []).append((layer, precision))
    return hosts


def matmul_placement(compiled, model) -> dict[str, tuple[str, str]]:
    """Where each MatMul of ``model`` (the ``ov.Model`` that was compiled) runs: its name -> (layer type,
    runtime precision) of the runtime node that does its arithmetic; ``("?", "?")`` where none is found.

    The runtime node is the FullyConnected, MatMul or Subgraph that names the MatMul in its
    ``originalLayersNames`` (``runtime_hosts``), or, where OpenVINO's low-precision transformations rebuilt the
    MatMul under a derived name (``<name>/DequantizationMultiply``: seen where a UINT8 input's zero point is
    128, which OpenVINO runs as symmetric INT8), one that names a layer ``<name>/...``, or (a float
    FullyConnected, which names only the bias Add it took in) one that names the Add after it. The layer type depends
    on the CPU: a linear layer becomes a ``FullyConnected``; an attention MatMul stays a ``MatMul`` on AVX2 and
    AVX-512 VNNI CPUs, and on CPUs with AMX it is folded, with the mask, the Softmax and the other attention
    MatMul, into one ``Subgraph`` (a snippet kernel) whose precision is that of its integer inputs. A float
    attention that ``ov.convert_model`` fused into one ``ScaledDotProductAttention`` op counts as its two MatMuls
    (``<name> (Q.K^T)``, ``<name> (probs.V)``), both placed where that op runs.
    """
    hosts = runtime_hosts(compiled)
    placement = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("MatMul", "ScaledDotProductAttention"):
            continue
        name = op.get_friendly_name()
        found = [h for h in hosts.get(name, []) if h[0] in COMPUTE]
        if not found:
            found = [h for other, found_in in hosts.items() if other.startswith(name + "/")
                     for h in found_in if h[0] in COMPUTE]
        if not found:  # a float FullyConnected names only the bias Add it took in
            found = [h for target in op.output(0).get_target_inputs() if target.get_node().get_type_name() == "Add"
                     for h in hosts.get(target.get_node().get_friendly_name(), []) if h[0] in COMPUTE]
        host = found[0] if found else ("?", "?")
        if op.get_type_name() == "MatMul":
            placement[name] = host
        else:  # a float attention ov.convert_model fused into one op: its two MatMuls
            placement[f"{name} (Q.K^T)"] = placement[f"{name} (probs.V)"] = host
    return placement


def int8_matmuls(placement: dict[str, tuple[str, str]]) -> tuple[int, int]:
    """(integer, total): the model's MatMuls, and those whose runtime node runs on integer inputs (u8/i8),
    whatever node type holds them (``matmul_placement``)."""
    return sum(1 for _, precision in placement.values() if precision in INTEGER), len(placement)


def placement_summary(placement: dict[str, tuple[str, str]]) -> dict[str, int]:
    """{'FullyConnected u8': 24, 'Subgraph i8': 12, ...}: how many MatMuls each kind of runtime node holds."""
    return dict(sorted(Counter(f"{layer} {precision}" for layer, precision in placement.values()).items()))


def inference_precision(compiled) -> str:
    """The float precision OpenVINO chose for the compiled model (``INFERENCE_PRECISION_HINT``: bf16 on CPUs with
    AMX or AVX512-BF16 unless told otherwise, f32 elsewhere)."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def precision_summary(compiled, model) -> str:
    """What the engine runs, in a few words: 'bf16' (a float model at OpenVINO's default on a CPU with AMX or
    AVX512-BF16), 'f32', or 'int8 36/48 + bf16' (36 of the model's 48 MatMuls on integer inputs, the rest in
    bf16)."""
    integer, total = int8_matmuls(matmul_placement(compiled, model))
    float_part = inference_precision(compiled)
    return f"int8 {integer}/{total} + {float_part}" if integer else float_part


class OvRunner:
    """One compiled OpenVINO model on CPU (the ``tqc bench`` runner interface: ``input_names``, ``prepare``;
    ``precision``: ``precision_summary`` of what it runs)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.compiled = compile_ov(path, threads)
        self.precision = precision_summary(self.compiled, require_openvino().Core().read_model(str(path)))
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({k: v for k, v in feed.items() if k in self.input_names})
        return {name: np.array(results[port]) for name, port in zip(self.output_names, self.compiled.outputs)}

    def prepare(self, feed: dict[str, np.ndarray]) -> Callable[[], object]:
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        return lambda: self.request.infer(feed)


def _ports(model) -> dict:
    def port(p) -> dict:
        shape = p.get_partial_shape()
        dims = [d.get_length() if d.is_static else -1 for d in shape] if shape.rank.is_static else None
        return {"name": p.get_any_name(), "dtype": str(p.get_element_type().to_dtype()), "dims": dims}
    return {"inputs": [port(p) for p in model.inputs], "outputs": [port(p) for p in model.outputs]}


def write_ir(model, xml_path: str | os.PathLike, source_hash: str, compress_to_fp16: bool = True,
             progress=lambda message: None) -> dict:
    """Write ``model`` (a ModelProto or LeanModel) as OpenVINO IR at ``xml_path`` (+ ``.bin``) and its
    metadata at ``xml_path + '.json'``; atomic: everything is written in a temporary folder beside the output,
    then moved into place (.bin first, so an .xml never points at a missing or stale .bin)."""
    ov = require_openvino()
    from tqc.compiler.io.model import save_model, write_text_atomic

    out = Path(xml_path)
    if out.suffix != ".xml":
        raise TqcError(f"OpenVINO IR output '{out}' must end in .xml")
    folder = out.resolve().parent
    from tqc.compiler.io.output_guard import make_temp_dir, move_beside, place_file

    tmp = make_temp_dir(".tqc-ov-", dir=folder)  # removed on any exit, signals included
    try:
        onnx_path = save_model(model, tmp / "model.onnx")
        progress(f"converting to OpenVINO IR with OpenVINO {ov.get_version()}")
        start = time.perf_counter()
        try:
            converted = ov.convert_model(str(onnx_path))
        except Exception as exc:  # OpenVINO's frontend raises its own types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TqcError(f"OpenVINO could not convert the compiled model: {first}") from None
        ov.save_model(converted, str(tmp / out.name), compress_to_fp16=compress_to_fp16)
        seconds = time.perf_counter() - start
        core = ov.Core()  # compiling proves the IR loads; the runtime graph says what runs INT8
        saved = core.read_model(str(tmp / out.name))
        compiled = compile_ov(saved, core=core)
        precisions = runtime_precisions(compiled)
        placement = matmul_placement(compiled, saved)
        integer, total = int8_matmuls(placement)
        meta = {
            "tqc_version": __version__,
            "openvino_version": ov.get_version(),
            "source_model_hash": source_hash,
            "compress_to_fp16": compress_to_fp16,
            "convert_seconds": round(seconds, 2),
            "int8_matmuls": f"{integer}/{total}",  # the model's MatMuls on integer inputs, in any runtime node
            "matmul_runtime_nodes": placement_summary(placement),
            "runtime_precisions": precisions,
            **_ports(converted),
            # the ONNX model's metadata (tokenizer, pool pass, ...), which the IR does not carry: tqc serve reads it
            "metadata": {p.key: p.value for p in getattr(model, "skeleton", model).metadata_props},
        }
        # staged with the command's other outputs (all or none); .bin first, so an .xml never points at a
        # missing or stale .bin when no command is active
        built = ((tmp / bin_path(out.name).name, bin_path(out).resolve()), (tmp / out.name, out.resolve()))
        moved = [(move_beside(path, final), final) for path, final in built]  # out of the scratch folder first
        for built, final in moved:
            place_file(built, final)
    except OSError as exc:
        raise TqcError(f"cannot write '{out}': {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(json.dumps(meta, indent=2) + "\n", out.with_name(out.name + ".json"))
    return meta


RUNTIMES = ("ort", "openvino")


def polygraphy_runner(model, name: str, threads: int | None = None):
    """A polygraphy runner that runs ``model`` (ModelProto, ONNX bytes, or a path) on OpenVINO CPU with FP32
    inference precision (no BF16 down-casting on CPUs that have it), for Comparator-based checks."""
    import onnx
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    ov = require_openvino()

    class OvPolygraphyRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="openvino-runner")

        def activate_impl(self):
            core = ov.Core()
            source = model
            self._tmp = None
            if isinstance(source, onnx.ModelProto):
                source = source.SerializeToString()
            if isinstance(source, (bytes, bytearray)):
                self._tmp = tempfile.mkdtemp(prefix="tqc-ov-")
                path = Path(self._tmp) / "model.onnx"
                path.write_bytes(source)
                source = path
            config = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            try:
                self.compiled = core.compile_model(core.read_model(str(source)), "CPU", config)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise TqcError(f"OpenVINO cannot compile the model: {first}") from None
            self.request = self.compiled.create_infer_request()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for port in self.compiled.inputs:
                shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
                meta.add(port.get_any_name(), dtype=np.dtype(port.get_element_type().to_dtype()), shape=shape)
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            results = self.request.infer(dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            out = {}
            for port in self.compiled.outputs:
                value = np.array(results[port])
                for tensor_name in port.get_names():  # every name of the port, as ORT would expose it
                    out[tensor_name] = value
            return out

        def deactivate_impl(self):
            del self.request, self.compiled
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)

    return OvPolygraphyRunner()


def run_onnx(model, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of ``model`` (a ModelProto) for every feed on OpenVINO CPU in FP32 precision (the budget step's
    measurements when it runs on OpenVINO)."""
    ov = require_openvino()
    folder = tempfile.mkdtemp(prefix="tqc-ov-")
    try:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        names = [port.get_any_name() for port in compiled.inputs]
        out = []
        for feed in feeds:
            results = request.infer({k: v for k, v in feed.items() if k in names})
            out.append({port.get_any_name(): np.array(results[port]) for port in compiled.outputs})
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
