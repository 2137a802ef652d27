"""Placement for ``--target openvino``: the Q/DQ forms OpenVINO's CPU plugin turns into INT8 kernels.

OpenVINO reads ONNX Q/DQ pairs as FakeQuantize; its low-precision transformations (LPT) then move the
dequantization past each MatMul and run it with integer inputs. What the placement chooses, and why (the
evidence is the compiled model's runtime graph, ``compiled_model.get_runtime_model()``, whose nodes carry
``layerType`` and ``runtimePrecision``; see ``tqc.compiler.io.openvino_ir.runtime_precisions`` and the README)::

  linear layer  x ─► Q(u8, s, zp) ─► DQ(u8, s, 0) ─► MatMul ◄─ DQ(axis 1) ◄─ W_int8   FullyConnected runs
                                                      └► Add(b - zp*s*sum_k W)         u8 x i8, bias fused
                (asymmetric UINT8 codes per tensor: a GELU output's [-0.17, 10] keeps every code, and u8 x s8
                 is the fast dot product on AVX2/VNNI CPUs; the zero point lives in the bias, below)
  attention     (``attention=true`` only; by default attention stays float, below)
                q ─► Q(i8, s, 0) ─► DQ ─► MatMul ◄─ DQ ◄─ Q(i8) ◄─ k^T        MatMul runs i8
                probs ─► Q(u8, 1/255, 0) ─► DQ ─► MatMul ◄─ DQ ◄─ Q(i8) ◄─ v   MatMul runs u8 x i8
                (Softmax outputs lie in [0, 1]: all 256 codes instead of trt's 128; on CPUs with AMX the
                 plugin folds both MatMuls, the mask, the Softmax and the probs' pair into one i8 Subgraph;
                 q, k and v then share one Q/DQ before the QKV Split, their ranges equalized, which the plugin
                 fuses into the projection: ``tqc.passes.qdq.shared_qkv``)
  float         LayerNorm (MVN), Softmax, the mask Add, residual Adds, GELU (fused into the FC before it),
                attention (``ov.convert_model`` fuses it into ScaledDotProductAttention; bf16 on AMX CPUs)

Two choices are made for speed on CPUs with AMX (Intel Xeon since Sapphire Rapids), from OpenVINO's own
performance counters (``bench/bench_openvino_profile.py``; numbers in ``docs/openvino.md``):

  zero point in the bias   OpenVINO runs a FullyConnected whose UINT8 input has a nonzero zero point through
                           its zero-point compensation path (1.3-1.4x slower on AMX than zero point 0, 5% on
                           AVX-512 VNNI, where symmetric INT8 is the slow form). ``fold_zero_points`` keeps the
                           Q (codes stay asymmetric, all 256 of them) and gives the DQ zero point 0: the MatMul
                           sees x + zp*s, and its bias takes -zp*s*sum_k W[k, :] at compile time. Same
                           arithmetic, the fast kernel.
  attention in float       OpenVINO's INT8 attention Subgraph runs no faster than its bf16 one on AMX (with
                           q, k, v quantized apart it ran slower: 48 reorders; with one shared scale as fast), and
                           float attention is more accurate (MiniLM, 600 held-out sentences: mean cosine 0.9987 vs
                           0.9984, min 0.9957 vs 0.9935): ``qdq{attention=auto}`` keeps attention's batched
                           MatMuls in float on this target (``attention=true``: INT8).

SmoothQuant's Mul (and the shift's Add) after a LayerNorm (the QKV and FFN1 inputs) is folded into a second
LayerNorm with gamma f and beta f + c (``fold_smoothing``; exact in float, the same INT8 codes). The plugin
computes the normalization once; the first LayerNorm's affine, now read by the residual Add alone, fuses into
it: 12 fewer f32 Eltwise passes in MiniLM. FFN2's Mul stays (OpenVINO fuses it, the shift and the FakeQuantize
into the FFN1 FullyConnected, which writes u8), and so does the attention output's (see ``fold_smoothing``).

Fusion for this target is the standard-ONNX form that ``trt`` uses (packed QKV, scale folded into Q, one
mask for all layers): OpenVINO's CPU plugin fuses LayerNormalization into MVN, the Erf GELU and the bias
into the FullyConnected before it, and Q/DQ into its neighbours itself; com.microsoft contrib ops (the
``ort-*`` forms) are not read at all. Scales are shared per tensor (one FakeQuantize per tensor), as LPT
wants: a second FakeQuantize on the same tensor would be a second float pass.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import bias_split, constant_values, only_consumer
from tqc.passes.qdq.smoothing_chain import fold_at_quantizers, smoothing_chain
from tqc.passes.rewrite import cleanup, detach, produce


def float_dtype(scale: np.ndarray) -> type:
    """The float type a correction takes: the scale's (float16 in FP16 graphs), else float32."""
    return np.float16 if scale.dtype == np.float16 else np.float32


def is_attention_matmul(node: gs.Node) -> bool:
    """A batched MatMul of two activations (Q @ K^T, probs @ V): no constant weight on either side."""
    return node.op == "MatMul" and len(node.inputs) >= 2 and all(isinstance(t, gs.Variable) for t in node.inputs[:2])


def symmetric_int8(amax: float) -> tuple[np.float32, np.int8]:
    return np.float32(max(float(amax), 1e-8) / 127.0), np.int8(0)


def asymmetric_uint8(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(max(hi - lo, 1e-8) / 255.0)
    return scale, np.uint8(np.clip(round(-lo / float(scale)), 0, 255))


def activation_params(entry, consumer: gs.Node, method: str, percentile: float,
                      fixed_amax: float | None) -> tuple[np.float32, np.integer]:
    """Scale and zero point of one activation for OpenVINO.

    ``fixed_amax`` (Softmax outputs, [0, fixed_amax]): UINT8 with zero point 0. Inputs of attention batched
    MatMuls: symmetric INT8 (q, k and v are centred; MatMul runs i8). Every other activation (inputs of
    linear layers): asymmetric UINT8 (FullyConnected runs u8 with the zero point folded in).
    """
    if fixed_amax is not None:
        return np.float32(fixed_amax / 255.0), np.uint8(0)
    if is_attention_matmul(consumer):
        return symmetric_int8(entry.symmetric(method, percentile))
    return asymmetric_uint8(*entry.asymmetric(method, percentile))


def _weight_values(tensor: gs.Tensor) -> np.ndarray | None:
    """A MatMul's constant weight as float64: a constant, or DequantizeLinear(INT8 constant, scale, axis)."""
    values = constant_values(tensor)
    if values is not None:
        return values.astype(np.float64)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "DequantizeLinear":
        return None
    q = constant_values(producer.inputs[0])
    scale = constant_values(producer.inputs[1])
    if q is None or scale is None or q.ndim != 2:
        return None
    zero = constant_values(producer.inputs[2]) if len(producer.inputs) > 2 else None
    shape = [1, 1]
    if scale.ndim:
        shape[producer.attrs.get("axis", 1) % 2] = -1
    zero = np.zeros(1) if zero is None else zero.astype(np.float64).reshape(shape if zero.ndim else [1, 1])
    return (q.astype(np.float64) - zero) * scale.astype(np.float64).reshape(shape)


def _column_sums(layer: gs.Node, x: gs.Tensor) -> np.ndarray | None:
    """sum_k W[k, n] (times alpha for Gemm) of a linear layer reading ``x`` as its activation: MatMul(x, W) with
    a constant or INT8 2-D weight, or Gemm(x, W[, C]) without transA and with a constant C (or none); else None."""
    if layer.op not in ("MatMul", "Gemm") or len(layer.inputs) < 2 or layer.inputs[0] is not x \
            or any(t is x for t in layer.inputs[1:]):
        return None
    weight = _weight_values(layer.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    if layer.op == "MatMul":
        return weight.sum(axis=0)
    if layer.attrs.get("transA", 0) or (len(layer.inputs) > 2 and constant_values(layer.inputs[2]) is None):
        return None
    return float(layer.attrs.get("alpha", 1.0)) * weight.sum(axis=1 if layer.attrs.get("transB", 0) else 0)


def _bias_add(matmul: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add right after ``matmul`` that adds a constant bias (its only consumer): (node, bias input)."""
    users = matmul.outputs[0].outputs
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None
    add = users[0]
    for index, tensor in enumerate(add.inputs):
        if tensor is not matmul.outputs[0] and constant_values(tensor) is not None:
            return add, index
    return None


def fold_zero_points(graph: gs.Graph) -> int:
    """Give every activation DequantizeLinear with a nonzero UINT8 zero point zero point 0, where all its
    consumers are linear layers (MatMul or Gemm with a constant or INT8 weight); each layer's bias (the constant
    Add after a MatMul, or a new one; Gemm's C) takes ``-zp * scale * W.sum(0)``, so its output is unchanged (up
    to float rounding). The Q keeps its zero point: the codes, and so the quantization error, are those of the
    asymmetric range. Returns the count of DequantizeLinear nodes changed."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "DequantizeLinear" or len(node.inputs) < 3 or not isinstance(node.inputs[0], gs.Variable):
            continue
        zero = constant_values(node.inputs[2])
        scale = constant_values(node.inputs[1])
        if zero is None or scale is None or zero.dtype != np.uint8 or zero.size != 1 or scale.size != 1 \
                or int(zero.reshape(())) == 0:
            continue
        layers = []
        for consumer in node.outputs[0].outputs:
            column_sums = _column_sums(consumer, node.outputs[0])
            if column_sums is None:
                layers = []
                break
            layers.append((consumer, column_sums, _bias_add(consumer) if consumer.op == "MatMul" else None))
        if not layers:
            continue
        shift = float(zero.reshape(())) * float(scale.reshape(()))  # DQ with zero point 0 gives x + shift
        for matmul, column_sums, bias in layers:
            correction = -shift * column_sums
            if matmul.op == "Gemm":  # alpha * A.B + beta * C: C takes correction / beta
                beta = float(matmul.attrs.get("beta", 1.0))
                values = constant_values(matmul.inputs[2]) if len(matmul.inputs) > 2 else None
                base = np.zeros(correction.shape) if values is None else values.astype(np.float64)
                dtype = float_dtype(scale) if values is None else values.dtype
                c = gs.Constant(f"{matmul.name}_zero_point_folded_c", (base + correction / beta).astype(dtype))
                if len(matmul.inputs) > 2:
                    matmul.inputs[2] = c
                else:
                    matmul.inputs.append(c)
                continue
            if bias is None:  # no bias: one Add of the correction (OpenVINO fuses it into the FullyConnected)
                output = detach(matmul.outputs[0])
                dtype = float_dtype(scale)
                produce(graph, "Add", f"{matmul.name}_zero_point_bias",
                        [matmul.outputs[0], gs.Constant(f"{matmul.name}_zero_point_bias", correction.astype(dtype))],
                        [output])
                continue
            add, index = bias
            old = add.inputs[index]
            values = constant_values(old)
            add.inputs[index] = gs.Constant(f"{old.name}_zero_point_folded",
                                            (values.astype(np.float64) + correction).astype(values.dtype))
        node.inputs[2] = gs.Constant(f"{node.name}_zero_point_0", np.zeros((), np.uint8))
        folded += 1
    if folded:
        cleanup(graph)  # the new Adds in topological order
    return folded


def _layernorm_fold(graph: gs.Graph, q: gs.Node, x: gs.Tensor, factor: np.ndarray, offset: np.ndarray) -> bool:
    """LayerNorm(x) * f + c ─► Q  =>  LayerNorm(x; gamma * f, beta * f + c) ─► Q: a second LayerNorm over the same
    input (exact: the residual keeps the first). OpenVINO computes the normalization once and runs both affine
    tails, the residual's fused into the residual Add."""
    norm = x.inputs[0] if x.inputs else None
    if norm is None or norm.op != "LayerNormalization" or norm.attrs.get("axis", -1) != -1 or len(norm.inputs) < 2:
        return False
    gamma = constant_values(norm.inputs[1])
    beta = constant_values(norm.inputs[2]) if len(norm.inputs) > 2 else np.zeros_like(gamma)
    if gamma is None or beta is None or gamma.shape != (factor.size,) or beta.shape != gamma.shape:
        return False
    name = f"{q.name}_smoothed_layernorm"
    f, c = factor.astype(np.float64), offset.astype(np.float64)
    inputs = [norm.inputs[0], gs.Constant(f"{name}_scale", (gamma.astype(np.float64) * f).astype(gamma.dtype)),
              gs.Constant(f"{name}_bias", (beta.astype(np.float64) * f + c).astype(beta.dtype))]
    produce(graph, "LayerNormalization", name, inputs, [detach(q.inputs[0])], attrs=dict(norm.attrs))
    return True


def fold_smoothing(graph: gs.Graph) -> int:
    """Fold each SmoothQuant Mul (and shift Add) between a LayerNorm and an activation's QuantizeLinear
    (``smoothing_chain``) into a second LayerNorm over the same input, gamma f and beta f + c (exact in float; the
    first keeps the residual): the QKV and FFN1 inputs. Returns how many folded.

    Not folded, from OpenVINO's counters on an AMX Xeon (docs/openvino.md): FFN2's Mul (after GELU), which the
    plugin already fuses with the shift and the FakeQuantize into the FFN1 FullyConnected; and the attention
    output's, which would fold exactly into V's projection columns (softmax rows sum to 1) with the Q/DQ moved
    before the head merge: the plugin then runs the FakeQuantize inside the attention Subgraph, but its u8 head
    Transpose is slower than the bf16 one, and the two cancel out."""
    def fold(graph: gs.Graph, q: gs.Node) -> bool:
        chain = smoothing_chain(q)
        return chain is not None and _layernorm_fold(graph, q, *chain)

    return fold_at_quantizers(graph, fold)


def _weight_columns(weight: gs.Tensor, graph: gs.Graph, name: str, columns: slice) -> gs.Tensor | None:
    """Columns ``columns`` of a MatMul's constant weight [K, N]: a float constant, or a new DequantizeLinear of
    the INT8 constant's columns (per-column scales and zero points sliced alike, or a per-tensor pair kept)."""
    values = constant_values(weight)
    if values is not None:
        return gs.Constant(f"{name}_weight", np.ascontiguousarray(values[:, columns])) if values.ndim == 2 else None
    dq = weight.inputs[0] if weight.inputs else None
    codes = constant_values(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    if codes is None or codes.ndim != 2 or dq.attrs.get("axis", 1) not in (1, -1):
        return None
    parts = [gs.Constant(f"{name}_weight_int8", np.ascontiguousarray(codes[:, columns]))]
    for index, suffix in ((1, "scale"), (2, "zero_point")):
        if index >= len(dq.inputs):
            continue
        values = constant_values(dq.inputs[index])
        if values is None or values.ndim > 1 or (values.ndim == 1 and values.size != codes.shape[1]):
            return None
        parts.append(gs.Constant(f"{name}_weight_{suffix}", np.ascontiguousarray(values[columns]))
                     if values.ndim == 1 else dq.inputs[index])
    out = gs.Variable(f"{name}_weight_dequantized", dtype=weight.dtype)
    produce(graph, "DequantizeLinear", f"{name}_weight_DequantizeLinear", parts, [out], attrs=dict(dq.attrs))
    return out


def unpack_qkv(graph: gs.Graph) -> int:
    """A packed projection whose outputs are split apart, x ─► MatMul(W) ─► Add(b) ─► Split(last axis) ─► q, k, v,
    becomes one MatMul and bias Add per part on the same (quantized) x, W and b cut by columns: the same
    arithmetic, no Split. OpenVINO's CPU plugin runs that Split with a reference kernel (``VariadicSplit
    ref_bf16``, 3-4% of MiniLM's INT8 node time at 8x128) and each part's FullyConnected as fast per column as
    the packed one. A Split after a shared Q/DQ (``attention=true``, ``shared_qkv``) is not this form and stays
    packed. Returns how many projections were unpacked."""
    unpacked, nodes = 0, len(graph.nodes)
    for split in [n for n in graph.nodes if n.op == "Split"]:
        sizes = constant_values(split.inputs[1]) if len(split.inputs) > 1 else None
        found = bias_split(split.inputs[0])
        if sizes is None or sizes.size != len(split.outputs) or split.attrs.get("axis", 0) not in (-1, 2) \
                or found is None or only_consumer(split.inputs[0]) is not split:
            continue
        matmul_out, _, add = found
        matmul = matmul_out.inputs[0]
        bias = next(t for t in add.inputs if t is not matmul_out)
        values = constant_values(bias)
        if only_consumer(matmul_out) is not add or values.shape != (int(sizes.sum()),):
            continue
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        parts = [slice(start, end) for start, end in zip(bounds[:-1], bounds[1:])]
        weights = [_weight_columns(matmul.inputs[1], graph, f"{split.name}_part{i}", part)
                   for i, part in enumerate(parts)]
        if any(w is None for w in weights):
            continue  # the DequantizeLinear nodes made before the miss are dead code: cleanup removes them
        for i, (output, part, weight) in enumerate(zip(list(split.outputs), parts, weights)):
            product = gs.Variable(f"{split.name}_part{i}_matmul", dtype=matmul_out.dtype)
            produce(graph, "MatMul", f"{split.name}_part{i}_matmul", [matmul.inputs[0], weight], [product])
            produce(graph, "Add", f"{split.name}_part{i}_bias",
                    [product, gs.Constant(f"{split.name}_part{i}_bias", np.ascontiguousarray(values[part]))],
                    [detach(output)])
        unpacked += 1
    if len(graph.nodes) != nodes:
        cleanup(graph)
    return unpacked
