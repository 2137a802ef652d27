"""Maps CLI names to pass classes. Passes register themselves with ``@register``."""

from __future__ import annotations

from typing import Type

from tqc.compiler.core.errors import TqcError, did_you_mean
from tqc.passes.base import Pass

_REGISTRY: dict[str, Type[Pass]] = {}


def register(cls: Type[Pass]) -> Type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    # Importing the modules runs their @register decorators.
    from tqc.passes import fold, fp16, fuse, qdq  # noqa: F401


def available() -> dict[str, Type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> Type[Pass]:
    passes = available()
    if name not in passes:
        raise TqcError(f"unknown pass '{name}'{did_you_mean(name, passes)}")
    return passes[name]
