"""What each model input means, and inputs for verification and diffs drawn from the model when none are given.

Roles come from the graph, not from the names (``input_roles``)::

    ids  ─► (Cast/Unsqueeze...) ─► Gather(table [30522, H])   the largest embedding table: token ids
    tt   ─► (Cast...)           ─► Gather(table [2, H])       a small table (<= 16 rows): token types
    pos  ─► (Cast...)           ─► Gather(table [512, H])     another table: position ids
    mask ─► Cast/Unsqueeze/Sub/Mul/Where ...                  the integer input that indexes no table: the mask
    (fused graphs: EmbedLayerNormalization's input_ids / segment_ids / mask / position_ids inputs)

A role is named by the tokenizer output that feeds it (``input_ids``, ``attention_mask``, ``token_type_ids``,
``position_ids``). An explicit ``--input-map ids=input_ids,mask=attention_mask`` overrides the graph.

Token-id inputs get random ids below the vocabulary size (the embedding table's rows), attention masks get
right padding on every other row (so masking paths are exercised), token-type ids are zeros then ones (zeros for
a one-row table), position ids count up. Dynamic dimensions resolve to batch 2 and sequence 16 unless asked
otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from tqc.compiler.core.errors import TqcError
from tqc.compiler.core.target import INPUT_ROLES, input_role_by_name
from tqc.compiler.io.data_limits import recorded_positions

Feed = dict[str, np.ndarray]
TOKEN_TYPE_MAX_ROWS = 16  # token-type tables hold a handful of rows (BERT 2, RoBERTa 1); positions hundreds
_TRANSPARENT = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"}
_EMBED_LAYERNORM_ROLES = {0: "input_ids", 1: "token_type_ids", 7: "attention_mask", 8: "position_ids"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints or dim-param strings / None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def _table_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of constant tensors an embedding Gather may read: initializers, Constants, and the outputs of
    DequantizeLinear/Cast/Identity applied to them (quantized or FP16 tables)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    for node in model.graph.node:  # in graph order, so chains resolve
        if node.op_type in ("DequantizeLinear", "Cast", "Identity") and node.input and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
    return shapes


def _embedding_evidence(name: str, consumers, shapes) -> tuple[list[int], set[str]]:
    """(rows of every embedding table the input indexes, roles a fused embedding op gives it)."""
    rows, roles, frontier, seen = [], set(), [name], set()
    for _ in range(6):  # a few transparent ops at most between an input and its Gather
        following = []
        for tensor in frontier:
            if tensor in seen:
                continue
            seen.add(tensor)
            for node, index in consumers.get(tensor, ()):
                if node.op_type == "Gather" and index == 1 and len(shapes.get(node.input[0], ())) == 2:
                    rows.append(int(shapes[node.input[0]][0]))
                elif node.op_type == "EmbedLayerNormalization" and index in _EMBED_LAYERNORM_ROLES:
                    roles.add(_EMBED_LAYERNORM_ROLES[index])
                elif node.op_type in _TRANSPARENT and index == 0:
                    following += list(node.output)
        frontier = following
    return rows, roles


def input_roles(model: onnx.ModelProto, explicit: dict[str, str] | None = None,
                strict: bool = False) -> dict[str, str | None]:
    """Model input name -> role (a key of ``INPUT_ROLES``), found from the graph; None where the graph does not tell.

    ``explicit`` (from ``--input-map``: model input -> tokenizer output) wins over the graph. The graph's
    evidence: the input indexing the largest embedding table is the token ids, a table of at most 16 rows the
    token types, another table the position ids; in a token model, the one integer [batch, sequence] input that
    indexes no table is the attention mask. An input the graph says nothing about keeps its role when its name
    is the tokenizer's own (``attention_mask``...). ``strict``: an input without a role, or two inputs with the
    same role, is one error line that asks for ``--input-map``."""
    specs = input_specs(model)
    names = [s.name for s in specs]
    explicit = dict(explicit or {})
    for name, role in explicit.items():
        if name not in names:
            raise TqcError(f"--input-map: '{name}' is not an input of the model (inputs: {', '.join(names)})")
        if role not in INPUT_ROLES:
            raise TqcError(f"--input-map: '{role}' is not a tokenizer output (use {', '.join(INPUT_ROLES)})")
    consumers = defaultdict(list)
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            if tensor:
                consumers[tensor].append((node, index))
    shapes = _table_shapes(model)
    evidence = {s.name: _embedding_evidence(s.name, consumers, shapes) for s in specs}
    roles: dict[str, str | None] = {name: None for name in names}
    for name, (_, fused_roles) in evidence.items():
        if len(fused_roles) == 1:
            roles[name] = next(iter(fused_roles))
    largest = max((max(rows) for rows, _ in evidence.values() if rows), default=0)
    for name, (rows, _) in evidence.items():
        if rows and roles[name] is None:
            top = max(rows)
            roles[name] = ("input_ids" if top == largest else
                           "token_type_ids" if top <= TOKEN_TYPE_MAX_ROWS else "position_ids")
    if any(role == "input_ids" for role in roles.values()):
        # A token model: the [batch, sequence] inputs that index no table are mask candidates.
        candidates = [s.name for s in specs if roles[s.name] is None and len(s.shape) == 2
                      and (np.issubdtype(s.dtype, np.integer) or s.dtype in (np.bool_, np.float32))]
        if len(candidates) == 1 and "attention_mask" not in roles.values():
            roles[candidates[0]] = "attention_mask"
    for name in names:
        if roles[name] is None and name in INPUT_ROLES and name not in roles.values():
            roles[name] = name  # the graph is silent; the tokenizer's own name
    roles.update(explicit)
    if strict:
        for name, role in roles.items():
            if role is None:
                raise TqcError(f"cannot tell from the graph which tokenizer output feeds model input '{name}': "
                               f"give --input-map {name}=<{'|'.join(INPUT_ROLES)}>")
        for role in INPUT_ROLES:
            holders = [name for name, r in roles.items() if r == role]
            if len(holders) > 1 and not all(name in explicit for name in holders):  # explicit sharing is fine
                raise TqcError(f"model inputs {', '.join(repr(h) for h in holders)} all look like {role}: give "
                               f"--input-map {holders[0]}=<{'|'.join(INPUT_ROLES)}>,...")
    return roles


def vocab_size(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of the largest embedding table the input indexes (through casts and reshapes)."""
    consumers = defaultdict(list)
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            consumers[tensor].append((node, index))
    rows, _ = _embedding_evidence(input_name, consumers, _table_shapes(model))
    return max(rows) if rows else None


def _resolve(dims: tuple, batch: int, seq: int) -> tuple[int, ...]:
    out = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        else:
            text = str(dim or "").lower()
            if "batch" in text or (axis == 0 and "seq" not in text):
                out.append(batch)
            else:
                out.append(seq)
    return tuple(out)




def synthesize_feeds(model: onnx.ModelProto, count: int = 2, batch: int = 2, seq: int = 16,
                     seed: int = 0, roles: dict[str, str | None] | None = None) -> list[Feed]:
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    roles = roles if roles is not None else input_roles(model)
    for spec in specs:  # random strings would be fed as floats, and string outputs cannot be compared numerically
        if not (np.issubdtype(spec.dtype, np.number) or spec.dtype == np.bool_):
            raise TqcError(f"model input '{spec.name}' holds {_dtype_name(spec.dtype)}: tqc draws test inputs for "
                           "numeric inputs only (compile: --verify structure; diff: give --data)")
    feeds = []
    for _ in range(count):
        feed: Feed = {}
        for spec in specs:
            shape = _resolve(spec.shape, batch, seq)
            role = roles.get(spec.name) or input_role_by_name(spec.name)
            if np.issubdtype(spec.dtype, np.integer):
                if role == "attention_mask":
                    value = np.ones(shape, dtype=spec.dtype)
                    if len(shape) == 2 and shape[1] > 2:
                        value[1::2, shape[1] * 3 // 4:] = 0
                elif role == "token_type_ids":
                    value = np.zeros(shape, dtype=spec.dtype)
                    if len(shape) == 2:
                        value[:, shape[1] // 2:] = 1
                    limit = vocab_size(model, spec.name)
                    if limit == 1:
                        value[:] = 0
                elif role == "position_ids":
                    value = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
                else:
                    high = min(vocab_size(model, spec.name) or 1000, 30000)
                    value = rng.integers(low=min(5, high - 1), high=high, size=shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                value = np.ones(shape, dtype=np.bool_)
                if role == "attention_mask" and len(shape) == 2 and shape[1] > 2:
                    value[1::2, shape[1] * 3 // 4:] = False
            elif roles.get(spec.name) == "attention_mask":  # a float mask: 1 keep, 0 padding
                value = np.ones(shape, dtype=spec.dtype)
                if len(shape) == 2 and shape[1] > 2:
                    value[1::2, shape[1] * 3 // 4:] = 0
            else:
                value = rng.standard_normal(shape).astype(spec.dtype)
            feed[spec.name] = value
        feeds.append(feed)
    return feeds


def _dtype_name(dtype) -> str:
    return "strings" if np.dtype(dtype).kind in "OSU" else f"{np.dtype(dtype)} values"


VERIFICATION_SHAPES = ((2, 16), (3, 9))  # batch x sequence: two small shapes, each with a padded row


def max_positions(model: onnx.ModelProto) -> int | None:
    """The longest sequence the model's position table allows (None when it has none: no limit found).

    The position table is taken as the second largest embedding table (a Gather's 2-D constant data; the
    largest is the vocabulary), when it has more than 2 rows (token-type tables have 1 or 2): conservative, a
    larger token-type table only shortens the drawn sequences. Two rows are kept back for RoBERTa's offset
    positions. A model without one (rotary, relative positions only) gives the ``max_position_embeddings``
    its export recorded, if any."""
    shapes = _table_shapes(model)
    rows = sorted({int(shapes[n.input[0]][0]) for n in model.graph.node
                   if n.op_type == "Gather" and len(shapes.get(n.input[0], ())) == 2}, reverse=True)
    return rows[1] - 2 if len(rows) > 1 and rows[1] > 2 else recorded_positions(model)


def verification_feeds(model: onnx.ModelProto, shapes: tuple[tuple[int, int], ...] = VERIFICATION_SHAPES,
                       seed: int = 0) -> list[Feed]:
    """A few small batches within the model's limits for the numeric check after every pass: token ids below
    the vocabulary, sequences no longer than the position table allows, one feed per batch x sequence shape
    (fixed dimensions of the signature win)."""
    limit = max_positions(model)
    roles = input_roles(model)
    feeds = []
    for index, (batch, seq) in enumerate(shapes):
        seq = max(1, min(seq, limit)) if limit else seq
        feeds += synthesize_feeds(model, count=1, batch=batch, seq=seq, seed=seed + index, roles=roles)
    return feeds
