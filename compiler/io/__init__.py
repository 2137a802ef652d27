"""Layer 1, model I/O: read and write models (lean loads, atomic writes, the output guard), skeletons and
structure checks, onnx-graphsurgeon <-> ONNX, OpenVINO IR files, the packaged MiniLM's location."""
