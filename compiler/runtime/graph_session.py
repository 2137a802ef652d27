"""An ONNX Runtime CPU session straight from an onnx-graphsurgeon graph, without copying its weights.

    gs.Graph ──► skeleton (nodes, small constants; large ones as shape-only stand-ins) ──► model.onnx
         └─────► large constants' numpy arrays ──► SessionOptions.add_initializer (zero-copy OrtValues)

Exporting a graph to a ModelProto copies every weight (numpy → TensorProto → the graph's repeated field),
serializing copies them again and ORT copies them once more into its own buffers: for bert-base that is
about 1.3 GB of copies and 2 s before the first batch runs. Here ORT reads only the skeleton (a few hundred
kB) and uses the graph's own arrays as its initializers, so calibration, the ``qdq`` budget step and the
``fp16`` overflow guard cost the activations and nothing else.

The skeleton's stand-ins name an external data file; ORT checks that it exists when it loads the model,
so an empty one sits beside the skeleton in a temporary folder, removed once the session is built.
Graph optimizations stay off and prepacking is disabled (prepacking would copy every MatMul weight).
A lean load (``GraphSession.from_lean``: a file's skeleton plus its arrays) runs the same way, so a model
of any size, over protobuf's 2 GB too, runs with its weights held once (``tqc diff``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.compiler.core.errors import TqcError
from tqc.compiler.io.graph import skeleton_of_graph
from tqc.compiler.io.lean import LeanModel
from tqc.compiler.io.skeleton import SKELETON_DATA
from tqc.compiler.io.structure import float_tensor_types


class GraphSession:
    """``run(output_names, feed)`` like an ``onnxruntime.InferenceSession``; keeps the arrays it borrows alive."""

    def __init__(self, graph: gs.Graph, outputs: Iterable[str] = (), like: onnx.ModelProto | None = None,
                 threads: int = 0):
        constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        self._open(skeleton_of_graph(graph, like=like), lambda name: constants[name].values, outputs, threads, True)

    @classmethod
    def from_lean(cls, lean: LeanModel, outputs: Iterable[str] = (), threads: int = 0) -> "GraphSession":
        """A session over a lean load (``tqc.compiler.io.lean``): its skeleton, its arrays lent to ORT.

        The skeleton needs the types of the tensors in ``outputs`` (``tqc.compiler.io.structure.infer_shapes``).
        ORT's memory arena is off: the exposed tensors are copied into numpy arrays anyway, and an arena would
        keep a second copy of the largest run's activations next to the weights (for XLM-R large with every
        tensor exposed, 2.84 GB at the peak with it, 2.64 GB without).
        """
        missing = [t.name for t in lean.skeleton.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in lean.weights]
        if missing:  # external data of a type the lean loader leaves alone (bfloat16, float8, int4, strings)
            raise TqcError(f"tensor '{missing[0]}' is external data of a type tqc does not read (only plain "
                           "numeric types): cannot run this model from its file")
        session = cls.__new__(cls)
        session._open(lean.skeleton, lean.weights.__getitem__, outputs, threads, False)
        return session

    def _open(self, skeleton: onnx.ModelProto, array_of: Callable[[str], np.ndarray], outputs: Iterable[str],
              threads: int, arena: bool) -> None:
        import onnxruntime as ort

        types = float_tensor_types(skeleton)
        existing = [o.name for o in skeleton.graph.output]
        inputs = {i.name for i in skeleton.graph.input}
        added = [n for n in dict.fromkeys(outputs) if n not in existing and n not in inputs and n in types]
        self.output_names = existing + added
        stand_ins = [t.name for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = arena
        self._borrowed: list = []  # arrays and OrtValues ORT reads from: alive as long as the session
        for name in stand_ins:
            array = np.ascontiguousarray(array_of(name))
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._borrowed.append((array, value))
            options.add_initializer(name, value)
        graph_outputs = list(skeleton.graph.output)
        skeleton.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in added)
        try:
            data = skeleton.SerializeToString()
        finally:  # the caller's skeleton is left as it was
            del skeleton.graph.output[len(graph_outputs):]
        with tempfile.TemporaryDirectory(prefix="tqc-session-") as folder:
            (Path(folder) / SKELETON_DATA).touch()
            path = Path(folder) / "skeleton.onnx"
            path.write_bytes(data)
            del data
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, output_names: list[str] | None, feed: dict) -> list[np.ndarray]:
        return self.session.run(output_names, {k: v for k, v in feed.items() if k in self.input_names})
