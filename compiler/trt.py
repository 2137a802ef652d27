"""TensorRT 10 plan building (imported lazily; TensorRT is optional)."""

from __future__ import annotations

from tqc.compiler.errors import TqcError

INSTALL_HINT = ("TensorRT 10 is not installed (import tensorrt failed): install it from NVIDIA's package index "
                "(pip install tensorrt --extra-index-url https://pypi.nvidia.com) or write an .onnx output")


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise TqcError(INSTALL_HINT) from None
    return tensorrt


def build_plan_from_model(model, output, source_hash: str, progress=lambda message: None):
    require_tensorrt()
    raise TqcError("building TensorRT plans is not available in this version of tqc")
