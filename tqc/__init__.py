"""tqc: a transformer quantization compiler built from ONNX graph passes.

The Python API (``docs/python-api.md``)::

    import tqc
    from tqc.passes import Fold, Fuse, Qdq

    result = tqc.compile("minilm.onnx", [Fold(), Fuse(), Qdq()], target="ort-cpu", calib=sentences)
    result.save("minilm.int8.onnx")                 # atomic, never over an input
    print(result.report)                            # per pass: time, what changed, verification
    print(tqc.diff("minilm.onnx", "minilm.int8.onnx", data=held_out).cosine)

``compile`` (or ``PassManager([...])(model)``), ``diff`` and ``export`` do what ``tqc compile``, ``tqc diff``
and ``tqc export`` do, with the same defaults and checks; a mistake raises ``TqcError`` with the CLI's
one-line message, a failed verification ``VerificationError`` (a ``TqcError``).

The package is one namespace: ``tqc.passes`` (graph rewrites), ``tqc.compiler`` (I/O, pipeline, verification,
CLI) and ``tqc.models`` (export recipes per encoder family). The API's names load on first use, so importing
a submodule (``tqc.compiler.core.errors``) does not import the whole compiler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqc.compiler.core.errors import TqcError, VerificationError
from tqc.version import __version__

if TYPE_CHECKING:
    from tqc.api import CompileReport, CompileResult, DiffResult, PassManager, compile, diff, export

_API = ("compile", "diff", "export", "PassManager", "CompileResult", "CompileReport", "DiffResult")

__all__ = sorted([*_API, "TqcError", "VerificationError", "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'tqc' has no attribute '{name}'")
    from tqc import api

    value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
