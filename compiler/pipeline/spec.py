"""Parses pipeline text into pass instances.

    fold,fuse,qdq{method=percentile,percentile=99.99}
      -> [Fold(), Fuse(), Qdq(method="percentile", percentile=99.99)]

Grammar: ``item (',' item)*`` where ``item = name ['{' key=value (',' key=value)* '}']``. Lists inside a
value use '|' (``qdq{exclude=*down*|*pooler*}``). Errors name the offending piece and suggest a fix.
"""

from __future__ import annotations

import re

from tqc.compiler.core.errors import TqcError
from tqc.passes.base import Pass
from tqc.passes.registry import get_pass

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
            if depth > 1:
                raise TqcError(f"pipeline '{text}': nested '{{' is not allowed")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise TqcError(f"pipeline '{text}': '}}' without '{{'")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise TqcError(f"pipeline '{text}': missing '}}'")
    items.append("".join(current))
    return [item.strip() for item in items]


def parse_item(item: str) -> Pass:
    if not item:
        raise TqcError("pipeline has an empty pass name (two commas in a row?)")
    name, _, rest = item.partition("{")
    name = name.strip()
    if not _NAME.match(name):
        raise TqcError(f"'{name}' is not a pass name")
    cls = get_pass(name)
    values = {}
    if rest:
        if not rest.endswith("}"):
            raise TqcError(f"pass '{name}': text after '}}' in '{item}'")
        body = rest[:-1].strip()
        for pair in filter(None, (p.strip() for p in body.split(","))):
            key, eq, text = pair.partition("=")
            key = key.strip()
            if not eq:
                raise TqcError(f"pass '{name}': option '{pair}' needs a value (key=value)")
            cls(**{key: None}) if key not in cls.options else None  # raises the did-you-mean error
            values[key] = cls.options[key].parse(name, key, text.strip())
    return cls(**values)


def parse_pipeline(text: str) -> list[Pass]:
    text = (text or "").strip()
    if not text:
        raise TqcError("empty pipeline: give passes with -p, e.g. -p fold")
    return [parse_item(item) for item in split_top_level(text)]


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)
