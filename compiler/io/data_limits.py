"""What data a model can take, read from its graph, and the check of every feed against it.

    input_ids ─► Gather(word_embeddings [V, H])          ids in [0, V)
    token_type_ids ─► Gather(token_type_embeddings [T, H])  types in [0, T)
    positions ─► Gather(position_embeddings [P, H])      sequence length <= P - offset
        BERT:     positions = Slice(arange buffer, 0, S)          offset 0
        RoBERTa:  positions = CumSum(mask) * mask + padding_idx   offset padding_idx + 1
    EmbedLayerNormalization(input_ids, segment_ids, word [V, H], position [P, H], segment [T, H], ...)  (fused)
    no position table (ModernBERT: rotary; DeBERTa-v3: relative positions only): the config's
        max_position_embeddings, recorded at export as ``tqc.max_positions``; without it, no limit is known

Other 2-D tables whose indices are computed, not read from an input (MPNet's relative attention bias
buckets), limit nothing. Indices are followed back through Cast nodes to the graph input they come from. A
feed outside these limits would make ONNX Runtime fail inside a Gather ("indices element out of data bounds",
printed by ORT itself) or compute garbage; here it is one line naming the input, the value and the table.
Text is cut to the position table when no ``--max-length`` is given (a progress line), an explicit longer
limit is refused; arrays are refused, since tqc cannot know how to shorten them. Batches must not be empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import input_role_by_name

_EMBED_LAYERNORM = "EmbedLayerNormalization"
MAX_POSITIONS_KEY = "tqc.max_positions"  # export metadata: max_position_embeddings of a model without a table


@dataclass
class ModelLimits:
    """``tables``: graph input -> (rows of the embedding table it indexes, table name);
    ``max_sequence``: longest sequence the position table covers, else the recorded ``max_position_embeddings``
    (None: neither found); ``position_table``: the table's name (None when the limit is the recorded one)."""

    tables: dict[str, tuple[int, str]] = field(default_factory=dict)
    max_sequence: int | None = None
    position_table: str | None = None

    def rows(self, name: str) -> int | None:
        entry = self.tables.get(name)
        return entry[0] if entry else None

    @property
    def positions_source(self) -> str:
        """Where ``max_sequence`` comes from, for messages: the position table, or the recorded config value."""
        if self.position_table is not None:
            return f"position table '{self.position_table}'"
        return f"recorded max_position_embeddings ({MAX_POSITIONS_KEY}: exported without a position table)"


def _constant_values(model: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    """Shapes of initializers, and values of small constants (initializers and Constant nodes)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if len(t.dims) <= 1 and np.prod(t.dims, dtype=np.int64) <= 16 and t.data_location != onnx.TensorProto.EXTERNAL:
            try:
                values[t.name] = numpy_helper.to_array(t)
            except Exception:  # noqa: BLE001 - an unreadable constant is simply not used
                pass
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and len(attr.t.dims) <= 1:
                    try:
                        values[node.output[0]] = numpy_helper.to_array(attr.t)
                    except Exception:  # noqa: BLE001
                        pass
                    shapes.setdefault(node.output[0], tuple(attr.t.dims))
    return shapes, values


def model_limits(model: onnx.ModelProto) -> ModelLimits:
    """The limits of ``model`` (a full model or a skeleton: only dims of the tables are read)."""
    shapes, values = _constant_values(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    inputs = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}

    def source_input(name: str) -> str | None:
        for _ in range(4):  # through Casts (fused graphs feed int32 copies of the inputs)
            if name in inputs:
                return name
            node = producers.get(name)
            if node is None or node.op_type not in ("Cast", "Identity"):
                return None
            name = node.input[0]
        return None

    def position_offset(name: str) -> int | None:
        """How far the largest position index lies beyond S - 1 (BERT 0, RoBERTa padding_idx + 1), or None
        when the indices are not computed positions."""
        offset, seen_cumsum, current = 0, False, name
        for _ in range(12):
            node = producers.get(current)
            if node is None:
                return None
            if node.op_type == "Slice":  # a slice of the constant arange buffer: positions 0..S-1
                return offset + (1 if seen_cumsum else 0)
            if node.op_type == "CumSum":
                seen_cumsum = True
            if node.op_type == "Add":
                constants = [values[i] for i in node.input if i in values]
                if constants and constants[0].size == 1:
                    offset += int(constants[0].reshape(-1)[0])
            if node.op_type in ("Range",) or (seen_cumsum and node.op_type in ("Equal", "Not")):
                return offset + (1 if seen_cumsum else 0)
            dynamic = [i for i in node.input if i and i not in values and i not in shapes]
            if not dynamic:
                return None
            current = dynamic[0]
        return None

    limits = ModelLimits()

    def table(name: str, rows_of: str, label: str) -> None:
        source = source_input(name)
        dims = shapes.get(rows_of)
        if source is not None and dims and len(dims) == 2 and source not in limits.tables:
            limits.tables[source] = (int(dims[0]), label)

    def positions(name: str | None, rows_of: str, label: str) -> None:
        dims = shapes.get(rows_of)
        if not dims or len(dims) != 2:
            return
        offset = 0 if not name else position_offset(name)
        if offset is None:
            return
        longest = int(dims[0]) - offset
        if longest > 0 and (limits.max_sequence is None or longest < limits.max_sequence):
            limits.max_sequence, limits.position_table = longest, label

    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and len(shapes.get(node.input[0], ())) == 2:
            data, indices = node.input
            if source_input(indices) is not None:
                table(indices, data, data)
            elif "position" in data.lower():
                positions(indices, data, data)
        elif node.op_type == _EMBED_LAYERNORM and node.domain == "com.microsoft":
            ins = list(node.input) + [""] * (9 - len(node.input))
            if ins[0]:
                table(ins[0], ins[2], ins[2])
            if ins[1] and ins[4]:
                table(ins[1], ins[4], ins[4])
            if ins[3]:
                positions(ins[8] or None, ins[3], ins[3])
    if limits.max_sequence is None:
        limits.max_sequence = recorded_positions(model)
    return limits


def recorded_positions(model: onnx.ModelProto) -> int | None:
    """``tqc.max_positions`` from the export metadata (a positive integer), else None."""
    value = next((p.value for p in model.metadata_props if p.key == MAX_POSITIONS_KEY), None)
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


_CACHE: dict[int, tuple[onnx.ModelProto, ModelLimits]] = {}


def limits_of(model: onnx.ModelProto) -> ModelLimits:
    """``model_limits``, computed once per model object."""
    entry = _CACHE.get(id(model))
    if entry is None or entry[0] is not model:
        entry = (model, model_limits(model))
        _CACHE[id(model)] = entry
    return entry[1]


def check_feed(feed: dict[str, np.ndarray], model: onnx.ModelProto, where: str) -> dict[str, np.ndarray]:
    """``feed`` unchanged when it fits the model's tables, else one ``TqcError`` line."""
    limits = limits_of(model)
    for name, value in feed.items():
        if value.size == 0:
            raise TqcError(f"{where}: input '{name}' is empty")
        entry = limits.tables.get(name)
        if entry is not None and np.issubdtype(value.dtype, np.integer):
            rows, table_name = entry
            low, high = int(value.min()), int(value.max())
            if low < 0 or high >= rows:
                bad = low if low < 0 else high
                raise TqcError(f"{where}: input '{name}' holds {bad}, outside the {rows} rows of '{table_name}' "
                               f"(valid: 0..{rows - 1}){_tokenizer_hint(name)}")
    if limits.max_sequence is not None:
        for name, value in feed.items():
            if name in limits.tables and value.ndim >= 2 and value.shape[-1] > limits.max_sequence:
                raise TqcError(f"{where}: input '{name}' has sequence length {value.shape[-1]}, the model's "
                               f"{limits.positions_source} covers at most {limits.max_sequence}")
    return feed


def _tokenizer_hint(name: str) -> str:
    if input_role_by_name(name) == "token_type_ids":
        return ""
    return ": was the data tokenized with another model's tokenizer?"


DEFAULT_TEXT_MAX_LENGTH = 128  # tokens per sentence when --max-length is not given


def text_max_length(model: onnx.ModelProto, requested: int | None, progress=None) -> int:
    """The token limit for text. ``requested`` None (no ``--max-length``): 128, or the model's positions when
    fewer (said in a progress line). An explicit value beyond the position table is a mistake, refused: text
    cut to fewer tokens than asked for would calibrate on other data than the user named."""
    longest = limits_of(model).max_sequence
    if requested is None:
        if longest is not None and longest < DEFAULT_TEXT_MAX_LENGTH:
            (progress or progress_note)(f"text is truncated to {longest} tokens, the model's positions (the "
                                        f"default limit is {DEFAULT_TEXT_MAX_LENGTH})")
            return longest
        return DEFAULT_TEXT_MAX_LENGTH
    if requested < 1:
        raise TqcError(f"--max-length must be at least 1, got {requested}")
    if longest is not None and requested > longest:
        raise TqcError(f"--max-length {requested} is beyond the model's {longest} positions "
                       f"({limits_of(model).positions_source}): give at most {longest}, or leave it out")
    return requested


def progress_note(message: str) -> None:
    """A progress line through the running command's UI (nothing outside the CLI)."""
    ui = _current_ui()
    if ui is not None and hasattr(ui, "progress"):
        ui.progress(message)


def user_note(message: str) -> None:
    """Data accepted but suspicious: ``tqc: note: ...`` on stderr through the running command's UI (shown even
    with -q); outside the CLI a Python warning."""
    ui = _current_ui()
    if ui is not None and hasattr(ui, "note"):
        ui.note(message)
    else:
        import warnings

        warnings.warn(message, stacklevel=3)


def _current_ui():
    try:
        import click

        return click.get_current_context().find_root().obj
    except RuntimeError:
        return None


def check_sequence(model: onnx.ModelProto, seq: int, what: str) -> None:
    """Refuse a sequence length beyond the position table (bench shapes)."""
    longest = limits_of(model).max_sequence
    if longest is not None and seq > longest:
        raise TqcError(f"{what}: sequence {seq} is beyond the model's {limits_of(model).positions_source}: "
                       f"{longest} positions")


# ---------------------------------------------------------------- user code (``loader.py:function``)

def _describe_exit(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    text = " ".join(str(exc).split())
    return f"raised {type(exc).__name__}" + (f": {text[:200]}" if text else "")


def user_loader_feeds(loader, label: str, what: str = "data loader"):
    """Feed dicts from a user's data loader function, each call into user code guarded: an exception or a
    ``SystemExit`` (``sys.exit(0)`` would otherwise end tqc with exit 0 and no output) becomes one
    ``TqcError`` naming the loader; a wrong return type too. Ctrl-C still interrupts. ``what`` names the source
    in those lines (the Python API passes its argument's name, with an empty ``label``)."""
    where = f"{what} {label}".strip()
    if not callable(loader):
        raise TqcError(f"{where} is not a function (it is a {type(loader).__name__})")
    try:
        result = loader()
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: anything it does is reported
        raise TqcError(f"{where} {_describe_exit(exc)}") from None
    if isinstance(result, (dict, str, bytes, np.ndarray)) or result is None or not hasattr(result, "__iter__"):
        raise TqcError(f"{where} returned {type(result).__name__}; it must return or yield feed "
                       "dicts (input name -> array), e.g. a list of dicts")
    iterator = iter(result)
    index = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except KeyboardInterrupt:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            raise TqcError(f"{where} {_describe_exit(exc)} (while producing item {index})") from None
        if not isinstance(item, dict):
            raise TqcError(f"{where} yielded {type(item).__name__} as item {index}; each item must be a "
                           "dict of input name -> array")
        yield item
        index += 1
