"""``tqc bench``: latency and throughput of ONNX models (and TensorRT plans) with real-looking inputs.

Inputs come from the model's signature and limits (``bench_inputs``): models of other inputs (float
features) get random normal floats. Token models' inputs look like tokenized text: random token ids below the
vocabulary, and per row a length drawn from a distribution (``--lengths full|uniform``), no longer than the
position table, with right padding (pad id 0, attention mask 0) after it. Each measurement
warms up, then times runs until ``runs`` or ``budget`` seconds; it reports median, p95, p99 and throughput
(sequences per second at the median). On CUDA, ORT runs with IO binding (inputs and outputs on the device),
optionally with CUDA graphs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import input_role_by_name

PROVIDERS = ("cpu", "cuda", "trt", "openvino")


@dataclass
class Timing:
    median_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    throughput: float  # sequences per second at the median

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def time_callable(fn: Callable[[], object], batch: int, runs: int = 200, warmup: int = 10, budget_s: float = 5.0,
                  sync: Callable[[], None] | None = None) -> Timing:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while (len(samples) < runs and time.perf_counter() - start < budget_s) or len(samples) < 3:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1000.0)
    ordered = sorted(samples)
    def pct(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
    median = statistics.median(ordered)
    return Timing(median, pct(0.95), pct(0.99), statistics.fmean(ordered), len(ordered), batch * 1000.0 / median)


MAX_BENCH_TOKENS = 1 << 20  # batch x sequence of one measurement: 1M tokens is ~1.5 GB of bert-base activations


def parse_bench_shapes(text: str) -> list[tuple[int, int]]:
    """'1x16,8x128' -> [(1, 16), (8, 128)]; every batch and sequence at least 1, at most ``MAX_BENCH_TOKENS``
    tokens a shape."""
    parsed = []
    for item in text.split(","):
        item = item.strip()
        try:
            batch, seq = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise TqcError(f"--shapes: '{item}' is not BATCHxSEQUENCE (e.g. 8x128)") from None
        if batch < 1 or seq < 1:
            raise TqcError(f"--shapes: '{item}': batch and sequence must be at least 1")
        if batch * seq > MAX_BENCH_TOKENS:
            raise TqcError(f"--shapes: '{item}' is {batch * seq} tokens; at most {MAX_BENCH_TOKENS} "
                           "(batch x sequence) a shape")
        parsed.append((batch, seq))
    return parsed


def token_inputs(names: list[str], batch: int, seq: int, vocab: int = 30000, lengths: str = "full",
                 seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if lengths == "full":
        row_lengths = np.full(batch, seq)
    elif lengths == "uniform":
        row_lengths = rng.integers(max(1, seq // 2), seq + 1, size=batch)
    else:
        raise TqcError(f"--lengths must be full or uniform, got '{lengths}'")
    high = max(1, min(vocab, 30000))
    ids = rng.integers(min(5, high - 1), high, size=(batch, seq)).astype(np.int64)
    mask = (np.arange(seq)[None, :] < row_lengths[:, None]).astype(np.int64)
    ids = ids * mask
    feed = {}
    for name in names:
        role = input_role_by_name(name)
        if role == "attention_mask":
            feed[name] = mask
        elif role == "token_type_ids":
            feed[name] = np.zeros((batch, seq), np.int64)
        elif role == "position_ids":
            feed[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        else:
            feed[name] = ids
    return feed


def bench_inputs(model, names: list[str], batch: int, seq: int, lengths: str = "full",
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one ``batch x seq`` measurement of an ONNX model, from its signature and its limits.

    Token models (every input an integer tensor of rank 2): ``token_inputs`` with ids below the word-embedding
    table's rows, types zero, and a sequence no longer than the position table (else one error line).
    Other models (float features, images): random normal floats, zeros for integers, ones for booleans, with
    the static dims of the signature and batch/sequence for the dynamic ones (axis 0: batch; others:
    sequence). A dtype that cannot be drawn (strings) is refused.
    """
    from tqc.compiler.io.data_limits import check_sequence, limits_of
    from tqc.compiler.runtime.feeds import input_specs

    specs = {spec.name: spec for spec in input_specs(model)}
    wanted = [specs[n] for n in names if n in specs]
    limits = limits_of(model)
    token_model = bool(wanted) and all(np.issubdtype(s.dtype, np.integer) and len(s.shape) == 2 for s in wanted)
    if token_model:
        check_sequence(model, seq, f"--shapes {batch}x{seq}")
        ids_input = next((s.name for s in wanted if s.name in limits.tables and not any(
            k in s.name.lower() for k in ("type", "segment", "mask", "position"))), None)
        vocab = limits.rows(ids_input) if ids_input else 30000
        feed = token_inputs(names, batch, seq, vocab or 30000, lengths, seed)
        for spec in wanted:
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int) and dim > 0 and dim != (batch, seq)[axis]:
                    raise TqcError(f"--shapes {batch}x{seq}: input '{spec.name}' has a fixed size {dim} on axis "
                                   f"{axis} ({list(spec.shape)})")
            feed[spec.name] = feed[spec.name].astype(spec.dtype)
        return feed
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in wanted:
        shape = []
        for axis, dim in enumerate(spec.shape):
            shape.append(dim if isinstance(dim, int) and dim > 0 else batch if axis == 0 else seq)
        elements = int(np.prod(shape, dtype=np.int64))
        if elements * max(spec.dtype.itemsize, 1) > (1 << 32):
            raise TqcError(f"--shapes {batch}x{seq}: input '{spec.name}' would be {shape}, over 4 GiB")
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feed[spec.name] = np.zeros(shape, spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = np.ones(shape, np.bool_)
        else:
            raise TqcError(f"bench cannot draw inputs for '{spec.name}' of type {spec.dtype}: give a token or "
                           "numeric model")
    return feed


def ort_providers(provider: str, cuda_graph: bool = False) -> list:
    """ONNX Runtime's provider list for ``--provider``, or one line when this install lacks it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise TqcError("--provider cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
        return [("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if cuda_graph else {}), "CPUExecutionProvider"]
    if provider == "trt":
        if "TensorrtExecutionProvider" not in available:
            raise TqcError("--provider trt on an .onnx model needs ONNX Runtime's TensorRT execution provider "
                           "(and TensorRT's libraries); it is not available here")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise TqcError(f"--provider must be one of {', '.join(PROVIDERS)}")


class OrtRunner:
    """One ONNX Runtime session; on CUDA, inputs and outputs bound on the device."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None,
                 cuda_graph: bool = False):
        import onnxruntime as ort

        self.ort = ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 4  # failures reach the user as one tqc line, not ORT log lines
        providers = ort_providers(provider, cuda_graph)
        self.provider = provider
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        wanted = {"cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}.get(provider)
        if wanted and wanted not in self.session.get_providers():
            # ORT falls back to the next provider when one fails to load; a number measured that way would
            # be labelled with a provider that never ran.
            raise TqcError(f"ONNX Runtime could not load {wanted} for '{path}' (it fell back to "
                           f"{', '.join(self.session.get_providers())}); no numbers reported for --provider {provider}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, feed: dict[str, np.ndarray]) -> Callable[[], object]:
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        if self.provider == "cpu":
            return lambda: self.session.run(self.output_names, feed)
        binding = self.session.io_binding()
        self._keep = []
        for name, value in feed.items():
            device_value = self.ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            self._keep.append(device_value)
            binding.bind_ortvalue_input(name, device_value)
        # Output shapes from the symbolic dims of the inputs (a CUDA-graph session must only run bound).
        sizes = {}
        for meta in self.session.get_inputs():
            for dim, size in zip(meta.shape, feed[meta.name].shape):
                if isinstance(dim, str):
                    sizes[dim] = size
        for meta in self.session.get_outputs():
            shape = [d if isinstance(d, int) else sizes.get(d) for d in meta.shape]
            if any(d is None for d in shape):
                raise TqcError(f"output '{meta.name}' has dimensions {meta.shape} not tied to any input")
            dtype = np.float16 if "float16" in meta.type else np.float32
            out = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
            self._keep.append(out)
            binding.bind_ortvalue_output(meta.name, out)
        return lambda: self.session.run_with_iobinding(binding)


class TrtPlanRunner:
    """A TensorRT plan through the TensorRT 10 runtime (tensor-address API, one CUDA stream)."""

    def __init__(self, path: str | Path):
        from tqc.compiler.tools.trt import require_tensorrt

        trt = require_tensorrt()
        try:
            import torch  # device buffers and the stream
        except ImportError:
            raise TqcError("running TensorRT plans needs torch with CUDA for device buffers") from None
        self.trt, self.torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise TqcError(f"'{path}' is not a TensorRT plan for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]

    def prepare(self, feed: dict[str, np.ndarray]) -> Callable[[], object]:
        trt, torch = self.trt, self.torch
        stream = torch.cuda.Stream()
        self._keep = []
        for name in self.input_names:
            value = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
            self.context.set_input_shape(name, tuple(value.shape))
            self._keep.append(value)
            self.context.set_tensor_address(name, value.data_ptr())
        for name in self.names:
            if name in self.input_names:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                     trt.int64: torch.int64}[self.engine.get_tensor_dtype(name)]
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self._keep.append(out)
            self.context.set_tensor_address(name, out.data_ptr())

        def run():
            self.context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
        return run


def check_runnable(path: str | Path, provider: str, cuda_graph: bool = False) -> None:
    """Refuse, before any model is measured, what ``runner_for`` would refuse for ``path`` on ``provider``: an
    OpenVINO IR without ``--provider openvino``, a runtime this install lacks."""
    if str(path).endswith(".plan"):
        from tqc.compiler.tools.trt import require_tensorrt

        require_tensorrt()
    elif provider == "openvino" or str(path).endswith(".xml"):  # OpenVINO CPU: .onnx or IR
        if str(path).endswith(".xml") and provider != "openvino":
            raise TqcError(f"'{path}' is OpenVINO IR: bench it with --provider openvino")
        from tqc.compiler.io.openvino_ir import require_openvino

        require_openvino()
    else:
        ort_providers(provider, cuda_graph)


def runner_for(path: str | Path, provider: str, threads: int | None, cuda_graph: bool):
    check_runnable(path, provider, cuda_graph)
    if str(path).endswith(".plan"):
        return TrtPlanRunner(path)
    if provider == "openvino" or str(path).endswith(".xml"):
        from tqc.compiler.io.openvino_ir import OvRunner

        return OvRunner(path, threads)
    return OrtRunner(path, provider, threads, cuda_graph)


def format_bench_table(rows: list[dict], first: str) -> str:
    """The comparison table of ``tqc bench``: one line per model and shape, speed-up against the first model.

    OpenVINO rows carry a ``precision`` column: what the engine ran (``openvino_ir.precision_summary``), so an
    FP32 model at OpenVINO's default ('bf16' on CPUs with AMX or AVX512-BF16) stands next to an INT8 IR
    ('int8 36/48 + bf16')."""
    base = {r["shape"]: r["median_ms"] for r in rows if r["model"] == first}
    with_precision = any("precision" in r for r in rows)
    width = max([len(r.get("precision", "")) for r in rows] + [len("precision")])
    column = f" {'precision':<{width}}" if with_precision else ""
    lines = [f"{'model':<40} {'shape':<8}{column} {'median ms':>10} {'p95':>8} {'p99':>8} {'seq/s':>9}  vs first"]
    for r in rows:
        ratio = base.get(r["shape"], r["median_ms"]) / r["median_ms"]
        cell = f" {r.get('precision', '-'):<{width}}" if with_precision else ""
        lines.append(f"{r['model'][-40:]:<40} {r['shape']:<8}{cell} {r['median_ms']:>10.3f} {r['p95_ms']:>8.3f} "
                     f"{r['p99_ms']:>8.3f} {r['throughput']:>9.1f}  {ratio:.2f}x")
    return "\n".join(lines)
