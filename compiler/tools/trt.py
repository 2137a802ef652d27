"""TensorRT 10 plan building through its Python API (imported lazily; TensorRT is optional).

    ONNX ─► trt.OnnxParser (path-based: external data next to the model) ─► INetworkDefinition
         Q/DQ graph  ─► STRONGLY_TYPED network (explicit quantization; no implicit INT8 calibrator)
         float graph ─► BuilderFlag.FP16 (TensorRT picks FP16/FP32 per layer)
         ─► optimization profile per dynamic input (--shapes), workspace on MemoryPoolType.WORKSPACE,
            builder_optimization_level, persistent timing cache ─► build_serialized_network ─► model.plan
         + model.plan.json: tqc and TensorRT versions, source hash, profiles, precision
         + the timing cache, updated: all three are outputs of the command (``declare_plan_outputs``), staged
           and moved into place together on success, none of them on failure or interrupt

Nothing here is faked: where TensorRT cannot be imported, every entry point raises one clear error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import onnx

from tqc.version import __version__
from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.model import model_hash, save_model, write_bytes_atomic, write_text_atomic
from tqc.compiler.core.profiles import Profile, parse_shapes, resolve_profiles
from tqc.compiler.tools.trt_check import check_trt

INSTALL_HINT = ("TensorRT 10 is not installed (import tensorrt failed): install it from NVIDIA's package index "
                "(pip install tensorrt --extra-index-url https://pypi.nvidia.com) or write an .onnx output")
DEFAULT_TIMING_CACHE = Path(os.environ.get("TQC_TIMING_CACHE", Path.home() / ".cache" / "tqc" / "trt_timing.cache"))


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise TqcError(INSTALL_HINT) from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise TqcError(f"TensorRT {tensorrt.__version__} found; tqc builds with the TensorRT 10 API")
    return tensorrt


def timing_cache_path(timing_cache: str | os.PathLike | None) -> Path:
    """``--timing-cache``, or the default (``TQC_TIMING_CACHE``, else ~/.cache/tqc/trt_timing.cache)."""
    return Path(timing_cache) if timing_cache else DEFAULT_TIMING_CACHE


def declare_plan_outputs(guard, plan_path: str | os.PathLike, timing_cache: str | os.PathLike | None) -> Path:
    """Declare what a build writes to the command's output guard, before any work: the plan, its ``.json``
    metadata and the timing cache. The cache is read before the build and replaced after it, so it is an
    output (staged like the plan, never written over the model or the plan); its folder may be missing (created
    on success only). Returns the cache's path."""
    guard.writes(plan_path, "-o")
    guard.writes(Path(str(plan_path) + ".json"), "the plan's metadata")
    cache = timing_cache_path(timing_cache)
    guard.writes(cache, "the TensorRT timing cache", parents=True)  # a folder or a device there is refused
    return cache


def write_timing_cache(data: bytes, cache_path: Path) -> None:
    """The serialized cache to ``cache_path`` (staged when the command declared it); a missing folder is
    created, and removed again unless the command succeeds."""
    from tqc.compiler.io.output_guard import register_temp

    missing = [q for q in [cache_path.parent, *cache_path.parent.parents] if not q.exists()]
    if missing:
        try:
            cache_path.parent.mkdir(parents=True)
        except OSError as exc:
            raise TqcError(f"cannot create the timing cache's folder '{cache_path.parent}': "
                           f"{exc.strerror or exc}") from None
        register_temp(missing[-1], "success")
    write_bytes_atomic(data, cache_path)


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def io_ports(model: onnx.ModelProto) -> dict:
    """Input and output names, Triton types and dims, for the plan's metadata (export-triton reads them)."""
    from tqc.compiler.tools.triton import triton_ports

    initializers = {t.name for t in model.graph.initializer}
    return {"inputs": triton_ports(model.graph.input, initializers), "outputs": triton_ports(model.graph.output)}


def plan_metadata(source_hash: str, profiles: dict[str, Profile], strongly_typed: bool, fp16: bool,
                  trt_version: str, opt_level: int, workspace_bytes: int, build_seconds: float | None = None) -> dict:
    return {
        "tqc_version": __version__,
        "tensorrt_version": trt_version,
        "source_model_hash": source_hash,
        "profiles": {name: p.as_dict() for name, p in sorted(profiles.items())},
        "network": "strongly-typed (explicit quantization)" if strongly_typed else ("fp16" if fp16 else "fp32"),
        "builder_optimization_level": opt_level,
        "workspace_bytes": workspace_bytes,
        "build_seconds": build_seconds,
    }


def build_plan(onnx_path: str | Path, plan_path: str | Path, shapes=None, fp16: bool = True,
               workspace_gib: float = 4.0, opt_level: int = 3, timing_cache: str | Path | None = None,
               source_hash: str | None = None, progress=lambda message: None) -> dict:
    """Build ``plan_path`` from an ONNX file. Returns the metadata also written to ``<plan>.json``."""
    trt = require_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    check = check_trt(model)
    if not check.ok:
        first = next(f for f in check.findings if f.severity == "error")
        raise TqcError(f"TensorRT will not parse this model: {first.message} (run 'tqc check' for the full list)")
    profiles = resolve_profiles(check.dynamic_inputs, parse_shapes(shapes))
    strongly_typed = has_qdq(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path} with TensorRT {trt.__version__}'s ONNX parser")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TqcError(f"TensorRT's ONNX parser failed: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    workspace = int(workspace_gib * (1 << 30))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = opt_level
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = timing_cache_path(timing_cache)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, p in profiles.items():
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    progress("building the engine (this takes a while)")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TqcError("TensorRT failed to build the engine (see TensorRT's messages above)")
    write_bytes_atomic(bytes(serialized), plan_path)  # the three outputs are staged: placed together on commit
    write_timing_cache(bytes(config.get_timing_cache().serialize()), cache_path)
    meta = plan_metadata(source_hash or model_hash(onnx_path), profiles, strongly_typed, fp16, trt.__version__,
                         opt_level, workspace, round(seconds, 2))
    meta.update(io_ports(model))
    write_text_atomic(json.dumps(meta, indent=2) + "\n", plan_path.with_name(plan_path.name + ".json"))
    return meta


def build_plan_from_model(model: onnx.ModelProto, output, source_hash: str, shapes=None,
                          progress=lambda message: None, **options) -> dict:
    """``tqc compile -o x.plan``: write the compiled ONNX to a temp folder beside the plan (never over a file
    named like the plan's stem: that may be the input), build from that path, remove the folder."""
    import shutil

    from tqc.compiler.io.output_guard import make_temp_dir, release_temp

    require_tensorrt()
    scratch = make_temp_dir(".tqc-plan-source-", dir=Path(output).resolve().parent)
    try:
        onnx_path = scratch / Path(output).with_suffix(".onnx").name
        save_model(model, onnx_path)
        return build_plan(onnx_path, output, shapes=shapes, source_hash=source_hash, progress=progress, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        release_temp(scratch)
