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
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from tqc.compiler.io.graph import skeleton_of_graph
from tqc.compiler.io.skeleton import SKELETON_DATA
from tqc.compiler.io.structure import float_tensor_types


class GraphSession:
    """``run(output_names, feed)`` like an ``onnxruntime.InferenceSession``; keeps the arrays it borrows alive."""

    def __init__(self, graph: gs.Graph, outputs: Iterable[str] = (), like: onnx.ModelProto | None = None,
                 threads: int = 0):
        import onnxruntime as ort

        skeleton = skeleton_of_graph(graph, like=like)
        types = float_tensor_types(skeleton)
        existing = [o.name for o in skeleton.graph.output]
        inputs = {i.name for i in skeleton.graph.input}
        added = [n for n in dict.fromkeys(outputs) if n not in existing and n not in inputs and n in types]
        skeleton.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in added)
        self.output_names = existing + added
        stand_ins = {t.name for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.disable_prepacking", "1")
        self._borrowed: list = []  # arrays and OrtValues ORT reads from: alive as long as the session
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in stand_ins:
                array = np.ascontiguousarray(tensor.values)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._borrowed.append((array, value))
                options.add_initializer(tensor.name, value)
        with tempfile.TemporaryDirectory(prefix="tqc-session-") as folder:
            (Path(folder) / SKELETON_DATA).touch()
            path = Path(folder) / "skeleton.onnx"
            path.write_bytes(skeleton.SerializeToString())
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, output_names: list[str] | None, feed: dict) -> list[np.ndarray]:
        return self.session.run(output_names, {k: v for k, v in feed.items() if k in self.input_names})
