"""Maps CLI names to pass classes: the built-in passes by the table below, others by ``register``.

The registry imports the pass modules; no pass module imports the registry (no import cycle). A new built-in
pass is one more entry of ``BUILTIN``; a script or a test adds its own with ``register(cls)``.
"""

from __future__ import annotations

from typing import Type

from tqc.compiler.core.errors import TqcError, did_you_mean
from tqc.passes.base import Pass
from tqc.passes.fold import Fold
from tqc.passes.fp16 import Fp16
from tqc.passes.fuse import Fuse
from tqc.passes.pool import Pool
from tqc.passes.qdq import Qdq

BUILTIN: tuple[Type[Pass], ...] = (Fold, Fp16, Fuse, Pool, Qdq)

_REGISTRY: dict[str, Type[Pass]] = {}


def register(cls: Type[Pass]) -> Type[Pass]:
    """Make ``cls`` available by its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


for _builtin in BUILTIN:
    register(_builtin)


def available() -> dict[str, Type[Pass]]:
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> Type[Pass]:
    passes = available()
    if name not in passes:
        raise TqcError(f"unknown pass '{name}'{did_you_mean(name, passes)}")
    return passes[name]
