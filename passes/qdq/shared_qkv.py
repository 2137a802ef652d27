"""One INT8 scale for q, k and v of a packed QKV projection (``--target openvino``, ``qdq{attention=true}``).

With INT8 attention, q, k and v each get their own symmetric Q/DQ after the Split of the packed QKV
projection and the head Reshape/Transpose. OpenVINO's CPU plugin cannot fuse those three FakeQuantizes into the
projection (a Split stands between), so the projection writes float, each of q, k, v is reordered to f32,
quantized and reordered back (48 reorders in MiniLM on an AMX Xeon; ``bench/bench_openvino_profile.py``).

Equalizing the three ranges first lets one Q/DQ sit on the projection's output, before the Split: OpenVINO then
fuses it into the FullyConnected (output ``i8``), and the Split, head transposes and attention ``Subgraph`` read
INT8 with no reorder::

  before   x ─► FC ─► Split ─► q ─► Reshape ─► Transpose ─► Q/DQ(s_q) ─► MatMul(q, kᵀ) ─► Add mask ─► Softmax
                            ├► k ─► ...                  ─► Q/DQ(s_k) ─┘
                            └► v ─► ...                  ─► Q/DQ(s_v) ─► MatMul(probs, v)
  after    x ─► FC' ─► Q/DQ(s_v) ─► Split ─► ...          ─► Mul(c) ─► MatMul(c q', k'ᵀ) ─► Add mask ─► Softmax

FC' has its q columns (weight scales and bias) times a_q = s_v / s_q and its k columns times a_k = s_v / s_k, so
q' and k' span v's range; q' . k' = a_q a_k (q . k), and the Mul of q' by c = 1 / (a_q a_k) restores the scores
(OpenVINO folds it into the dequantization it moves past the MatMul). The INT8 codes are those of the three separate scales (up to float
rounding at a code's edge): same accuracy, one FakeQuantize. v and everything after the attention are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import bias_split, constant_values, consumers, only_consumer, producer
from tqc.passes.rewrite import cleanup, drop, produce, redirect


def _symmetric_pair(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node, float] | None:
    """``tensor`` -> QuantizeLinear -> DequantizeLinear (its only consumers), INT8 zero point 0 and one scalar
    scale on both: (Q, DQ, scale); else None."""
    q = only_consumer(tensor, "QuantizeLinear")
    dq = only_consumer(q.outputs[0], "DequantizeLinear") if q is not None else None
    if dq is None or len(q.inputs) < 3 or len(dq.inputs) < 3:
        return None
    values = [constant_values(t) for t in (q.inputs[1], q.inputs[2], dq.inputs[1], dq.inputs[2])]
    if any(v is None or v.size != 1 for v in values):
        return None
    q_scale, q_zero, dq_scale, dq_zero = values
    if q_zero.dtype != np.int8 or dq_zero.dtype != np.int8 or int(q_zero.reshape(())) or int(dq_zero.reshape(())) \
            or float(q_scale.reshape(())) != float(dq_scale.reshape(())) or float(q_scale.reshape(())) <= 0:
        return None
    return q, dq, float(q_scale.reshape(()))


def _head_chain(part: gs.Tensor) -> tuple[gs.Node, gs.Node, float] | None:
    """A Split output -> Reshape -> Transpose -> symmetric Q/DQ, each the only consumer of the one before."""
    reshape = only_consumer(part, "Reshape")
    transpose = only_consumer(reshape.outputs[0], "Transpose") if reshape is not None else None
    return _symmetric_pair(transpose.outputs[0]) if transpose is not None else None


def _scale_columns(matmul: gs.Node, add: gs.Node, bias: np.ndarray, factors: np.ndarray) -> bool:
    """Multiply output column n of ``matmul``'s constant weight (float, or DequantizeLinear of a 2-D INT8 constant
    with per-column scales on axis 1) and of the bias by ``factors[n]``. False (nothing changed) for another form."""
    weight = matmul.inputs[1]
    values = constant_values(weight)
    if values is not None:
        if values.ndim != 2 or values.shape[1] != factors.size:
            return False
        new_weight = gs.Constant(f"{weight.name}_qkv_shared", (values.astype(np.float64) * factors).astype(values.dtype))
        dq = None
    else:
        dq = producer(weight)
        if dq is None or dq.op != "DequantizeLinear" or constant_values(dq.inputs[0]) is None:
            return False
        scale = constant_values(dq.inputs[1])
        if scale is None or scale.ndim != 1 or scale.size != factors.size or dq.attrs.get("axis", 1) not in (1, -1) \
                or constant_values(dq.inputs[0]).ndim != 2:
            return False
        new_scale = gs.Constant(f"{dq.inputs[1].name}_qkv_shared", (scale.astype(np.float64) * factors).astype(scale.dtype))
    index = next(i for i, t in enumerate(add.inputs) if constant_values(t) is not None and t is not matmul.outputs[0])
    old_bias = add.inputs[index]
    add.inputs[index] = gs.Constant(f"{old_bias.name}_qkv_shared",
                                    (bias.astype(np.float64) * factors).astype(constant_values(old_bias).dtype))
    if dq is None:
        matmul.inputs[1] = new_weight
    else:
        dq.inputs[1] = new_scale
    return True


def share_qkv_scales(graph: gs.Graph) -> int:
    """Give q, k and v of every packed QKV projection one symmetric INT8 Q/DQ on the projection's output (see the
    module docstring); returns how many attentions changed. A Split that is not that form is left as it is."""
    shared = 0
    for split in [n for n in graph.nodes if n.op == "Split" and len(n.outputs) == 3]:
        packed = split.inputs[0]
        found = bias_split(packed)
        sizes = constant_values(split.inputs[1]) if len(split.inputs) > 1 else None
        if found is None or len(consumers(packed)) != 1 or sizes is None or sizes.size != 3 \
                or split.attrs.get("axis", 0) not in (-1, 2):
            continue
        matmul_out, bias, add = found
        chains = [_head_chain(part) for part in split.outputs]
        if any(chain is None for chain in chains):
            continue
        readers = [consumers(dq.outputs[0]) for _, dq, _ in chains]
        if any(len(r) != 1 or r[0].op != "MatMul" for r in readers):
            continue
        qk = readers[0][0]
        if readers[1][0] is not qk or qk.inputs[0] is not chains[0][1].outputs[0] \
                or qk.inputs[1] is not chains[1][1].outputs[0] or readers[2][0].inputs[1] is not chains[2][1].outputs[0]:
            continue  # q, k, v in the Split's order, as fuse writes them
        s_q, s_k, s_v = (scale for _, _, scale in chains)
        a_q, a_k = s_v / s_q, s_v / s_k
        factors = np.concatenate([np.full(int(sizes[0]), a_q), np.full(int(sizes[1]), a_k), np.ones(int(sizes[2]))])
        if bias.size != factors.size or not _scale_columns(producer(matmul_out), add, bias, factors):
            continue
        dtype = constant_values(chains[2][0].inputs[1]).dtype
        for q, dq, _ in chains:
            redirect(dq.outputs[0], q.inputs[0])
            drop(q)
            drop(dq)
        rescaled = gs.Variable(f"{qk.name}_qkv_shared_rescaled")
        produce(graph, "Mul", f"{qk.name}_qkv_shared_rescale",
                [qk.inputs[0], gs.Constant(f"{qk.name}_qkv_shared_rescale", np.array(1.0 / (a_q * a_k), dtype))],
                [rescaled])
        qk.inputs[0] = rescaled
        scale = gs.Constant(f"{split.name}_qkv_shared_scale", np.array(s_v, dtype))
        zero = gs.Constant(f"{split.name}_qkv_shared_zero_point", np.array(0, np.int8))
        quantized, dequantized = gs.Variable(f"{split.name}_qkv_quantized"), gs.Variable(f"{split.name}_qkv_dequantized")
        produce(graph, "QuantizeLinear", f"{split.name}_qkv_QuantizeLinear", [packed, scale, zero], [quantized])
        produce(graph, "DequantizeLinear", f"{split.name}_qkv_DequantizeLinear", [quantized, scale, zero], [dequantized])
        split.inputs[0] = dequantized
        shared += 1
    if shared:
        cleanup(graph)
    return shared
