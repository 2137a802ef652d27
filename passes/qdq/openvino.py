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

Fusion for this target is the standard-ONNX form that ``trt`` uses (packed QKV, scale folded into Q, one
mask for all layers): OpenVINO's CPU plugin fuses LayerNormalization into MVN, the Erf GELU and the bias
into the FullyConnected before it, and Q/DQ into its neighbours itself; com.microsoft contrib ops (the
``ort-*`` forms) are not read at all. Scales are shared per tensor (one FakeQuantize per tensor), as LPT
wants: a second FakeQuantize on the same tensor would be a second float pass.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import constant_values
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
