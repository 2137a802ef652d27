"""The compiler around the passes, in layers that follow the data (imports run one way, down this list):

    core      errors and exit codes, target facts (target.py), TensorRT profile text
    io        model files (lean loads, atomic writes, the output guard), skeletons, gs <-> ONNX, OpenVINO IR
    runtime   sessions that run a graph as it is, drawn inputs (feeds), output comparison
    analysis  calibration (data, tables, checks), sensitivity ranking
    pipeline  pipeline text (spec), the verifying pass manager
    tools     compile, diff, bench, inspect, TensorRT (check, build), Triton export, serve
    cli       the click commands

``tqc.models`` (export) sits between io and runtime; ``tqc.passes`` between analysis and pipeline.
ARCHITECTURE.md has the diagram; tests/architecture/test_layers.py enforces it.
"""
