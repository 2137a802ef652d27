"""The pass interface: a small class with a CLI name, declared needs, options and ``run(graph, ctx)``.

A pass rewrites an onnx-graphsurgeon graph in place and returns a ``PassResult`` whose ``stats`` land in
the compile report (``{"attention": 12, "attention_blocks": 12}``). The pass manager verifies the graph
after every pass, numerically with the pass's own ``tolerance``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import onnx_graphsurgeon as gs

from tqc.compiler.core.errors import TqcError, did_you_mean

TARGETS = ("trt", "ort-cpu", "ort-cuda", "openvino")


@dataclass(frozen=True)
class Option:
    """One pass option: its type (parsed from the pipeline text), default, help, and allowed values.

    Numeric options declare their range where they are declared (``min``/``max``, each inclusive unless
    ``min_inclusive``/``max_inclusive`` say otherwise); float values must be finite unless ``finite=False``.
    A value outside is refused with the allowed range in the message: ``percentile=150`` ->
    "option 'percentile' of pass 'qdq' must be in [90, 100], got 150".
    """

    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    finite: bool = True

    def range_text(self) -> str:
        """'[0, 1]', '(0, 1]', '>= 1', '> 0' or '' when unbounded."""
        if self.min is not None and self.max is not None:
            return (f"{'[' if self.min_inclusive else '('}{self.min:g}, {self.max:g}"
                    f"{']' if self.max_inclusive else ')'}")
        if self.min is not None:
            return f"{'>=' if self.min_inclusive else '>'} {self.min:g}"
        if self.max is not None:
            return f"{'<=' if self.max_inclusive else '<'} {self.max:g}"
        return ""

    def parse(self, pass_name: str, key: str, text: str) -> Any:
        try:
            value = self.type(text)
        except (TypeError, ValueError, OverflowError):
            raise TqcError(
                f"option '{key}' of pass '{pass_name}' takes a {_type_name(self.type)}, got '{text}'"
            ) from None
        return self.check(pass_name, key, value)

    def check(self, pass_name: str, key: str, value: Any) -> Any:
        """``value`` if it is allowed, else a one-line ``TqcError`` naming the allowed values."""
        where = f"option '{key}' of pass '{pass_name}'"
        if self.choices is not None and value not in self.choices:
            raise TqcError(
                f"{where} must be one of {', '.join(map(str, self.choices))}"
                f"{did_you_mean(str(value), map(str, self.choices))}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if self.finite and not math.isfinite(value):
            bounds = self.range_text()
            raise TqcError(f"{where} must be a finite number{' in ' + bounds if bounds else ''}, got {value}")
        low_ok = self.min is None or (value >= self.min if self.min_inclusive else value > self.min)
        high_ok = self.max is None or (value <= self.max if self.max_inclusive else value < self.max)
        if not (low_ok and high_ok):
            bounds = self.range_text()
            raise TqcError(f"{where} must be {'in ' if self.min is not None and self.max is not None else ''}"
                           f"{bounds}, got {value:g}")
        return value


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def parse_list(text: str | list) -> list[str]:
    """``a|b|c`` (commas separate options in the pipeline text, so lists use '|')."""
    if isinstance(text, list):
        return text
    return [item.strip() for item in text.split("|") if item.strip()]


def _type_name(fn: Callable) -> str:
    return {parse_bool: "boolean", parse_list: "'|'-separated list", float: "number", int: "integer",
            str: "string"}.get(fn, getattr(fn, "__name__", "value"))


@dataclass
class Tolerance:
    """Numeric tolerance of a pass against the graph before it (ORT CPU, optimizations off)."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float | None = None  # when set, outputs are judged by cosine similarity instead of elementwise


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may consult: the target, shared analyses (calibration table), and notes for the report."""

    target: str = "trt"
    calibration: Any = None
    verification_feeds: list[dict[str, Any]] | None = None
    explain: set[str] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.messages.append(message)


class Pass:
    """Base class. Subclasses set ``name``, ``options``, ``needs`` and implement ``run``."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    needs: ClassVar[tuple[str, ...]] = ()  # e.g. ("calibration",)
    tolerance: ClassVar[Tolerance] = Tolerance()

    def __init__(self, **values: Any):
        unknown = set(values) - set(self.options)
        if unknown:
            key = sorted(unknown)[0]
            if not self.options:
                raise TqcError(f"pass '{self.name}' takes no options (got '{key}')")
            raise TqcError(f"pass '{self.name}' has no option '{key}'{did_you_mean(key, self.options)}")
        self.values: dict[str, Any] = {k: opt.default for k, opt in self.options.items()}
        for key, value in values.items():  # the same ranges from Python as from the pipeline text
            self.values[key] = self.options[key].check(self.name, key, value)

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc else ""

    def spec(self) -> str:
        """The pipeline text that recreates this pass with its non-default options."""
        changed = {k: v for k, v in self.values.items() if v != self.options[k].default}
        if not changed:
            return self.name
        def fmt(v: Any) -> str:
            return "|".join(map(str, v)) if isinstance(v, list) else str(v)
        return self.name + "{" + ",".join(f"{k}={fmt(v)}" for k, v in sorted(changed.items())) + "}"

    def tolerance_for(self, ctx: PassContext) -> Tolerance:
        return self.tolerance

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError(f"pass {self.name} does not implement run()")
