"""tqc: a transformer quantization compiler built from ONNX graph passes.

The package is one namespace: ``tqc.passes`` (graph rewrites), ``tqc.compiler`` (I/O, pipeline,
verification, CLI) and ``tqc.models`` (export recipes per encoder family).
"""

__version__ = "0.1.0"
