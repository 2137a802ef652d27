"""Placement for ``--target openvino``: the Q/DQ forms OpenVINO's CPU plugin turns into INT8 kernels.

OpenVINO reads ONNX Q/DQ pairs as FakeQuantize; its low-precision transformations (LPT) then move the
dequantization past each MatMul and run it with integer inputs. What the placement chooses, and why (the
evidence is the compiled model's runtime graph, ``compiled_model.get_runtime_model()``, whose nodes carry
``layerType`` and ``runtimePrecision``; see ``tqc.compiler.io.openvino_ir.runtime_precisions`` and the README)::

  linear layer  x ─► Q(u8, s, zp) ─► DQ ─► MatMul ◄─ DQ(axis 1) ◄─ W_int8    FullyConnected runs u8 x i8
                (asymmetric UINT8 per tensor: the zero point is folded into the FC; a GELU output's
                 [-0.17, 10] keeps every code, and u8 x s8 is the fast dot product on AVX2/VNNI CPUs)
  attention     q ─► Q(i8, s, 0) ─► DQ ─► MatMul ◄─ DQ ◄─ Q(i8) ◄─ k^T        MatMul runs i8
                probs ─► Q(u8, 1/255, 0) ─► DQ ─► MatMul ◄─ DQ ◄─ Q(i8) ◄─ v   MatMul runs u8 x i8
                (Softmax outputs lie in [0, 1]: all 256 codes instead of trt's 128; on CPUs with AMX the
                 plugin folds both MatMuls, the mask, the Softmax and the probs' pair into one i8 Subgraph)
  float         LayerNorm (MVN), Softmax, the mask Add, residual Adds, GELU (fused into the FC before it)

Fusion for this target is the standard-ONNX form that ``trt`` uses (packed QKV, scale folded into Q, one
mask for all layers): OpenVINO's CPU plugin fuses LayerNormalization into MVN, the Erf GELU and the bias
into the FullyConnected before it, and Q/DQ into its neighbours itself; com.microsoft contrib ops (the
``ort-*`` forms) are not read at all. Scales are shared per tensor (one FakeQuantize per tensor), as LPT
wants: a second FakeQuantize on the same tensor would be a second float pass.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs



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
