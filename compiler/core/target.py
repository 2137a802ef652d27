"""Every fact about a deployment target, and about how an encoder's inputs are recognised, in one place.

    Target                  one deployment target: every fact the passes act on (below), one instance per name
    Target.named(name)      the one place a target's name (``--target``, ``CompileOptions.target``) becomes a Target
    TARGETS                 trt | ort-cpu | ort-cuda | openvino (the names: the CLI's --target choices)
    Int8MhaLimits           TensorRT 10's fused INT8 attention limits (qdq's placement, ``tqc check``)
    attention_heads(dims)   (heads, head size) of the canonical attention layout's Reshape target
    input_role_by_name(n)   the name-based guess of an input's role (mask, token types, positions, ids), for
                            drawing inputs where the graph gives no evidence (``runtime.feeds.input_roles``
                            reads the evidence first)

The passes ask a Target what it does, never which one it is: ``target.contrib_ops``, not ``target == "ort-cpu"``.
A new target is one more row of the table below (and its writer in ``compiler/tools/``).

TensorRT 10's fused INT8 multi-head attention runs only for head sizes 16/32/64 and sequences up to 512: ``qdq``
places INT8 attention by these limits and ``tqc check`` reports by them. The sequence a model will see comes
from ``--shapes`` (the profile's max), else from the longest of the calibration lengths and the positions its
position table allows (``position_table_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from tqc.compiler.core.errors import TqcError, did_you_mean


@dataclass(frozen=True)
class Int8MhaLimits:
    """Where a target's fused INT8 attention runs: these head sizes, sequences up to ``max_sequence``."""

    head_sizes: tuple[int, ...]
    max_sequence: int


TRT_INT8_MHA = Int8MhaLimits(head_sizes=(16, 32, 64), max_sequence=512)


@dataclass(frozen=True)
class Target:
    """A deployment target: what its runtime reads and runs, as the passes need to know it.

    ``str(target)`` is its name. Two targets differ only in these facts; a pass that needs another one adds a
    field here (with a value in every row of the table), never a comparison of names.
    """

    name: str
    runtime: str                       # who runs the graph, as messages name it
    contrib_ops: bool                  # reads com.microsoft ops (Attention, SkipLayerNormalization, QAttention...);
                                       # else standard ONNX only: fuse writes standard ops (Gelu at opset 20)
    attention_mask_format: str         # fuse{mask=auto}: 'end' (token counts, ORT's fused CUDA kernels) or 'raw'
    skip_layernorm_form: str           # fuse{skip_layernorm=auto}: 'sum' (Sum + LayerNormalization) or 'contrib'
    symmetric_int8_activations: bool   # qdq: INT8 activations, zero point 0 (else asymmetric UINT8)
    activation_form_by_consumer: bool  # qdq: the activation's form follows its consumer (qdq/openvino.py)
    qdq_per_consumer: bool             # qdq: one Q/DQ pair per consumer (ORT fuses DQ -> MatMul), else per tensor
    int8_attention_matmuls: bool       # qdq: quantizes attention's batched MatMuls (runs them in INT8)
    int8_attention_by_default: bool    # qdq{attention=auto}: ...and does so by default (openvino: float attention
                                       # runs faster on AMX CPUs, as fast elsewhere; passes/qdq/openvino.py)
    zero_points_in_bias: bool          # qdq: a linear layer's UINT8 input zero point moves into its bias (zero
                                       # point 0 at run time: OpenVINO's fast INT8 path; passes/qdq/openvino.py)
    shared_qkv_scale: bool             # qdq: with INT8 attention, q, k and v of a packed projection share one
                                       # Q/DQ before the Split, their ranges equalized (OpenVINO fuses it into
                                       # the projection: no reorders; passes/qdq/shared_qkv.py)
    smoothing_folded: bool             # qdq: SmoothQuant's Mul and shift Add after a LayerNorm fold into a
                                       # second LayerNorm (OpenVINO then fuses the first one's affine into the
                                       # residual Add; passes/qdq/openvino.py)
    qkv_unpacked: bool                 # qdq: a packed QKV projection split into q, k, v (not through a shared
                                       # Q/DQ) becomes three MatMuls: OpenVINO's Split runs a reference kernel
    int8_mha: Int8MhaLimits | None     # ...only within these limits (None: no limit)
    residual_add_qdq: bool             # qdq{residual=true}: both inputs of residual Adds get Q/DQ
    qattention_by_default: bool        # qdq{qattention=auto}: fused Attentions become QAttention (without budget)
    shift_by_default: bool             # qdq{shift=auto}: the channel-wise shift's Add before each smoothed input's
                                       # Q is free: OpenVINO within 1% (MiniLM); TensorRT fuses pointwise ops into
                                       # its Q; ORT CPU with shift_folded (its Adds alone cost 1-9%)
    shift_folded: bool                 # qdq: the shift's Add after a LayerNorm folds into its beta (the residual
                                       # Sum and the split's float part take it back), and the attention output's
                                       # smoothing Mul and shift Add into QAttention's value columns: no node where
                                       # there were two (passes/qdq/shift_fold.py). ORT CPU: MiniLM with the shift
                                       # 0.94-1.03x the time of the unshifted placement (bench/bench_qdq_speed.py)
    split_by_default: bool             # qdq{split=auto}: outlier input channels run in float beside the INT8
                                       # MatMul: TensorRT fuses the Mul/Add (not measured, as the shift); ORT CPU
                                       # 6-10% slower on MiniLM gathered (passes/qdq/split.py); recomputed, FFN output
                                       # layers only: ORT CPU 2-5%, OpenVINO 3-4%
    split_recomputed: bool             # qdq{split}'s float part recomputed from the producing layer where there
                                       # is one (passes/qdq/split_producer.py): on OpenVINO this keeps the FFN
                                       # input layer's fused INT8 chain, and split=auto splits those layers only
                                       # (ORT CPU too: its cost was in splitting the FFN input layers)
    cuda_graphs: bool                  # the runtime can capture CUDA graphs, unless it places a node on the CPU:
                                       # compile notes which (compiler/analysis/cuda_placement.py)

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def named(name: str) -> "Target":
        """The target called ``name``; an unknown name is a user mistake (did-you-mean)."""
        if name not in BY_NAME:
            raise TqcError(f"unknown target '{name}'{did_you_mean(name, BY_NAME)}")
        return BY_NAME[name]


# The table: one row per target. openvino fuses as trt does (standard ONNX: OpenVINO's CPU plugin fuses
# LayerNorm, the Erf GELU and Q/DQ itself) and quantizes by its own forms (passes/qdq/openvino.py).
TRT = Target("trt", runtime="TensorRT", contrib_ops=False, attention_mask_format="raw", skip_layernorm_form="contrib",
             shared_qkv_scale=False, smoothing_folded=False, qkv_unpacked=False,
             symmetric_int8_activations=True, activation_form_by_consumer=False, qdq_per_consumer=False,
             int8_attention_matmuls=True, int8_attention_by_default=True, zero_points_in_bias=False,
             int8_mha=TRT_INT8_MHA, residual_add_qdq=True, qattention_by_default=False,
             shift_by_default=True, shift_folded=False, split_by_default=True, split_recomputed=False,
             cuda_graphs=False)
ORT_CPU = Target("ort-cpu", runtime="ONNX Runtime CPU", contrib_ops=True, attention_mask_format="raw",
                 shared_qkv_scale=False, smoothing_folded=False, qkv_unpacked=False,
                 skip_layernorm_form="sum", symmetric_int8_activations=False, activation_form_by_consumer=False,
                 qdq_per_consumer=True, int8_attention_matmuls=False, int8_attention_by_default=False,
                 zero_points_in_bias=False, int8_mha=None, residual_add_qdq=False, qattention_by_default=True,
                 shift_by_default=True, shift_folded=True, split_by_default=True, split_recomputed=True,
                 cuda_graphs=False)
ORT_CUDA = Target("ort-cuda", runtime="ONNX Runtime CUDA", contrib_ops=True, attention_mask_format="end",
                  shared_qkv_scale=False, smoothing_folded=False, qkv_unpacked=False,
                  skip_layernorm_form="contrib", symmetric_int8_activations=False, activation_form_by_consumer=False,
                  qdq_per_consumer=True, int8_attention_matmuls=False, int8_attention_by_default=False,
                  zero_points_in_bias=False, int8_mha=None, residual_add_qdq=False, qattention_by_default=False,
                  shift_by_default=False, shift_folded=False, split_by_default=False, split_recomputed=False,
                  cuda_graphs=True)
OPENVINO = Target("openvino", runtime="OpenVINO", contrib_ops=False, attention_mask_format="raw",
                  shared_qkv_scale=True, smoothing_folded=True, qkv_unpacked=True,
                  skip_layernorm_form="contrib", symmetric_int8_activations=False, activation_form_by_consumer=True,
                  qdq_per_consumer=False, int8_attention_matmuls=True, int8_attention_by_default=False,
                  zero_points_in_bias=True, int8_mha=None, residual_add_qdq=False, qattention_by_default=False,
                  shift_by_default=True, shift_folded=False, split_by_default=True, split_recomputed=True,
                  cuda_graphs=False)
BY_NAME = {t.name: t for t in (TRT, ORT_CPU, ORT_CUDA, OPENVINO)}
TARGETS = tuple(BY_NAME)  # the names, in the CLI's order
DEFAULT_TARGET = "trt"  # tqc compile's --target default (compiler/cli/main.py), and tqc.compile's


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


CALIBRATION_LENGTHS = "the calibration lengths"  # sequence_bound's reason when no profile or table bounds it


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
        return longest, CALIBRATION_LENGTHS
    return None, ""
