"""Every fact about a deployment target, and about how an encoder's inputs are recognised, in one place.

    TARGETS                 trt | ort-cpu | ort-cuda | openvino (the CLI's --target choices, the passes' targets)
    fusion_target(t)        whose fusion forms apply: openvino fuses as trt does (standard ONNX ops)
    uses_contrib_ops(t)     ONNX Runtime targets read com.microsoft ops; trt and openvino do not
    TRT_INT8_MHA_*          TensorRT 10's fused INT8 attention limits (qdq's placement, ``tqc check``)
    attention_heads(dims)   (heads, head size) of the canonical attention layout's Reshape target
    input_role_by_name(n)   the name-based guess of an input's role (mask, token types, positions, ids), for
                            drawing inputs where the graph gives no evidence (``runtime.feeds.input_roles``
                            reads the evidence first)

TensorRT 10's fused INT8 multi-head attention runs only for head sizes 16/32/64 and sequences up to 512: ``qdq``
places INT8 attention by these limits and ``tqc check`` reports by them. The sequence a model will see comes
from ``--shapes`` (the profile's max), else from the longest of the calibration lengths and the positions its
position table allows (``position_table_rows``).
"""

from __future__ import annotations

from typing import Callable, Iterable

TARGETS = ("trt", "ort-cpu", "ort-cuda", "openvino")
DEFAULT_TARGET = "trt"  # tqc compile's --target default (compiler/cli/main.py), and tqc.compile's
ORT_TARGETS = ("ort-cpu", "ort-cuda")
# Targets whose graphs are standard ONNX (no com.microsoft ops): fusion writes the ``trt`` form for them.
STANDARD_ONNX_FUSION = {"trt": "trt", "openvino": "trt"}


def fusion_target(target: str) -> str:
    """The target whose fusion rules apply: ``openvino`` fuses as ``trt`` does (standard ONNX ops)."""
    return STANDARD_ONNX_FUSION.get(target, target)


def uses_contrib_ops(target: str) -> bool:
    """ONNX Runtime targets run com.microsoft contrib ops (Attention, SkipLayerNormalization, QAttention...);
    the others (trt, openvino) read standard ONNX only, and quantize attention's batched MatMuls themselves."""
    return target in ORT_TARGETS


INPUT_ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def input_role_by_name(name: str) -> str:
    """The role an input's name suggests: ``*mask*`` -> attention_mask, ``*type*``/``*segment*`` ->
    token_type_ids, ``*position*`` -> position_ids, else input_ids. A guess for drawing inputs; user data is
    mapped by the graph's evidence (``tqc.compiler.runtime.feeds.input_roles``) or ``--input-map``."""
    low = name.lower()
    if "mask" in low:
        return "attention_mask"
    if "type" in low or "segment" in low:
        return "token_type_ids"
    if "position" in low:
        return "position_ids"
    return "input_ids"


def attention_heads(reshape_target) -> tuple[int, int] | None:
    """(heads, head size) from the Reshape target ``[0, 0, H, D]`` that splits the hidden axis into heads in
    the canonical attention layout; None for any other shape."""
    values = list(reshape_target) if reshape_target is not None else []
    if len(values) == 4 and values[2] > 0 and values[3] > 0:
        return int(values[2]), int(values[3])
    return None


TRT_INT8_MHA_HEAD_SIZES = (16, 32, 64)
TRT_INT8_MHA_MAX_SEQUENCE = 512

_PASS_THROUGH = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Expand")


def position_table_rows(gathers: Iterable[tuple[int, str]], producer: Callable[[str], tuple[str, list[str]] | None],
                        graph_inputs: set[str]) -> int | None:
    """Positions a model allows: rows of the embedding table gathered by computed position ids.

    ``gathers``: (table rows, indices tensor) of every Gather from a constant 2-D table; ``producer(name)``
    gives (op type, input names) of the node making a tensor. Word and token-type tables are gathered by graph
    inputs (through Casts or Reshapes at most) and are skipped; a ``position_ids`` input counts. RoBERTa-style
    positions (a CumSum over the padding mask) start at padding_idx + 1 = 2: two rows are not positions.
    """
    found = None
    for rows, indices in gathers:
        name, depth, cumsum, from_input = indices, 0, False, None
        frontier = [name]
        seen = set()
        while frontier and depth < 12:
            next_frontier = []
            for t in frontier:
                if t in seen:
                    continue
                seen.add(t)
                if t in graph_inputs:
                    from_input = t if from_input is None else from_input
                    continue
                made = producer(t)
                if made is None:
                    continue
                op, inputs = made
                cumsum |= op == "CumSum"
                next_frontier.extend(inputs[:1] if op in _PASS_THROUGH else [i for i in inputs if i])
            frontier = next_frontier
            depth += 1
        direct = from_input is not None and _direct(indices, producer, graph_inputs)
        if direct and "position" not in from_input.lower():
            continue  # word or token-type table
        positions = rows - 2 if cumsum else rows
        found = positions if found is None else max(found, positions)
    return found


def _direct(name: str, producer, graph_inputs: set[str]) -> bool:
    """``name`` is a graph input, or one through pass-through ops only."""
    for _ in range(8):
        if name in graph_inputs:
            return True
        made = producer(name)
        if made is None or made[0] not in _PASS_THROUGH:
            return False
        name = made[1][0]
    return False


def sequence_bound(profile_max: Iterable[list[int]] = (), lengths: Iterable[int] = (),
                   positions: int | None = None) -> tuple[int | None, str]:
    """The longest sequence the model will see, and where that bound comes from."""
    profile_max = [m for m in profile_max if len(m) >= 2]
    if profile_max:
        return max(m[1] for m in profile_max), "the --shapes profile's max"
    lengths = list(lengths)
    longest = max(lengths, default=0)
    if positions is not None and positions >= longest:
        return positions, f"the position table ({positions} positions)"
    if longest:
        return longest, "the calibration lengths"
    return None, ""
