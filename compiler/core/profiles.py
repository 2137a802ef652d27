"""Optimization profiles from ``--shapes``: ``input_ids:1x16,8x128,32x512`` (min, opt, max).

A spec without a name (``1x16,8x128,32x512``) applies to every dynamic input; a named spec overrides it for
that input. One shape instead of three pins min = opt = max.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqc.compiler.core.errors import TqcError


@dataclass(frozen=True)
class Profile:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def _shape(text: str, where: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise TqcError(f"--shapes {where}: '{text}' is not a shape like 8x128") from None
    if not dims or any(d <= 0 for d in dims):
        raise TqcError(f"--shapes {where}: '{text}' has a dimension <= 0")
    return dims


def parse_shapes(specs: tuple[str, ...] | list[str] | str | None) -> dict[str, Profile]:
    """Returns {input name or '*': Profile}."""
    if not specs:
        return {}
    if isinstance(specs, str):
        specs = [specs]
    profiles: dict[str, Profile] = {}
    for spec in specs:
        for item in spec.split():
            name, _, shapes = item.rpartition(":")
            name = name or "*"
            parts = [_shape(p, item) for p in shapes.split(",") if p]
            if len(parts) == 1:
                parts = parts * 3
            if len(parts) != 3:
                raise TqcError(f"--shapes {item}: give one shape or three (min,opt,max)")
            lo, opt, hi = parts
            if not (len(lo) == len(opt) == len(hi)):
                raise TqcError(f"--shapes {item}: min, opt and max have different ranks")
            if any(a > b for a, b in zip(lo, opt)) or any(a > b for a, b in zip(opt, hi)):
                raise TqcError(f"--shapes {item}: needs min <= opt <= max in every dimension")
            profiles[name] = Profile(lo, opt, hi)
    return profiles


def resolve_profiles(dynamic_inputs: dict[str, list], profiles: dict[str, Profile]) -> dict[str, Profile]:
    """One profile per dynamic input, checked against its rank and static dimensions."""
    resolved = {}
    for name, dims in dynamic_inputs.items():
        profile = profiles.get(name) or profiles.get("*")
        if profile is None:
            raise TqcError(f"input '{name}' has dynamic dimensions {dims}: give --shapes {name}:MIN,OPT,MAX "
                           f"(e.g. {name}:1x16,8x128,32x512)")
        if len(profile.min) != len(dims):
            raise TqcError(f"--shapes for '{name}': rank {len(profile.min)}, the input has rank {len(dims)} {dims}")
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0 and not (profile.min[axis] == profile.opt[axis] == profile.max[axis] == dim):
                raise TqcError(f"--shapes for '{name}': axis {axis} is fixed at {dim} in the model")
        resolved[name] = profile
    unknown = set(profiles) - set(dynamic_inputs) - {"*"}
    if unknown:
        raise TqcError(f"--shapes names '{sorted(unknown)[0]}', which is not a dynamic input "
                       f"({', '.join(dynamic_inputs) or 'none'})")
    return resolved
