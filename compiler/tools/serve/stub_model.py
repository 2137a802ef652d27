"""The Triton python-backend ``model.py`` that ``tqc serve`` copies into each model of its repository.

It runs inside Triton's ``triton_python_backend_stub`` process (one per model instance), so it imports nothing
from tqc: only numpy, onnxruntime (or openvino, for ``provider: openvino``), tokenizers and
``triton_python_backend_utils``. The stub runs an isolated
interpreter that ignores PYTHONPATH, so the site-packages folders of the Python that started ``tqc serve`` are
read from ``serve.json`` (beside this file) and put first on ``sys.path`` before numpy is imported.
``wordpiece_words.py`` (beside this file too; standard library only) is loaded by its path.

    request (one or several, gathered by Triton's dynamic batcher)
      raw:  input_ids/attention_mask/token_type_ids INT64 [n, seq]  -> checked -> grouped by shape -> ORT -> split
      text: TEXT UINT8 [n, bytes] (UTF-8, rows right-padded with 0) -> checked -> tokenized (all rows together;
            the tokenizer truncates, the rows are padded to the longest, or to a bucket on CUDA graphs) -> length
            groups (max_padding) -> runtime (a pooled model: only its pooled output) -> pooled on the host unless
            the graph pools -> split

A request that fails its checks gets an error response of its own; the others of the batch are answered.
"""

import importlib.util
import json
import os
import site
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "serve.json"), encoding="utf-8") as _file:
    CONF = json.load(_file)
for _folder in reversed(CONF.get("sitedirs", [])):  # first listed ends up first on sys.path
    _before = list(sys.path)
    site.addsitedir(_folder)  # its .pth files too (editable installs)
    _added = [p for p in sys.path if p not in _before]
    sys.path[:] = ([] if _folder in _added else [_folder]) + _added + [p for p in _before if p != _folder]

import time  # noqa: E402
from itertools import chain  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

_spec = importlib.util.spec_from_file_location("_tqc_wordpiece_words", os.path.join(_HERE, "wordpiece_words.py"))
_words = importlib.util.module_from_spec(_spec)  # beside this file in the model's folder (repository.py copies it)
_spec.loader.exec_module(_words)
WordPieceWords, _Ids = _words.WordPieceWords, _words.Ids

for _path in reversed(CONF.get("prepend_paths", [])):  # e.g. a carried onnxruntime-gpu ahead of a CPU build
    sys.path.insert(0, _path)


class RequestError(ValueError):
    """What was wrong with one request; sent back as its error response."""


def _error(message):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):
        return pb_utils.TritonError(message)


def _head(text, cut):
    """The text up to its first space at or after ``cut`` characters; the text itself when it has none there."""
    end = text.find(" ", cut) if len(text) > cut else -1
    return text if end < 0 else text[:end]


def _pow2_at_least(n, cap):
    size = 1
    while size < n:
        size *= 2
    return min(max(size, n), max(cap, n))


class OrtRunner:
    """ONNX Runtime on CPU: a plain session.run on numpy feeds."""

    def __init__(self, conf):
        import onnxruntime as ort

        self.ort = ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if conf.get("threads"):
            options.intra_op_num_threads = int(conf["threads"])
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(conf["onnx"], options, providers=self.providers(conf))
        self.check_providers(conf)
        # the text endpoint asks for the one output it returns (a pooled model: only the embedding)
        self.output_names = conf.get("run_outputs") or [o.name for o in self.session.get_outputs()]
        self.bucketed = False
        self.describe = f"onnxruntime {ort.__version__} {self.session.get_providers()}"

    def providers(self, conf):
        return ["CPUExecutionProvider"]

    def check_providers(self, conf):
        pass

    def run(self, feed):
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))


class OrtCudaRunner(OrtRunner):
    """ONNX Runtime's CUDA execution provider with inputs and outputs bound on the device (IO binding).

    With ``cuda_graph`` the session captures one CUDA graph per (batch, sequence) bucket (``gpu_graph_id``):
    the bucket's input and output buffers are allocated once, and each call copies into them the inputs that
    differ from what they hold and replays the graph. Shapes are padded to buckets by the caller (``bucketed``), so a handful of graphs
    cover every request; without CUDA graphs the exact padded shape runs.
    """

    def __init__(self, conf):
        self.cuda_graph = bool(conf.get("cuda_graph"))
        super().__init__(conf)
        self.bucketed = self.cuda_graph
        self.graphs = {}
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = list(self.session.get_outputs())

    def providers(self, conf):
        options = {"device_id": str(conf.get("device_id", 0))}
        if conf.get("cuda_graph"):
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def check_providers(self, conf):
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("onnxruntime could not load its CUDA execution provider (is onnxruntime-gpu the "
                               f"onnxruntime imported? {self.ort.__file__}; providers {self.session.get_providers()})")

    def _output_shape(self, meta, feed):
        sizes = {}
        for name, value in feed.items():
            for dim, size in zip(self.inputs[name].shape, value.shape):
                if isinstance(dim, str):
                    sizes[dim] = size
        shape = [d if isinstance(d, int) else sizes.get(d) for d in meta.shape]
        if any(d is None for d in shape):
            raise RuntimeError(f"output '{meta.name}' has dimensions {meta.shape} not tied to any input")
        return shape

    @staticmethod
    def _np_type(meta):
        return np.float16 if "float16" in meta.type else np.int64 if "int64" in meta.type else np.float32

    def run(self, feed):
        if not self.cuda_graph:
            binding = self.session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            for meta in self.outputs:
                binding.bind_output(meta.name, "cuda", 0)
            self.session.run_with_iobinding(binding)
            return dict(zip([m.name for m in self.outputs], binding.copy_outputs_to_cpu()))
        key = tuple((name, value.shape) for name, value in sorted(feed.items()))
        graph = self.graphs.get(key)
        if graph is None:
            graph_id = len(self.graphs) + 1
            binding = self.session.io_binding()
            inputs = {}
            for name, value in feed.items():
                inputs[name] = self.ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                binding.bind_ortvalue_input(name, inputs[name])
            outputs = {}
            for meta in self.outputs:
                outputs[meta.name] = self.ort.OrtValue.ortvalue_from_shape_and_type(
                    self._output_shape(meta, feed), self._np_type(meta), "cuda", 0)
                binding.bind_ortvalue_output(meta.name, outputs[meta.name])
            options = self.ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            uploaded = {name: np.array(value) for name, value in feed.items()}
            graph = self.graphs[key] = (binding, inputs, outputs, options, uploaded)
        else:
            binding, inputs, outputs, options, uploaded = graph
            for name, value in feed.items():
                # the device buffer keeps what was copied last: an input equal to it (the type ids of one
                # segment, the mask of a text as long as the last) needs no copy, each one a synchronous H2D
                if not np.array_equal(value, uploaded[name]):
                    inputs[name].update_inplace(np.ascontiguousarray(value))
                    uploaded[name][...] = value
        self.session.run_with_iobinding(binding, options)
        return {name: value.numpy() for name, value in outputs.items()}


class OpenVinoRunner:
    """OpenVINO on CPU: an IR (``tqc compile --target openvino``) or an ONNX file, one infer request.

    Inputs are shared with the numpy feed (no copy); the outputs are copied out of the request's buffers, which
    the next call overwrites before Triton has sent the responses of this one. Float layers run in FP32
    (``INFERENCE_PRECISION_HINT``): OpenVINO's default on AMX CPUs is bf16, which would change the answers of
    the model that tqc compiled and verified.
    """

    def __init__(self, conf):
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if conf.get("threads"):
            config["INFERENCE_NUM_THREADS"] = int(conf["threads"])
        self.compiled = core.compile_model(core.read_model(conf["onnx"]), "CPU", config)
        self.request = self.compiled.create_infer_request()
        names = conf.get("run_outputs") or [port.get_any_name() for port in self.compiled.outputs]
        self.ports = [(name, self.compiled.output(name)) for name in names]
        self.input_names = {port.get_any_name() for port in self.compiled.inputs}
        self.bucketed = False
        self.describe = f"openvino {ov.get_version()} CPU"

    def run(self, feed):
        self.request.infer({k: v for k, v in feed.items() if k in self.input_names}, share_inputs=True)
        return {name: self.request.get_tensor(port).data.copy() for name, port in self.ports}


RUNNERS = {"cpu": OrtRunner, "cuda": OrtCudaRunner, "openvino": OpenVinoRunner}


def check_numpy():
    """nvidia-pytriton 0.7's stub bridges tensors with a pybind11 built for numpy 1: under numpy 2 (seen with 2.4.6
    and 2.5.2) the tensors it sends back are empty and the texts it receives can come out cut short. Refuse to
    load rather than answer wrongly."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(f"the python backend stub needs numpy<2 (it found numpy {np.__version__} in "
                           f"{os.path.dirname(np.__file__)}): install numpy<2 there or set TQC_SERVE_STUB_PATH to "
                           "a folder holding it")


class TritonPythonModel:
    def initialize(self, args):
        check_numpy()
        self.conf = CONF
        self.kind = CONF["kind"]
        self.runner = RUNNERS[CONF.get("provider", "cpu")](CONF)
        self.inputs = CONF["inputs"]  # the ONNX model's own inputs: [{"name", "dtype"}]
        self.vocab = CONF.get("vocab")
        self.max_length = int(CONF["max_length"])
        self.max_batch = int(CONF.get("max_batch", 64))
        if self.kind == "text":
            self.tokenizer = self._load_tokenizer()
            self.ascii_tokenizer = self._ascii_tokenizer()
            self.wordpiece_words = None if self.ascii_tokenizer is None else WordPieceWords.for_tokenizer(
                self.tokenizer, self.max_length)
            self.pad_id = int(CONF.get("pad_id", 0))
            # several texts: encode_batch_fast (no character offsets, which nothing here reads: 15-20% less
            # tokenizer time) where the tokenizers version has it, on rayon's pool, sized by the server's
            # environment (repository.tokenizer_env)
            if hasattr(self.tokenizer, "encode_batch_fast"):
                self.encode_batch = lambda tokenizer, texts: tokenizer.encode_batch_fast(texts)
            else:
                self.encode_batch = lambda tokenizer, texts: tokenizer.encode_batch(texts)
            self.single_encode, self.encode_one = self._pick_single_encode()
            self.cut_chars = int(CONF.get("cut_chars") or 0)  # 0: every text tokenized whole
            self.wanted = [spec["name"] for spec in self.inputs]
            self._token_inputs = [(name, attribute, fill) for name, attribute, fill in (
                ("input_ids", "ids", self.pad_id), ("token_type_ids", "type_ids", 0)) if name in self.wanted]
        # with "timings": seconds per padded shape "BATCHxSEQ": [tokenizer, runtime call, pooling, calls, TEXT
        # decode, response building, whole execute]; the last three are per execute call, split over its groups
        self.timings = {} if CONF.get("timings") else None
        self._call_shapes = []
        self._warm_up()
        print(f"tqc-stub: {CONF['kind']} model ready: python {sys.version.split()[0]}, numpy {np.__version__} ({os.path.dirname(np.__file__)}), "
              f"{self.runner.describe}, max_length {self.max_length}"
              + (f", one text by {self.single_encode}" if self.kind == "text" else "")
              + (", printable ASCII by its cached words" if getattr(self, "wordpiece_words", None) else ""), flush=True)
        if self.timings is not None:
            self.timings.clear()
            self._timings_saved = 0.0

    def _pick_single_encode(self, idle=0.002):
        """One text: encode(), or encode_batch_fast([text]), which computes no offsets but goes through rayon's
        pool (none with TOKENIZERS_PARALLELISM=false), whose hand-off costs what the host makes it cost (~0.3 ms
        for encode_batch on a 16-core host in session 5; nothing measurable on 2 cores). Both give the same
        encoding; the faster on this host is kept, timed here on a text of 128 tokens or more (medians of 15),
        each call after ``idle`` seconds without work, as a call at batch 1 comes: back to back, the pool's
        threads would still be awake from the call before, which they are not between requests."""
        candidates = {"encode": lambda tokenizer, text: [tokenizer.encode(text)]}
        if hasattr(self.tokenizer, "encode_batch_fast"):
            candidates["encode_batch_fast"] = lambda tokenizer, text: self.encode_batch(tokenizer, [text])
        if len(candidates) == 1:
            return next(iter(candidates.items()))
        text = " ".join(["the compiler fuses attention and quantizes matrix products for deployment"] * 12)
        tokenizer = self.ascii_tokenizer or self.tokenizer  # the one this text goes to
        times = {name: [] for name in candidates}
        for _ in range(15):
            for name, encode in candidates.items():
                time.sleep(idle)
                start = time.perf_counter()
                encode(tokenizer, text)
                times[name].append(time.perf_counter() - start)
        best = min(times, key=lambda name: sorted(times[name])[len(times[name]) // 2])
        return best, candidates[best]

    def _load_tokenizer(self):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(_HERE, CONF["tokenizer"]))
        tokenizer.enable_truncation(self.max_length)
        tokenizer.no_padding()  # rows are padded by _tokenize, in one scatter per input
        return tokenizer

    def _ascii_tokenizer(self):
        """For texts of printable ASCII only (``str.isascii() and str.isprintable()``): the same tokenizer with its
        BertNormalizer replaced by what that normalizer does to such text, lowercasing (or nothing when it does
        not lowercase): it removes control characters, spaces out CJK characters and strips accents, and printable
        ASCII has none. Same tokens (special tokens in the text included), ~0.7x the tokenizer's time for a
        128-token text on the 2-core Xeon. None for any other normalizer."""
        from tokenizers import normalizers

        normalizer = json.loads(self.tokenizer.to_str()).get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            return None
        tokenizer = self._load_tokenizer()
        tokenizer.normalizer = normalizers.Lowercase() if normalizer.get("lowercase", True) else None
        return tokenizer

    def _warm_up(self):
        if self.kind == "text":
            self._embed(["warm up"] * 1)
        else:
            feed = {i["name"]: np.ones((1, 8), dtype=np.int64) for i in self.inputs}
            self.runner.run(feed)

    # ----- raw tensors -------------------------------------------------------------------------------------
    def _raw_feed(self, request):
        feed = {}
        shape = None
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec["name"])
            if tensor is None:
                raise RequestError(f"input '{spec['name']}' is missing")
            value = tensor.as_numpy()
            if value.ndim != 2 or value.shape[0] == 0 or value.shape[1] == 0:
                raise RequestError(f"input '{spec['name']}' has shape {list(value.shape)}; expected [batch, sequence] "
                                   "with both at least 1")
            if shape is not None and value.shape != shape:
                raise RequestError(f"inputs have different shapes ({list(shape)} and {list(value.shape)})")
            shape = value.shape
            feed[spec["name"]] = value.astype(np.int64, copy=False)
        if shape[1] > self.max_length:
            raise RequestError(f"sequence length {shape[1]} exceeds the model's limit of {self.max_length} tokens")
        ids = feed.get("input_ids")
        if ids is not None and self.vocab and (ids.min() < 0 or ids.max() >= self.vocab):
            raise RequestError(f"input_ids must lie in [0, {self.vocab}) (the model's vocabulary); got "
                               f"{int(ids.min())}..{int(ids.max())}")
        mask = feed.get("attention_mask")
        if mask is not None and not np.isin(mask, (0, 1)).all():
            raise RequestError("attention_mask may hold 0 and 1 only")
        if mask is not None and (mask.sum(axis=1) == 0).any():
            raise RequestError("attention_mask has a row with no token")
        types = feed.get("token_type_ids")
        if types is not None and (types.min() < 0 or types.max() >= int(CONF.get("type_vocab", 2))):
            raise RequestError(f"token_type_ids must lie in [0, {CONF.get('type_vocab', 2)})")
        return feed

    def _execute_raw(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            try:
                feed = self._raw_feed(request)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc)))
                continue
            groups.setdefault(next(iter(feed.values())).shape[1], []).append((index, feed))
        for members in groups.values():  # one ORT call per sequence length: exact, no padding
            feed = {name: np.concatenate([f[name] for _, f in members]) for name in members[0][1]}
            outputs = self.runner.run(feed)
            start = 0
            for index, member in members:
                rows = next(iter(member.values())).shape[0]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start:start + rows]))
                           for name, value in outputs.items()]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses

    # ----- text --------------------------------------------------------------------------------------------
    def _texts(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
        if tensor is None:
            raise RequestError("input 'TEXT' is missing")
        data = tensor.as_numpy()
        if data.ndim != 2 or data.shape[0] == 0:
            raise RequestError(f"TEXT has shape {list(data.shape)}; expected [texts, bytes]")
        if data.shape[1] > int(CONF["max_text_bytes"]):
            raise RequestError(f"a text of {data.shape[1]} bytes exceeds the limit of {CONF['max_text_bytes']} bytes")
        texts = []
        for row in data:
            raw = row.tobytes().rstrip(b"\0")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(f"TEXT is not valid UTF-8 (byte {exc.start})") from None
            if not text.strip():
                raise RequestError("TEXT is empty")
            texts.append(text)
        return texts

    def _embed(self, texts):
        start = time.perf_counter()
        encodings = self._encode(texts)
        feed, mask, lengths = self._tokenize(encodings)
        rows = len(encodings)
        truncated = None
        if CONF.get("long_text") == "error":  # only a row at the limit can have been cut
            truncated = [bool(lengths[row] == self.max_length and encodings[row].overflowing) for row in range(rows)]
        tokenized = time.perf_counter() - start
        groups = self._length_groups(lengths) if rows > 1 and not self.runner.bucketed else None
        if groups is None:
            output = self._run_pooled(feed, mask, rows, tokenized)
        else:  # rows sorted by length, run in groups padded to their own longest row; answers put back in order
            output = None
            for index in groups:
                longest = int(lengths[index[-1]])
                part = self._run_pooled({name: value[index, :longest] for name, value in feed.items()},
                                        mask[index, :longest], len(index), tokenized / len(groups))
                if output is None:
                    output = np.empty((rows,) + part.shape[1:], dtype=np.float32)
                output[index] = part
        return np.ascontiguousarray(output, dtype=np.float32), lengths.reshape(rows, 1), truncated

    def _encode(self, texts):
        """The texts' encodings, truncated at the token limit, not padded.

        The tokenizer truncates only after it has tokenized the whole text. With ``cut_chars`` (the repository
        sets it for tokenizers whose tokens before a space do not depend on what follows: ``cut_at_space``), a
        longer text is tokenized up to its first space at or after that many characters; if that head still
        overflows the limit, its encoding is the whole text's (the same tokens up to the limit); if not, the
        whole text is tokenized after all."""
        cut = self.cut_chars
        heads = texts
        if cut and any(len(text) > cut for text in texts):
            heads = [_head(text, cut) for text in texts]
        encodings = self._run_tokenizer(heads)
        if heads is not texts:
            short = [row for row, (head, text) in enumerate(zip(heads, texts))
                     if head is not text and not encodings[row].overflowing]
            if short:  # heads that did not reach the limit: their whole texts
                encodings = list(encodings)
                for row, encoding in zip(short, self._run_tokenizer([texts[row] for row in short])):
                    encodings[row] = encoding
        return encodings

    def _run_tokenizer(self, texts):
        """Printable ASCII by ``wordpiece_words`` where it applies (else by ``ascii_tokenizer``); other texts: one
        by the way picked at load, several by encode_batch."""
        tokenizer = self.tokenizer
        if self.ascii_tokenizer is not None and all(text.isascii() and text.isprintable() for text in texts):
            if self.wordpiece_words is not None:
                encodings = [self.wordpiece_words.encode(text) for text in texts]
                if not any(encoding is None for encoding in encodings):
                    return encodings
            tokenizer = self.ascii_tokenizer
        return self.encode_one(tokenizer, texts[0]) if len(texts) == 1 else self.encode_batch(tokenizer, texts)

    def _tokenize(self, encodings):
        """The model's token inputs for the encodings (truncated, not padded): (feed, attention mask, lengths).

        Rows are right-padded to the longest (with CUDA graphs: to the bucket, sequence a power of two >= 16 up
        to the token limit, batch a power of two up to max_batch, padding rows copying the first row) without a
        loop per row: the ids of all rows are chained into one array and written where the mask is 1. The same
        tensors as the tokenizer's own padding (pad id, type id 0, mask 0)."""
        rows = len(encodings)
        if rows == 1:
            return self._tokenize_one(encodings[0])
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=rows)
        seq = int(lengths.max())
        batch = rows
        if self.runner.bucketed:
            seq = min(max(16, _pow2_at_least(seq, self.max_length)), self.max_length)
            batch = _pow2_at_least(rows, self.max_batch)
        inputs = self._token_inputs
        mask = np.zeros((batch, seq), dtype=np.int64)
        values = {"attention_mask": mask}
        real = np.arange(seq) < lengths[:, None]
        mask[:rows] = real
        total = int(lengths.sum())
        for name, attribute, fill in inputs:
            value = values[name] = np.full((batch, seq), fill, dtype=np.int64)
            value[:rows][real] = np.fromiter(chain.from_iterable(getattr(e, attribute) for e in encodings),
                                             dtype=np.int64, count=total)
        if batch > rows:
            for value in values.values():
                value[rows:] = value[0]
        return {name: values[name] for name in self.wanted}, mask, lengths

    def _tokenize_one(self, encoding):
        """``_tokenize`` of one text (batch 1): one zeroed block holds every input, [inputs, 1, seq] (seq: the
        text's length, or its bucket with CUDA graphs), and the encoding's lists are written into it; half the
        time of the batch path's allocations for one row."""
        length = len(encoding)
        seq = length
        if self.runner.bucketed:
            seq = min(max(16, _pow2_at_least(length, self.max_length)), self.max_length)
        inputs = self._token_inputs
        block = np.zeros((1 + len(inputs), 1, seq), dtype=np.int64)
        block[0, 0, :length] = 1
        values = {"attention_mask": block[0]}
        words = type(encoding) is _Ids  # its type ids are all 0: the zeroed block holds them already
        for index, (name, attribute, fill) in enumerate(inputs, start=1):
            if not (words and attribute == "type_ids"):
                block[index, 0, :length] = getattr(encoding, attribute)
            if fill and seq > length:
                block[index, 0, length:] = fill
            values[name] = block[index]
        return {name: values[name] for name in self.wanted}, block[0], np.array([length], dtype=np.int64)

    def _length_groups(self, lengths):
        """Row indices in groups whose padding stays within ``max_padding`` of their positions (lengths sorted
        ascending, a group closed when the next row would pass the bound), or None for one group. Pooled outputs
        only: a token output keeps the batch's one padded shape."""
        bound = float(CONF.get("max_padding", 1.0))
        if bound >= 1.0 or CONF.get("pooling", "mean") == "none":
            return None
        order = np.argsort(lengths, kind="stable")
        groups, first, total = [], 0, 0
        for position, row in enumerate(order):
            length = int(lengths[row])
            size = position - first + 1
            if size > 1 and (size * length - (total + length)) > bound * size * length:
                groups.append(order[first:position])
                first, total = position, 0
            total += length
        groups.append(order[first:])
        return groups if len(groups) > 1 else None

    def _run_pooled(self, feed, mask, rows, tokenize_seconds):
        started = time.perf_counter()
        output = self.runner.run(feed)[CONF["output"]][:rows]
        ran = time.perf_counter()
        output = self._pool(output, mask[:rows])
        if self.timings is not None:
            pooled = time.perf_counter()
            key = "x".join(str(d) for d in mask.shape)
            entry = self.timings.setdefault(key, [0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0])
            entry[0] += tokenize_seconds
            entry[1] += ran - started
            entry[2] += pooled - ran
            entry[3] += 1
            self._call_shapes.append(key)
        return output

    @staticmethod
    def _pool(output, mask):
        """Host pooling as sentence-transformers does it, for a model that returns tokens; "graph": as it is."""
        pooling = CONF.get("pooling", "mean")
        if pooling == "graph":  # pooled (and normalised) by the model itself (the pool pass)
            return output
        if output.ndim == 3 and pooling == "mean":  # masked mean as one batched matmul: [rows,1,seq] @ [rows,seq,h]
            weights = mask[:, None, :].astype(np.float32)
            summed = np.matmul(weights, output.astype(np.float32, copy=False))[:, 0]
            output = summed / np.maximum(weights.sum(axis=2), 1e-9)
        elif output.ndim == 3 and pooling == "max":  # padded positions at -1e9, as sentence-transformers
            output = np.where(mask[:, :, None] > 0, output.astype(np.float32, copy=False), np.float32(-1e9)).max(axis=1)
        elif output.ndim == 3 and pooling == "cls":
            output = output[:, 0].astype(np.float32)
        if CONF.get("normalize") and output.ndim == 2:
            output = output / np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        return output

    def _execute_text(self, requests):
        began = time.perf_counter()
        self._call_shapes = []  # the padded shapes this call ran, for its timings
        responses = [None] * len(requests)
        owners, texts = [], []
        for index, request in enumerate(requests):
            try:
                mine = self._texts(request)
            except RequestError as exc:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc)))
                continue
            owners.append((index, len(texts), len(mine)))
            texts.extend(mine)
        if not texts:
            return responses
        decoded = time.perf_counter()
        embeddings, counts, truncated = self._embed(texts)
        embedded = time.perf_counter()
        for index, start, rows in owners:
            if truncated is not None and any(truncated[start:start + rows]):
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(
                    f"TEXT is longer than the model's limit of {self.max_length} tokens"))
                continue
            responses[index] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(CONF["text_output"], embeddings[start:start + rows]),
                pb_utils.Tensor("token_count", counts[start:start + rows])])
        if self.timings is not None and self._call_shapes:
            ended, share = time.perf_counter(), 1.0 / len(self._call_shapes)
            for key in self._call_shapes:
                entry = self.timings[key]
                entry[4] += (decoded - began) * share
                entry[5] += (ended - embedded) * share
                entry[6] += (ended - began) * share
            self._call_shapes.clear()
        return responses

    def execute(self, requests):
        try:
            if self.kind == "text":
                responses = self._execute_text(requests)
                if self.timings is not None:
                    self._save_timings()
                return responses
            return self._execute_raw(requests)
        except Exception as exc:  # a failure of the model itself: answer every request, keep serving
            message = f"inference failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                    for _ in requests]

    def _save_timings(self, at_most_every=1.0):
        """Write the timings (atomically) at most once a second: the server's stop signals the stub's process
        group, so finalize() is not reliably reached. One file per instance (process) when there are several."""
        now = time.monotonic()
        if not self.timings or now - self._timings_saved < at_most_every:
            return
        self._timings_saved = now
        path = CONF["timings"]
        if int(CONF.get("instances", 1)) > 1:
            path = path.replace(".timings.json", f".{os.getpid()}.timings.json")
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            json.dump(self.timings, file)
        os.replace(path + ".tmp", path)

    def finalize(self):
        self._save_timings(at_most_every=0.0)
