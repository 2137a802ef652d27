"""The one rule engine of ``fuse``: rules written as steps walked backwards from an anchor node.

A fusion (``attention``, ``gelu``, ``layernorm``, ``skip_layernorm``) is a catalogue of ``Rule``s and the step
kinds its rules use (``STEPS``: kind -> function). In the manner of onnxscript's rewriter:

* the **pattern** is a tuple of ``Step``s, each naming the op types it accepts, walked from the anchor (a
  Softmax, an Erf/Tanh, the Add ending a LayerNorm, a LayerNorm) towards the pattern's inputs;
* **alternatives** (onnxscript's ``OrValue``, and its commute): a step returns every ``Walk`` that fits -- one
  per operand order of a commutative node (``Step.commutative``, ``operand_orders``) -- and the engine tries
  them depth first, backtracking on a later miss; an ``optional`` step's node is taken when it is there;
* the **check** (``Rule.check``) runs on a complete walk and returns the reason it does not hold, or None;
* the **rewrite** is the fusion's, from the walk's bindings, through ``passes/rewrite.py`` only.

A miss is one ``Miss``, ranked by the index of the step it stopped at (the check counts as the step after the
last); the closest rule is the one that got furthest (on a tie, the earlier rule)::

    Erf 'e' ─► Add(2) ─► ...     Miss("Erf 'e'", "erf", "step 2 (plus_one: Add(1) either order): Add 'a' adds
                                 2, not 1", step=1)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import onnx_graphsurgeon as gs

from tqc.passes.fuse.match import describe, either_order, producer


class NoMatch(Exception):
    """A step (or a rewrite's precondition) does not hold; ``step`` is the index it stopped at."""

    def __init__(self, reason: str, step: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.step = step


@dataclass(frozen=True)
class Step:
    """One node of a pattern: ``kind`` names what is checked (the fusion's ``STEPS[kind]``), ``op`` the op
    types accepted; ``value`` a scalar constant operand expected (within relative ``tolerance``; 0: exact),
    ``perm`` a Transpose's permutation; ``commutative``: both operand orders are alternatives; ``optional``:
    the node may be absent."""

    kind: str
    op: tuple[str, ...] = ()
    value: float | None = None
    commutative: bool = False
    tolerance: float = 1e-3
    perm: tuple[int, ...] | None = None
    optional: bool = False

    def __str__(self) -> str:
        ops = "/".join(self.op)
        perm = str(list(self.perm)) if self.perm else ""
        value = f"({self.value:.6g})" if self.value is not None else ""
        text = self.kind + (f": {ops}{perm}{value}" if ops else "") + (" either order" if self.commutative else "")
        return text + ("?" if self.optional else "")


@dataclass(frozen=True)
class Rule:
    """A pattern (``steps`` from an anchor of op ``anchor``), and a ``check`` on the complete walk that returns
    why the match does not hold (None when it does). Fusions subclass it for what their rewrite needs."""

    name: str
    description: str
    anchor: tuple[str, ...]
    steps: tuple[Step, ...]
    check: Callable[["Walk"], str | None] | None = None


@dataclass(frozen=True)
class Walk:
    """What a rule has bound so far; each step returns new ``Walk``s (one per alternative)."""

    anchor: gs.Node
    tensor: gs.Tensor | None = None          # where the next step starts
    x: gs.Tensor | None = None               # the pattern's input
    nodes: tuple[gs.Node, ...] = ()          # the nodes the pattern covers (so far)
    bound: tuple[tuple[str, object], ...] = ()

    def bind(self, tensor: gs.Tensor | None = None, x: gs.Tensor | None = None, nodes: Sequence[gs.Node] = (),
             **bound: object) -> "Walk":
        return replace(self, tensor=self.tensor if tensor is None else tensor, x=self.x if x is None else x,
                       nodes=self.nodes + tuple(nodes), bound=self.bound + tuple(bound.items()))

    def __getitem__(self, name: str) -> object:
        return dict(self.bound)[name]

    def get(self, name: str, default: object = None) -> object:
        return dict(self.bound).get(name, default)


StepFunction = Callable[[Step, Walk], list[Walk]]


@dataclass(frozen=True)
class Miss:
    """An anchor no rule matched: the closest rule, why it stopped, and at which step (its rank)."""

    anchor: str
    rule: str
    reason: str
    step: int = 0


def walk(steps: tuple[Step, ...], start: Walk, kinds: dict[str, StepFunction], index: int = 0) -> Walk:
    """Match ``steps`` from ``start``, depth first over each step's alternatives; the first complete walk wins.

    A step function returns the alternatives that fit or raises ``NoMatch``; on a miss the reason of the deepest
    step is raised, prefixed with that step, its ``step`` the step's index."""
    if index == len(steps):
        return start
    step = steps[index]
    try:
        alternatives = kinds[step.kind](step, start)
    except NoMatch as miss:
        raise NoMatch(f"step {index + 1} ({step}): {miss.reason}", index) from None
    deepest: NoMatch | None = None
    for alternative in alternatives:
        try:
            return walk(steps, alternative, kinds, index + 1)
        except NoMatch as miss:
            if deepest is None or miss.step > deepest.step:
                deepest = miss
    raise deepest if deepest is not None else NoMatch(f"step {index + 1} ({step}): no alternative", index)


def apply(rule: Rule, start: Walk, kinds: dict[str, StepFunction]) -> Walk:
    """The rule's walk from ``start``, its check included (a failed check ranks after the last step)."""
    found = walk(rule.steps, start, kinds)
    reason = rule.check(found) if rule.check is not None else None
    if reason is not None:
        raise NoMatch(f"check: {reason}", len(rule.steps))
    return found


def closest(rules: Iterable[Rule], start: Walk, kinds: dict[str, StepFunction]) -> tuple[Rule, Walk] | Miss:
    """The first rule that matches and its walk, else the ``Miss`` of the rule that got furthest."""
    best: Miss | None = None
    for rule in rules:
        try:
            return rule, apply(rule, start, kinds)
        except NoMatch as miss:
            if best is None or miss.step > best.step:
                best = Miss(describe(start.anchor), rule.name, miss.reason, miss.step)
    return best if best is not None else Miss(describe(start.anchor), "-", "no rule", 0)


def search(anchors: Iterable[gs.Node], rules: Sequence[Rule], kinds: dict[str, StepFunction],
           start: Callable[[gs.Node], Walk] = Walk) -> tuple[list[tuple[Rule, Walk]], list[Miss]]:
    """Every anchor against the rules that start at its op: the matches, and a ``Miss`` for each other anchor."""
    found, misses = [], []
    for anchor in anchors:
        result = closest([r for r in rules if anchor.op in r.anchor], start(anchor), kinds)
        (misses if isinstance(result, Miss) else found).append(result)
    return found, misses


# Step helpers shared by the fusions ------------------------------------------------------------------------

def operand_orders(node: gs.Node, step: Step) -> list[tuple[gs.Tensor, gs.Tensor]]:
    """A binary node's operand pairs to try: both orders for a commutative step, else the node's own."""
    return list(either_order(*node.inputs)) if step.commutative else [tuple(node.inputs)]


def expect(tensor: gs.Tensor, step: Step) -> gs.Node:
    """The producer of ``tensor``, when it is one of ``step.op``; else ``NoMatch``."""
    node = producer(tensor)
    if node is None or node.op not in step.op:
        raise NoMatch(f"expected {'/'.join(step.op)} producing '{tensor.name}', found {describe(node)}")
    return node


def close(value: float | None, target: float, tol: float = 1e-3) -> bool:
    """``value`` within relative ``tol`` of ``target`` (absolute below 1)."""
    return value is not None and abs(value - target) <= tol * max(1.0, abs(target))
