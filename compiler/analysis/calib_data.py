"""Calibration and comparison data: where it comes from and whether it fits the model.

Sources (batch on axis 0 everywhere):
  * ``data.npz``                 input name -> array
  * ``inputs.json``              polygraphy's inputs format (a list of feed dicts), e.g. from ``--save-inputs``
  * ``loader.py:function``       a polygraphy-style data loader script; only run when named explicitly
  * ``sentences.txt``            one sentence per line, tokenized with the model's tokenizer (``--tokenizer``)

and, from Python (``DataSpec.data``; ``tqc.compile(calib=...)``, ``tqc.diff(data=...)``), the same in memory:
  * a list of texts              as the lines of a ``.txt``
  * a dict of arrays             as an ``.npz``
  * any iterable of feed dicts   as a polygraphy inputs file or a loader's items (a generator is read once)

Tokenizer outputs reach the model inputs by role, found from the graph (``feeds.input_roles``): a model whose
inputs are ``ids``/``mask`` gets ``input_ids``/``attention_mask`` there. ``--input-map ids=input_ids,...``
(model input = tokenizer output, or array name for .npz/.json/script data) names them when the graph cannot.

Every feed is checked against the model's inputs before use: names, dtypes, ranks, finite values, non-empty.
A mismatch is one clear error line; nothing is guessed.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import INPUT_ROLES
from tqc.compiler.runtime.feeds import Feed, input_roles, input_specs


@dataclass
class DataSpec:
    path: str | None                # a file (.npz, .json, .txt) or script.py:function; None: ``data`` in memory
    tokenizer: str | None = None
    samples: int | None = None      # at most this many samples
    batch_size: int = 8
    max_length: int | None = None   # tokens per sentence; None: 128, or the model's positions when fewer
    skip: int = 0                   # skip the first samples (text): keep calibration and evaluation apart
    input_map: dict[str, str] | None = None  # model input -> tokenizer output / data array name (--input-map)
    data: object = None             # in memory: a list of texts, a dict of arrays, an iterable of feed dicts
    label: str = "data"             # what error lines call in-memory data (the API's argument name)

    def describe(self) -> str:
        """How error lines name the data: ``data 'calib.txt'``, or ``calib (32 texts)``."""
        data = self.data
        if data is None:
            return f"data '{self.path}'"
        if isinstance(data, Mapping):
            return f"{self.label} (a dict of {len(data)} array{'' if len(data) == 1 else 's'})"
        if isinstance(data, (list, tuple)) and data and all(isinstance(item, str) for item in data):
            return f"{self.label} ({len(data)} texts)"
        if isinstance(data, (list, tuple)):
            return f"{self.label} (a list of {len(data)} feeds)"
        return f"{self.label} (a {type(data).__name__})"


def parse_input_map(text: str | None) -> dict[str, str] | None:
    """``ids=input_ids,mask=attention_mask`` -> {'ids': 'input_ids', 'mask': 'attention_mask'}."""
    if not text:
        return None
    mapping: dict[str, str] = {}
    for item in text.split(","):
        model_input, sep, source = (part.strip() for part in item.partition("="))
        if not sep or not model_input or not source:
            raise TqcError(f"--input-map: '{item.strip()}' is not MODEL_INPUT=NAME (e.g. ids=input_ids,"
                           f"mask=attention_mask)")
        if model_input in mapping:
            raise TqcError(f"--input-map: '{model_input}' is mapped twice")
        mapping[model_input] = source
    return mapping


def _rename(feed: dict, input_map: dict[str, str] | None) -> dict:
    """Data arrays named as the map says -> the model's input names."""
    if not input_map:
        return feed
    feed = dict(feed)
    for model_input, source in input_map.items():
        if source in feed and model_input not in feed:
            feed[model_input] = feed.pop(source)
    return feed


def _validate(feed: dict, model: onnx.ModelProto, where: str) -> Feed:
    specs = {s.name: s for s in input_specs(model)}
    names = set(feed)
    missing = sorted(set(specs) - names)
    extra = sorted(names - set(specs))
    if missing:
        raise TqcError(f"{where}: no data for model input '{missing[0]}' (data has {', '.join(sorted(names)) or 'nothing'})")
    if extra:
        raise TqcError(f"{where}: '{extra[0]}' is not an input of the model (inputs: {', '.join(specs)})")
    out: Feed = {}
    for name, spec in specs.items():
        value = np.asarray(feed[name])
        if value.size == 0:
            raise TqcError(f"{where}: input '{name}' is empty")
        if value.ndim != len(spec.shape):
            raise TqcError(f"{where}: input '{name}' has rank {value.ndim}, the model expects rank {len(spec.shape)} "
                           f"{list(spec.shape)}")
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise TqcError(f"{where}: input '{name}' has size {got} on axis {axis}, the model expects {want}")
        if np.issubdtype(spec.dtype, np.integer):
            if not np.issubdtype(value.dtype, np.integer):
                raise TqcError(f"{where}: input '{name}' is {value.dtype}, the model expects integers ({spec.dtype})")
            value = value.astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                raise TqcError(f"{where}: input '{name}' is {value.dtype}, the model expects {spec.dtype}")
            value = value.astype(spec.dtype)
            if not np.all(np.isfinite(value)):
                raise TqcError(f"{where}: input '{name}' holds NaN or infinite values")
        elif value.dtype != spec.dtype:
            raise TqcError(f"{where}: input '{name}' is {value.dtype}, the model expects {spec.dtype}")
        out[name] = value
    batch = {v.shape[0] for v in out.values()}
    if len(batch) > 1:
        raise TqcError(f"{where}: inputs disagree on the batch size (axis 0): {sorted(batch)}")
    from tqc.compiler.io.data_limits import check_feed

    return check_feed(out, model, where)  # token ids, types and lengths within the model's tables


def _batches_from_arrays(arrays: dict[str, np.ndarray], batch_size: int, samples: int | None) -> Iterator[dict]:
    count = min(len(v) for v in arrays.values()) if arrays else 0
    if samples:
        count = min(count, samples)
    for start in range(0, count, batch_size):
        yield {k: v[start:start + batch_size] for k, v in arrays.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise TqcError(f"'{path}' is not a readable .npz file ({exc})") from None


def _read_polygraphy_json(path: Path) -> list[dict]:
    from polygraphy.json import load_json

    try:
        data = load_json(str(path))
    except Exception as exc:
        raise TqcError(f"'{path}' is not a polygraphy inputs JSON file ({type(exc).__name__})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise TqcError(f"'{path}' is not a polygraphy inputs file (a list of input-name -> array maps)")
    return data


def _load_script(spec: str) -> Callable[[], Iterable[dict]]:
    file, _, func = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise TqcError(f"data loader script '{file}' does not exist")
    module_spec = importlib.util.spec_from_file_location(f"tqc_user_loader_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() at import must not end tqc with its code
        raise TqcError(f"data loader script '{file}' failed to import: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, func):
        raise TqcError(f"data loader script '{file}' has no function '{func}'")
    return getattr(module, func)


def read_sentences(path: Path, skip: int = 0, limit: int | None = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped. A file that is not text (NUL bytes, bytes that are
    not UTF-8) is refused in one line; text that is odd but usable (control characters) gets a note."""
    data = path.read_bytes()
    if b"\0" in data:
        raise TqcError(f"data '{path}' holds NUL bytes (the first at offset {data.index(0)}): it is not a text file "
                       f"(give one sentence per line, UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TqcError(f"data '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                       f"give one sentence per line, UTF-8") from None
    return select_sentences(text.splitlines(), skip, limit, where=f"data '{path}'")


def note_control_characters(sentences: list[str], where: str) -> None:
    """A note (stderr) when sentences hold control characters: usable, but rarely what a user meant."""
    odd = [i for i, line in enumerate(sentences) if any(_is_control(c) for c in line)]
    if odd:
        from tqc.compiler.io.data_limits import user_note

        user_note(f"{where}: {len(odd)} of {len(sentences)} sentences hold control characters (the first is "
                  f"sentence {odd[0] + 1}); they are tokenized as they are")


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char != "\t"


def load_tokenizer(name: str | None, model: onnx.ModelProto):
    """``name`` is a tokenizer folder, or 'minilm'; else the model's export metadata (``tqc.tokenizer``) says where
    the tokenizer is."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TqcError("text calibration data needs transformers: pip install 'tqc[export]'") from None
    source, recorded = name, False
    if source is None:
        meta = {p.key: p.value for p in model.metadata_props}
        source = meta.get("tqc.tokenizer")  # written by tqc export: the model folder, or packaged:minilm
        recorded = source is not None
        if source is None and meta.get("tqc.family") == "minilm" and "real weights" in meta.get("tqc.source", ""):
            source = "minilm"  # exports made before tqc.tokenizer was recorded
    if source is None:
        raise TqcError("text data needs a tokenizer: give --tokenizer DIR (a Hugging Face tokenizer folder)")
    from tqc.compiler.io.packaged import packaged_tokenizer

    source = str(packaged_tokenizer(source) or source)
    if not Path(source).is_dir():
        if recorded:
            raise TqcError(f"the tokenizer folder recorded at export, '{source}', does not exist any more: "
                           f"give --tokenizer DIR")
        raise TqcError(f"tokenizer folder '{source}' does not exist")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TqcError(f"'{source}' holds no readable tokenizer: {str(exc).strip().splitlines()[0][:200]}") from None


def tokenize(tokenizer, sentences: list[str], roles: dict[str, str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenizer outputs to model inputs by role (model input name -> tokenizer output name)."""
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    out = {}
    for name, role in roles.items():
        if role in encoded:
            out[name] = np.asarray(encoded[role]).astype(np.int64)
        elif role == "token_type_ids":  # tokenizers without segments (RoBERTa's): one segment
            out[name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
        elif role == "position_ids":
            raise TqcError(f"model input '{name}' takes position ids, which a tokenizer does not produce: give "
                           f".npz or .json data")
    return out


class FeedSource:
    """A re-iterable, validated stream of feed batches (calibration makes two passes over it)."""

    def __init__(self, spec: DataSpec, model: onnx.ModelProto):
        self.spec = spec
        self.model = model
        if spec.data is not None:
            self.kind, self.items = in_memory(spec)
        else:
            self._check_path(spec.path)
        self.tokenizer = load_tokenizer(spec.tokenizer, model) if self.kind == "text" else None
        if self.kind == "text":  # no longer than the model's position table (truncated, with a note)
            from tqc.compiler.io.data_limits import text_max_length

            spec.max_length = text_max_length(model, spec.max_length)
            unknown = sorted(set((spec.input_map or {}).values()) - set(INPUT_ROLES))
            if unknown:
                raise TqcError(f"--input-map: '{unknown[0]}' is not a tokenizer output (use {', '.join(INPUT_ROLES)})")
        self.roles = input_roles(model, spec.input_map, strict=True) if self.kind == "text" else None
        self.sentences = self._sentences() if self.kind == "text" else None
        first = next(iter(self), None)
        if first is None:
            raise TqcError(f"{spec.describe()} holds no samples")

    def _check_path(self, text: str) -> None:
        path = Path(text)
        self.kind = self._kind(text)
        if self.kind != "script":
            if not path.exists():
                raise TqcError(f"data '{path}' does not exist")
            if path.is_dir():
                raise TqcError(f"data '{path}' is a directory; expected .npz, .json, .txt or script.py:function")
        self.items = None

    def _sentences(self) -> list[str]:
        """The texts, in memory or read from the ``.txt``, as calibration takes them (``skip``, ``samples``)."""
        spec = self.spec
        if self.items is not None:
            return select_sentences(self.items, spec.skip, spec.samples, where=spec.describe())
        return read_sentences(Path(spec.path), spec.skip, spec.samples)

    @staticmethod
    def _kind(text: str) -> str:
        if ".py:" in text:
            return "script"
        suffix = Path(text).suffix.lower()
        kinds = {".npz": "npz", ".json": "json", ".txt": "text"}
        if suffix not in kinds:
            raise TqcError(f"data '{text}': unknown format (use .npz, polygraphy .json, .txt sentences, "
                           f"or script.py:function)")
        return kinds[suffix]

    def __iter__(self) -> Iterator[Feed]:
        spec = self.spec
        where = spec.describe()
        if self.kind == "npz":
            arrays = self.items if self.items is not None else _read_npz(Path(spec.path))
            if not arrays:
                raise TqcError(f"{where} holds no arrays")
            for i, batch in enumerate(_batches_from_arrays(arrays, spec.batch_size, spec.samples)):
                yield _validate(_rename(batch, spec.input_map), self.model, f"{where} batch {i}")
        elif self.kind == "json":
            taken = 0
            items = self.items if self.items is not None else _read_polygraphy_json(Path(spec.path))
            for i, feed in enumerate(items):
                feed = _validate(_rename(feed, spec.input_map), self.model, f"{where} item {i}")
                yield feed
                taken += next(iter(feed.values())).shape[0]
                if spec.samples and taken >= spec.samples:
                    return
        elif self.kind == "script":
            from tqc.compiler.io.data_limits import user_loader_feeds

            loader = _load_script(spec.path)
            taken = 0
            for i, feed in enumerate(user_loader_feeds(loader, f"'{spec.path}'")):
                feed = _validate(_rename(feed, spec.input_map), self.model, f"{where} item {i}")
                yield feed
                taken += next(iter(feed.values())).shape[0]
                if spec.samples and taken >= spec.samples:
                    return
        else:
            sentences = self.sentences  # read (and checked) once: calibration iterates twice
            for i in range(0, len(sentences), spec.batch_size):
                feed = tokenize(self.tokenizer, sentences[i:i + spec.batch_size], self.roles, spec.max_length)
                yield _validate(feed, self.model, f"{where} sentences {i}..")


def select_sentences(texts: Iterable[str], skip: int = 0, limit: int | None = None, where: str = "texts") -> list[str]:
    """Sentences as the lines of a ``.txt`` (or texts given in memory) are taken: stripped, blank ones dropped
    (control characters noted), the first ``skip`` skipped, at most ``limit``."""
    kept = [text for text in (item.strip() for item in texts) if text]
    note_control_characters(kept, where)
    kept = kept[skip:]
    return kept[:limit] if limit else kept


def in_memory(spec: DataSpec) -> tuple[str, object]:
    """(kind, items) of data given from Python, read as the file of that kind would be: a list of texts ->
    ``text``, a dict of arrays -> ``npz``, any other iterable of feed dicts -> ``json`` (taken up to
    ``spec.samples`` rows, once: a generator is not re-run). Anything else is refused in one line."""
    data, label = spec.data, spec.label
    if isinstance(data, Mapping):
        arrays = {}
        for name, value in data.items():
            if not isinstance(name, str):
                raise TqcError(f"{label}: a dict of arrays is keyed by input name, got the key {name!r}")
            array = np.asarray(value)
            if array.ndim == 0 or array.dtype == object:
                raise TqcError(f"{label}: '{name}' is not an array with the batch on axis 0 "
                               f"(got {type(value).__name__})")
            arrays[name] = array
        return "npz", arrays
    if isinstance(data, (str, bytes, np.ndarray)) or not isinstance(data, Iterable):
        raise TqcError(f"{label} must be a path, a list of texts, a dict of arrays (input name -> array) or an "
                       f"iterable of such dicts, got {type(data).__name__}")
    if isinstance(data, (list, tuple)) and data and all(isinstance(item, str) for item in data):
        return "text", list(data)
    if isinstance(data, (list, tuple)) and any(isinstance(item, str) for item in data):
        index, item = next((i, x) for i, x in enumerate(data) if not isinstance(x, str))
        raise TqcError(f"{label}: item {index} of the list of texts is {type(item).__name__}, not a text")
    from tqc.compiler.io.data_limits import user_loader_feeds

    feeds, taken = [], 0
    for feed in user_loader_feeds(lambda: data, "", what=label):
        feeds.append(feed)
        rows = [len(v) for v in feed.values() if np.ndim(v) > 0]
        taken += rows[0] if rows else 1
        if spec.samples and taken >= spec.samples:
            break
    return "json", feeds


def comparison_feeds(model: onnx.ModelProto, spec: DataSpec | None) -> list[Feed]:
    """The inputs a diff runs both models on: the data ``spec`` names, validated against ``model``, else two
    small batches drawn from its signature (random token ids below the vocabulary, sequences of 16 or the
    position table's length when shorter)."""
    if spec is not None:
        return list(FeedSource(spec, model))
    from tqc.compiler.io.data_limits import limits_of
    from tqc.compiler.runtime.feeds import synthesize_feeds

    longest = limits_of(model).max_sequence  # drawn no longer than the position table
    return synthesize_feeds(model, count=2, seq=min(16, longest or 16))
