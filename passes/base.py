"""The pass interface (as onnx-ir's ``PassBase``): a CLI name, typed options, ``requires`` / ``ensures``
conditions and ``run(graph, ctx)``.

    check requires (context ones before any pass runs, graph ones right before this pass)
      -> run(graph, ctx): rewrites the onnx-graphsurgeon graph in place -> PassResult(modified, stats)
      -> check ensures (a pass that breaks its own promise fails like a failed verification)
      -> the manager verifies the graph, numerically with the pass's ``tolerance`` (or ``PassResult.tolerance``)

``PassContext`` is what passes may read: the target, the calibration data and table (an analysis computed on
the graph before the first pass that asks for it), the verification inputs, the TensorRT profiles, and where
notes for the report go. It is typed; a pass keeps its own working state to itself.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import onnx_graphsurgeon as gs

from tqc.compiler.analysis.calibration import CalibrationTable, calibrate, calibration_targets
from tqc.compiler.core.errors import TqcError, VerificationError, did_you_mean
from tqc.compiler.core.profiles import Profile
from tqc.compiler.core.target import TRT, Target
from tqc.compiler.io.graph import skeleton_of_graph
from tqc.compiler.runtime.feeds import Feed

Progress = Callable[[str], None]


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

    def coerce(self, pass_name: str, key: str, value: Any) -> Any:
        """A value given from Python (``Qdq(smooth=0.5)``): text is parsed as the pipeline text is, an int is a
        float where a float is asked; any other type than the option's is refused in one line, and the value
        is then checked as ``check`` does."""
        if isinstance(value, str) and self.type is not str:
            return self.parse(pass_name, key, value)
        accepted = _PYTHON_TYPES.get(self.type)
        wrong = accepted is not None and (not isinstance(value, accepted) or
                                          (isinstance(value, bool) and bool not in accepted))
        if self.type is parse_list and not wrong:
            wrong = not all(isinstance(item, str) for item in value)
            value = list(value)
        if wrong:
            kind = "list of texts (or '|'-separated text)" if self.type is parse_list else _type_name(self.type)
            raise TqcError(f"option '{key}' of pass '{pass_name}' takes a {kind}, got {value!r} "
                           f"({type(value).__name__})")
        if self.type is float:
            value = float(value)
        if self.type is parse_auto_bool:
            value = parse_auto_bool(value)
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


def parse_auto_bool(text: str | bool) -> str:
    """'auto', or a boolean as 'true' / 'false' (``attention=auto|true|false``; True / False from Python)."""
    if isinstance(text, bool):
        return "true" if text else "false"
    if text.strip().lower() == "auto":
        return "auto"
    return "true" if parse_bool(text) else "false"


def parse_list(text: str | list) -> list[str]:
    """``a|b|c`` (commas separate options in the pipeline text, so lists use '|')."""
    if isinstance(text, list):
        return text
    return [item.strip() for item in text.split("|") if item.strip()]


# The Python values each option type takes (``Option.coerce``); a list option takes a list or tuple of texts.
_PYTHON_TYPES: dict[Callable, tuple[type, ...]] = {float: (int, float), int: (int,), str: (str,),
                                                   parse_bool: (bool,), parse_auto_bool: (bool,),
                                                   parse_list: (list, tuple)}


def _type_name(fn: Callable) -> str:
    return {parse_bool: "boolean", parse_auto_bool: "boolean or 'auto'", parse_list: "'|'-separated list",
            float: "number", int: "integer", str: "string"}.get(fn, getattr(fn, "__name__", "value"))


@dataclass
class Tolerance:
    """Numeric tolerance of a pass against the graph before it (ORT CPU, optimizations off)."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float | None = None  # when set, outputs are judged by cosine similarity instead of elementwise


@dataclass(frozen=True)
class AddedOutput:
    """A graph output a pass adds, and its reference: ``reference(outputs, feed)`` computes in numpy, from the
    outputs of the graph before the pass on one verification input ``feed``, what the new output must equal.
    The manager judges the new output against it at the pass's tolerance (``describe`` goes into the report)."""

    name: str
    reference: Callable[[dict[str, Any], dict[str, Any]], Any]
    describe: str


@dataclass
class PassResult:
    """What a pass did. A pass that changes the graph's outputs says so: ``removed_outputs`` (names of the graph
    before) and ``added_outputs`` (each with its reference); the manager then checks the new output list against
    exactly that change and verifies the added outputs against their references, the kept ones as usual."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    tolerance: Tolerance | None = None  # this run's tolerance when it differs from the pass's (fp16 after qdq)
    removed_outputs: tuple[str, ...] = ()
    added_outputs: tuple[AddedOutput, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)  # model metadata_props to set (pool: what it pooled)


CALIBRATION_BATCHES = 4  # batches of the calibration data that measurement steps (qdq's budget) read


@dataclass
class PassContext:
    """What passes may consult. Every field is typed; there is no free-form dictionary.

    ``calibration_source`` is the pipeline's calibration data (re-iterable batches: a ``FeedSource`` or a list);
    ``calibration`` is a table given by the user (``--calib-table``) or measured from that data by
    ``calibration_table`` on the graph as it stands before the first pass that asks. ``target`` is a ``Target``;
    a name given instead (a script's ``PassContext(target="ort-cpu")``) is resolved by ``Target.named``.
    """

    target: Target = TRT
    calibration: CalibrationTable | None = None
    calibration_source: Iterable[Feed] | None = None
    verification_feeds: list[Feed] | None = None
    shapes: dict[str, Profile] = field(default_factory=dict)  # --shapes: TensorRT profiles by input name
    explain: set[str] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    progress: Progress = field(default=lambda message: None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target, str):
            self.target = Target.named(self.target)

    def note(self, message: str) -> None:
        self.messages.append(message)

    def has_calibration(self) -> bool:
        return self.calibration is not None or self.calibration_source is not None

    def calibration_table(self, graph: gs.Graph, histograms: bool = True,
                          percentiles: tuple[float, ...] = (), sampler=None) -> CalibrationTable:
        """The calibration table: the one given, else measured now on ``graph`` (run as it is: no export, no
        copy of its weights) over the calibration data. ``histograms=False`` reads the data once ('max' ranges
        and per-channel ranges only); ``percentiles`` are measured besides the table's standard ones; a
        ``sampler`` (``analysis.layer_inputs.Sampler``) is filled on the way when the table is measured now."""
        if self.calibration is None:
            if self.calibration_source is None:
                raise TqcError("calibration data is needed: give --calib DATA or --calib-table TABLE")
            targets = calibration_targets(skeleton_of_graph(graph))
            self.calibration = calibrate(graph, self.calibration_source, targets, progress=self.progress,
                                         histograms=histograms, percentiles=percentiles, sampler=sampler)
        return self.calibration

    def calibration_batches(self, count: int = CALIBRATION_BATCHES, rows: int | None = None) -> list[Feed]:
        """The first ``count`` batches of the calibration data (at most ``rows`` rows each); [] without data."""
        if self.calibration_source is None:
            return []
        batches = [feed for _, feed in zip(range(count), self.calibration_source)]
        if rows is not None:
            batches = [{name: value[:rows] for name, value in feed.items()} for feed in batches]
        return batches


@dataclass(frozen=True)
class Condition:
    """A ``requires`` or ``ensures`` entry: what must hold, and a check returning None or why it does not.

    ``on="context"`` conditions are checked for every pass before the first one runs (what the pipeline must be
    given); ``on="graph"`` ones right before (requires) or after (ensures) the pass."""

    text: str
    check: Callable[[gs.Graph | None, PassContext], str | None]
    on: str = "graph"


class PreconditionError(TqcError):
    """A pass's ``requires`` does not hold: the pipeline or its inputs are wrong (exit 2)."""


class PostconditionError(VerificationError):
    """A pass broke its own ``ensures``: the pass is wrong (exit 1, like a failed verification)."""


def check_conditions(conditions: Iterable[Condition], graph: gs.Graph | None, ctx: PassContext, pass_name: str,
                     kind: str, on: str) -> None:
    """Raise on the first condition of ``on`` kind that does not hold."""
    for condition in conditions:
        if condition.on != on:
            continue
        reason = condition.check(graph, ctx)
        if reason is not None:
            if kind == "requires":
                raise PreconditionError(f"pass '{pass_name}' requires {condition.text}: {reason}")
            raise PostconditionError(f"pass '{pass_name}' did not ensure {condition.text}: {reason}")


def no_contrib_ops(graph: gs.Graph | None, ctx: PassContext) -> str | None:
    """For standard-ONNX targets (trt, openvino): no com.microsoft node."""
    if graph is None or ctx.target.contrib_ops:
        return None
    found = next((n for n in graph.nodes if n.domain == "com.microsoft"), None)
    return None if found is None else f"'{found.name}' ({found.op}) is a com.microsoft op, which {ctx.target} cannot run"


NO_CONTRIB_OPS = Condition("no com.microsoft ops for standard-ONNX targets (trt, openvino)", no_contrib_ops)


class Pass:
    """Base class. Subclasses set ``name``, ``options``, ``requires``/``ensures`` and implement ``run``."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    requires: ClassVar[tuple[Condition, ...]] = ()
    ensures: ClassVar[tuple[Condition, ...]] = ()
    tolerance: ClassVar[Tolerance] = Tolerance()

    def __init__(self, **values: Any):
        unknown = set(values) - set(self.options)
        if unknown:
            key = sorted(unknown)[0]
            if not self.options:
                raise TqcError(f"pass '{self.name}' takes no options (got '{key}')")
            raise TqcError(f"pass '{self.name}' has no option '{key}'{did_you_mean(key, self.options)}")
        self.values: dict[str, Any] = {k: opt.default for k, opt in self.options.items()}
        for key, value in values.items():  # the same types and ranges from Python as from the pipeline text
            self.values[key] = self.options[key].coerce(self.name, key, value)

    def __repr__(self) -> str:
        """``Qdq(smooth=0.5)``: the class and its non-default options, as it would be written in Python."""
        changed = {k: v for k, v in self.values.items() if v != self.options[k].default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(changed.items()))})"

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

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError(f"pass {self.name} does not implement run()")
