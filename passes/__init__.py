"""Graph passes, as objects that chain into a pipeline::

    from tqc.passes import Fold, Fuse, Qdq, Fp16, Pool

    pipeline = [Fold(), Fuse(skip_layernorm="sum"), Qdq(method="percentile", percentile=99.99)]
    # the same pipeline as the text "fold,fuse{skip_layernorm=sum},qdq{method=percentile}"

Keyword arguments are the pass's typed options (``tqc passes`` lists them), checked as the pipeline text is
checked: an unknown option gets a "did you mean", a value of the wrong type or outside its range is refused,
each with a one-line ``tqc.TqcError``. Give the list to ``tqc.compile`` or ``tqc.PassManager``.

For a pass of your own, subclass ``Pass`` (``options``, ``tolerance``, ``run(graph, ctx) -> PassResult``);
``tqc.passes.registry`` looks the built-in ones up by their pipeline names.

The names load on first use (the modules import onnx-graphsurgeon), so ``import tqc.passes.base`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqc.passes.base import Option, Pass, PassContext, PassResult, Tolerance
    from tqc.passes.fold import Fold
    from tqc.passes.fp16 import Fp16
    from tqc.passes.fuse import Fuse
    from tqc.passes.pool import Pool
    from tqc.passes.qdq import Qdq

# public name -> the module (under tqc.passes) that defines it
_PUBLIC = {"Fold": "fold", "Fuse": "fuse", "Qdq": "qdq", "Fp16": "fp16", "Pool": "pool", "Pass": "base",
           "PassContext": "base",
           "PassResult": "base", "Option": "base", "Tolerance": "base", "available": "registry"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tqc.passes' has no attribute '{name}'")
    from importlib import import_module

    value = getattr(import_module(f"tqc.passes.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
