"""Which nodes ONNX Runtime's CUDA execution provider hands to the CPU for shape reasons, read from the graph.

ONNX Runtime (``core/framework/fallback_cpu_capability.cc``, ``GetCpuPreferredNodes``) starts from the
outputs CUDA kernels write to host memory (``Shape``, ``Size``) and walks forward in topological order: a
consumer of such a tensor runs on the CPU when every input it reads is a small initializer (at most 100
elements), a graph input, or a host tensor that its CUDA kernel would not read from host memory anyway, and
none is float16/bfloat16; its outputs are host tensors in turn. Which inputs a CUDA kernel reads from host
memory (Reshape's shape, Slice's starts/ends/axes/steps, Expand's shape, ...) is ``CUDA_HOST_INPUTS``::

    x ─► Shape ─► Gather(0) ─► Unsqueeze ─► Concat ─► Reshape(y, .)      Gather, Unsqueeze, Concat: CPU
                                                      (the shape input is read from host memory: Reshape
                                                       stays on CUDA, the walk stops there)

One such node keeps a session from capturing a CUDA graph ("all compute graph nodes have not been
partitioned"). Kept in step with ONNX Runtime 1.31 (checked against an H100's verbose placement log of
DeBERTa-v3-base compiled by tqc: the same 390 nodes). Not modelled: nodes with no CUDA kernel at all (ONNX
Runtime places them on the CPU too, and their consumers become candidates), and ONNX Runtime's other graph
optimizations before placement (constant folding of what tqc's ``fold`` leaves is rare); a Cast to its input's
own type is dropped first, as ORT's CastElimination does.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

SMALL_INITIALIZER = 100  # elements: ORT's kSmallInitializerThreshold
HOST_OUTPUT_OPS = ("Shape", "Size")  # CUDA kernels whose output 0 lives in host memory
# Inputs (by index) that CUDA kernels read from host memory (OrtMemTypeCPUInput in their kernel definitions)
CUDA_HOST_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Slice": (1, 2, 3, 4), "Tile": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "TopK": (1,), "Split": (1,), "Pad": (1, 2, 3),
    "Resize": (1, 2, 3), "Upsample": (1,), "CumSum": (1,), "OneHot": (1,), "Trilu": (1,), "Clip": (1, 2),
    "Dropout": (1, 2), "If": (0,), "Loop": (0, 1), "NonMaxSuppression": (2, 3, 4), "ReduceSum": (1,),
    "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,),
    "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,), "MemcpyFromHost": (0,),
}
_HALF_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN,
               onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ}


@dataclass(frozen=True)
class HostNode:
    """A node ONNX Runtime CUDA would run on the CPU, and the host tensor that brought it there."""

    name: str
    op: str
    reads: str  # the first host tensor among its inputs

    def __str__(self) -> str:
        return f"{self.op} '{self.name}'"


def host_placed_nodes(model: onnx.ModelProto, types: dict[str, int] | None = None) -> list[HostNode]:
    """The nodes of ``model``'s main graph that ONNX Runtime CUDA places on the CPU (module docstring), in the
    graph's order (topological for a valid model). ``types``: element types by tensor name (default: read from
    the model's value_info, inputs and initializers; give inference's for a model without value_info)."""
    graph = model.graph
    types = dict(types or {})
    small: set[str] = set()
    for init in graph.initializer:
        types.setdefault(init.name, init.data_type)
        if _elements(init.dims) <= SMALL_INITIALIZER:
            small.add(init.name)
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    for node in graph.node:  # ORT turns Constant nodes into initializers before placing anything
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types.setdefault(node.output[0], value.data_type)
                if _elements(value.dims) <= SMALL_INITIALIZER:
                    small.add(node.output[0])
    graph_inputs = {v.name for v in graph.input}
    host: set[str] = set()
    placed: list[HostNode] = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        if _same_type_cast(node, types):  # ORT's level-1 CastElimination removes it before placing anything
            if node.input[0] in host:
                host.add(node.output[0])
            continue
        reads = next((name for name in node.input if name in host), None)
        if reads is not None and _runs_on_host(node, host, small, graph_inputs, types):
            placed.append(HostNode(node.name, node.op_type, reads))
            host.update(name for name in node.output if name)
        elif node.op_type in HOST_OUTPUT_OPS and node.domain in ("", "ai.onnx") and node.output:
            host.add(node.output[0])
    return placed


def host_placed_by_inference(model: onnx.ModelProto) -> list[HostNode]:
    """``host_placed_nodes`` with the element types shape inference finds (on a copy: ``model`` keeps its own
    value_info)."""
    from tqc.compiler.io.structure import float_tensor_types, infer_shapes

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return host_placed_nodes(model, float_tensor_types(infer_shapes(copy, strict=False)))


def _same_type_cast(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return node.op_type == "Cast" and bool(node.input) and to is not None and types.get(node.input[0]) == to


def _runs_on_host(node: onnx.NodeProto, host: set[str], small: set[str], graph_inputs: set[str],
                  types: dict[str, int]) -> bool:
    """ORT's test for a candidate (a consumer of a host tensor): every input a small initializer, a graph
    input, or a host tensor its CUDA kernel reads from device memory; none half precision. An omitted
    optional input ('') is none of these: ORT keeps such a node on CUDA."""
    host_inputs = CUDA_HOST_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
    for index, name in enumerate(node.input):
        if types.get(name) in _HALF_TYPES:
            return False
        if name in small or name in graph_inputs:
            continue
        if name not in host or index in host_inputs:
            return False
    return True


def _elements(dims) -> int:
    count = 1
    for dim in dims:
        count *= int(dim)
    return count


def host_placement_note(placed: list[HostNode], shown: int = 3) -> str:
    """One line for ``tqc compile --target ort-cuda``: whether the output can capture CUDA graphs."""
    if not placed:
        return "cuda graphs: no node is placed on the CPU by ONNX Runtime CUDA; the output can capture CUDA graphs"
    first = ", ".join(str(n) for n in placed[:shown])
    more = f" and {len(placed) - shown} more" if len(placed) > shown else ""
    return (f"cuda graphs: ONNX Runtime CUDA would place {len(placed)} shape-computing node(s) on the CPU, so the "
            f"output cannot capture CUDA graphs: {first}{more} (any --explain lists them)")


def host_placement_details(placed: list[HostNode]) -> list[str]:
    """``--explain``'s lines: every node placed on the CPU, the host tensor it reads, and a count by op."""
    counts: dict[str, int] = {}
    for node in placed:
        counts[node.op] = counts.get(node.op, 0) + 1
    lines = ["cuda graphs: on the CPU by op: " + ", ".join(f"{op} {n}" for op, n in
                                                          sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))]
    lines += [f"cuda graphs: {node} reads host tensor '{node.reads}'" for node in placed]
    return lines
